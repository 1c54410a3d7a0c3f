"""``deepport bench``: per op, config and backend, checked timings next to ceilings and a baseline.

- :mod:`~deepport.bench.configs`: the configurations as data, one module per op (the protocol for
  adding an op, multi-process configs included, is in its docstring).
- :mod:`~deepport.bench.counting`: FLOP and byte counts (the rules: ``benchmarks/README.md``).
- :mod:`~deepport.bench.ceilings`: the microbenchmarks measured in the same run (HBM copy, bf16 and
  fp8 matmul; memcpy and fp32 matmul on CPUs).
- :mod:`~deepport.bench.check`: the correctness check every backend passes before it is timed.
- :mod:`~deepport.bench.timing`: CUDA graph / CUDA events / host timers, L2 rotation and flushing.
- :mod:`~deepport.bench.runner`: the run; :mod:`~deepport.bench.results`: the JSON document;
  :mod:`~deepport.bench.plot`: the PNG chart (matplotlib, optional).
"""
