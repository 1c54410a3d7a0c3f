"""The float64 oracles: each op's executable definition, next to its contract in :mod:`deepport.kernels`.

One module per op family, NumPy float64 on host copies (large FP8 GEMM products may run as a CUDA DGEMM
inside :func:`deepport.kernels.f64.products.products_on`):

- :mod:`~deepport.kernels.f64.mla_decode`: ``mla_decode_f64`` (and ``run``, the oracle as an implementation);
- :mod:`~deepport.kernels.f64.fp8_gemm`: ``reference_f64`` / ``fp8_gemm_f64`` (and ``run``);
- :mod:`~deepport.kernels.f64.fp8_grouped_gemm`: ``contiguous_f64``, ``masked_rows_f64`` (and ``run_contiguous``,
  ``run_masked``);
- :mod:`~deepport.kernels.f64.moe`: routing and sums of the MoE ops from the whole world's inputs;
- :mod:`~deepport.kernels.f64.products`: the float64 matrix products the FP8 definitions share.

The conformance suite computes its references here; the ``reference`` backend runs these same functions
(its ``run`` entries point here), so the suite and the backend cannot disagree. Nothing here imports a backend.
"""
