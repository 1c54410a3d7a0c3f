#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, `deepport certify` (full tier on torch, isolated), `deepport verify`.
# Usage (device tool): bash scripts/gpu_check.sh   -- writes logs and reports under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/deepport-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
python3 -m deepport info | tee "$OUT/info.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
python3 -m deepport certify --device cuda --tier full --backend torch --out "$OUT/full_torch" 2>&1 | tail -n 40
python3 -m deepport verify "$OUT/full_torch/results.json" 2>&1 | tail -n 12 | tee "$OUT/verify.txt"
for f in results.json summary.md junit.xml; do cp "$OUT/full_torch/$f" "$OUT/full_torch_$f" 2>/dev/null; done
rm -rf "$OUT/full_torch"
