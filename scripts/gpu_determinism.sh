#!/usr/bin/env bash
# Run-to-run determinism on the GPU in one device call (<= 2 minutes): every smoke case of every op that
# torch, triton and hopper implement, 20 runs each with identical inputs, outputs compared bit for bit
# against each backend's declared claim (deepport determinism --claims). The three backends run side by
# side (one process each, each under its own timeout); a backend claiming bitwise results that differ
# fails. Writes $OUT/determinism-<backend>/{determinism.json,determinism.jsonl} and
# $OUT/determinism-<backend>.log, then prints each backend's table.
#
#   bash scripts/gpu_determinism.sh [REPEAT]          (default 20; on a machine without CUDA: skips)
# Dry run of the script on a CPU: DEEPPORT_DEVICE=cpu DEEPPORT_BACKENDS="torch reference"
#   DEEPPORT_DETERMINISM_ARGS="--op fp8_gemm_nt --case m40" PYTHON=... bash scripts/gpu_determinism.sh 2
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/deepport-out}"; mkdir -p "$OUT"
REPEAT="${1:-20}"
PY="${PYTHON:-python3}"
LIMIT_S="${DEEPPORT_DETERMINISM_TIMEOUT:-105}"
DEVICE="${DEEPPORT_DEVICE:-cuda}"
read -r -a BACKENDS <<< "${DEEPPORT_BACKENDS:-hopper torch triton}"
read -r -a EXTRA <<< "${DEEPPORT_DETERMINISM_ARGS:-}"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_determinism: no CUDA device (or no torch) for $PY here; skipped"; exit 0
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1
started=$SECONDS
pids=()
for backend in "${BACKENDS[@]}"; do
  timeout "$LIMIT_S" "$PY" -m deepport determinism --device "$DEVICE" --backend "$backend" --repeat "$REPEAT" \
    --out "$OUT/determinism-$backend" "${EXTRA[@]}" > "$OUT/determinism-$backend.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; code=$?
  backend="${BACKENDS[$i]}"
  case $code in
    0) verdict="ok" ;;
    1) verdict="FAILED (a claimed-bitwise case differed, or an error)"; status=1 ;;
    124) verdict="TIMED OUT after ${LIMIT_S}s (partial results in determinism-$backend/determinism.jsonl)"; status=1 ;;
    2) verdict="USAGE ERROR (backend unavailable?)"; status=1 ;;
    *) verdict="exit $code"; status=1 ;;
  esac
  echo "== $backend: $verdict"
  grep -v "^deepport determinism: .* runs per case$" "$OUT/determinism-$backend.log" | tail -n 24
done
echo "gpu_determinism: ${REPEAT} runs per case, $((SECONDS - started)) s, exit $status"
exit $status
