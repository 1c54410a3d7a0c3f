"""The MoE ops on the reference backend (all in :mod:`deepport.backends.reference.moe`)."""

from deepport.backends.moe_ops import moe_op_support

MOE_OPS = moe_op_support("deepport.backends.reference.moe", "deepport.backends.reference.moe")
