"""The MoE ops on the torch backend: normal routes in ``moe_routes``, the other layouts in ``moe_layouts``."""

from deepport.backends.moe_ops import moe_op_support

MOE_OPS = moe_op_support("deepport.backends.torch.moe_routes", "deepport.backends.torch.moe_layouts")
