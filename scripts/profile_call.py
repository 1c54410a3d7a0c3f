"""Run one bench config's call on one backend a few times: the target of an ``ncu`` profile.

    python3 scripts/profile_call.py --op fp8_gemm_nt --config m4096_n576_k7168 --backend triton [--calls 3]

The inputs are the bench config's own (``deepport bench``'s shapes, seed 0); the call is the bound one
(arguments validated once, then the backend's implementation), so the profile holds the op's kernels
and little else. The first call warms up (compiles); profile with ``ncu --launch-skip`` past it, e.g.
``ncu --kernel-name regex:fp8 --launch-skip 1 --launch-count 1 python3 scripts/profile_call.py ...``
(scripts/gpu_check.sh profile runs the shapes that missed a target). Prints the config it ran and the
kernels' mean time per call from CUDA events (profiler off).
"""

from __future__ import annotations

import argparse
import sys

import torch

from deepport.bench import configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, help="the op whose bench configs to search")
    parser.add_argument("--config", required=True, help="a substring of the config's name (must match one)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--calls", type=int, default=3, help="calls after the warm-up (default 3)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = [c for c in configs.select(device.type, [args.op]) if args.config in c.name]
    if len(found) != 1:
        names = [c.name for c in configs.select(device.type, [args.op])]
        print(f"expected one {args.op} config matching {args.config!r}, got {[c.name for c in found]}; "
              f"configs: {names}")
        return 2
    config = found[0]
    work = config.build(device, 0)
    run = work.bound_call(args.backend)
    run()  # warm-up: compiles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(args.calls):
        run()
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        print(f"{config.op}/{config.name} on {args.backend}: {start.elapsed_time(end) * 1000 / args.calls:.1f} us "
              f"per call over {args.calls} calls")
    else:
        print(f"{config.op}/{config.name} on {args.backend}: ran {args.calls} calls on the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
