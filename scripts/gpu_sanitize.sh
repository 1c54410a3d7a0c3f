#!/usr/bin/env bash
# compute-sanitizer over every hopper and triton kernel, in ONE device call (<= 5 minutes on an H200).
#
#   bash scripts/gpu_sanitize.sh
#
# 1. warm-up (no sanitizer; 4 processes side by side): every smoke case of every op the two backends
#    register, once each, so that Triton's and the hopper JIT's on-disk caches hold every kernel the
#    sanitizer runs will load (no compiling under the sanitizer), and the driver is known to work;
# 2. eight sanitizer processes side by side, each under its own timeout (scripts/sanitize_driver.py run):
#      memcheck   every smoke case, split in three jobs by op family (mla, fp8, moe + any other op),
#                 torch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor is its own
#                 allocation, so a read past a tensor's end is outside every allocation)
#      initcheck  2 cases per op (spread over the op's list, taking cases that launch one of the backend's
#                 own kernels), caching allocator off
#      synccheck  3 cases per op
#      racecheck  1 case per op (shared-memory hazards; the slowest tool)
#      memcheck and racecheck of the triton MoE ops with the variants that are off by default (--set)
#    every run with --target-processes all and --print-limit 10000;
# 3. the summary (scripts/sanitize_driver.py summarize): tool x backend x op, cases run, launches of our own
#    kernels, errors in our kernels, in others' kernels (torch, cuBLAS: reported, not counted against us),
#    host API errors; exit 1 on any error in our kernels or a failed tool run.
#
# Writes under $OUT/sanitize: <job>.log (sanitizer + driver output), <job>.json (cases, launches),
# <job>.rc, plain-*.log, summary.md, summary.json. Limits (seconds): DEEPPORT_SANITIZE_WARMUP_S (95),
# DEEPPORT_SANITIZE_TOOL_S (175). Backends: DEEPPORT_SANITIZE_BACKENDS ("triton hopper").
# Dry run of the flow without a GPU (a stand-in sanitizer that just runs the command):
#   DEEPPORT_DEVICE=cpu TRITON_INTERPRET=1 DEEPPORT_SANITIZE_BACKENDS=triton DEEPPORT_SANITIZE_ARGS="--op moe_layout"
#   COMPUTE_SANITIZER=/path/to/stand-in PYTHON=... bash scripts/gpu_sanitize.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/deepport-out}"
DIR="$OUT/sanitize"; mkdir -p "$DIR"
PY="${PYTHON:-python3}"
WARMUP_S="${DEEPPORT_SANITIZE_WARMUP_S:-95}"
TOOL_S="${DEEPPORT_SANITIZE_TOOL_S:-175}"
read -r -a BACKENDS <<< "${DEEPPORT_SANITIZE_BACKENDS:-triton hopper}"
DEVICE="${DEEPPORT_DEVICE:-cuda}"
read -r -a EXTRA <<< "${DEEPPORT_SANITIZE_ARGS:-}"
DRIVER=(scripts/sanitize_driver.py)
started=$SECONDS

CS="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$CS" ] && [ -x "$candidate" ] && CS="$candidate"
done
if [ -z "$CS" ]; then echo "gpu_sanitize: compute-sanitizer not found; skipped"; exit 0; fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_sanitize: no CUDA device (or no torch) for $PY here; skipped"; exit 0
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1
"$CS" --version | tail -n 1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# --- 1. warm-up: fill the JIT caches ---------------------------------------------------------------------
pids=()
for part in "triton mla" "triton fp8" "triton moe,other" "hopper all"; do
  read -r backend fam <<< "$part"
  case " ${BACKENDS[*]} " in *" $backend "*) ;; *) continue ;; esac
  name="plain-$backend-${fam%%,*}"
  timeout "$WARMUP_S" "$PY" "${DRIVER[@]}" run --backend "$backend" --family "$fam" --device "$DEVICE" \
    --json "$DIR/$name.json" "${EXTRA[@]}" > "$DIR/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for log in "$DIR"/plain-*.log; do echo "warm-up $(basename "$log" .log): $(tail -n 1 "$log")"; done
echo "warm-up done after $((SECONDS - started)) s"

# --- 2. the sanitizer runs ---------------------------------------------------------------------------------
HELP="$("$CS" --help 2>&1)"
COMMON=(--print-limit 10000)
grep -q -- "--target-processes" <<< "$HELP" && COMMON+=(--target-processes all)
MEMCHECK=()
grep -q -- "--padding" <<< "$HELP" && MEMCHECK+=(--padding 256)  # a gap after every allocation: no silent overrun into a neighbour

job() {  # job NAME TOOL NO_CACHING DRIVER_ARGS...
  local name="$1" tool="$2" no_cache="$3"; shift 3
  local extra=()
  [ "$tool" = memcheck ] && extra=("${MEMCHECK[@]}")
  (
    [ "$no_cache" = 1 ] && export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    timeout "$TOOL_S" "$CS" --tool "$tool" "${COMMON[@]}" "${extra[@]}" \
      "$PY" "${DRIVER[@]}" run --backend "${BACKENDS[@]}" --device "$DEVICE" --json "$DIR/$name.json" "$@" \
      "${EXTRA[@]}" > "$DIR/$name.log" 2>&1
    echo $? > "$DIR/$name.rc"
  ) &
}
job memcheck-mla memcheck 1 --family mla
job memcheck-fp8 memcheck 1 --family fp8
job memcheck-moe memcheck 1 --family moe,other
job initcheck initcheck 1 --cases-per-op 2
job synccheck synccheck 0 --cases-per-op 3
job racecheck racecheck 0 --cases-per-op 1
# the triton variants that are off by default until measured (scattered rows of the fused expanded dispatch,
# the weighted-rows prefetch): memcheck and racecheck of the MoE ops with them on
VARIANTS=(--backend triton --set deepport.backends.triton.moe_expanded_dispatch:_ROWS=scatter
          --set deepport.backends.triton.moe_permute:_PREFETCH=True)
job memcheck-variants memcheck 1 --family moe "${VARIANTS[@]}"
job racecheck-variants racecheck 0 --family moe --cases-per-op 2 "${VARIANTS[@]}"
wait
echo "sanitizer runs done after $((SECONDS - started)) s"

# --- 3. summary ---------------------------------------------------------------------------------------------
"$PY" "${DRIVER[@]}" summarize "$DIR"
status=$?
echo "gpu_sanitize: $((SECONDS - started)) s, exit $status (logs: $DIR)"
exit $status
