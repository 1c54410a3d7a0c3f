#!/usr/bin/env bash
# The OpenCL backend on an NVIDIA GPU through NVIDIA's OpenCL driver (the H200 device machine), in one
# device call of at most ~9 minutes. Run from the repository root:
#   WHL=<folder of wheels> [BENCH_ARGS=--mla-only] bash scripts/gpu_opencl.sh [all|bench|certify|cert-start|parts-start NAME...]
# Steps:
#   1. install the carried wheels (pyopencl and what the image lacks: pytools, platformdirs, siphash24)
#      into /tmp/site; register NVIDIA's OpenCL ICD (OCL_ICD_VENDORS); DEEPPORT_OPENCL_DEVICE=NVIDIA
#   2. list the OpenCL devices (deepport info --json) and run the conversion / host-side unit tests there
#   3. (bench) kernel times from profiling events: MLA decode b=128 s_k=4096 (h_q 16 and 128) and FP8 GEMM
#      M=4096 on the DeepSeek-V3 shapes, with tile variants and the torch backend as peer (scripts/opencl_bench.py)
#   4. (certify) deepport certify --tier full --backend opencl, four runs in parallel, each with a deadline:
#      MLA decode (--device cpu: its oracle is host NumPy anyway, and the inputs go to OpenCL without a CUDA
#      hop), dense and grouped FP8 GEMMs (--device cuda: their float64 oracles run as DGEMM on the GPU), and
#      the MoE ops (--device cpu: the 2-rank cases run over gloo; NCCL would need two GPUs)
#   5. (parts-start NAME...) full-tier parts (mla, fp8-dense, moe, fp8-contiguous, fp8-masked) of the opencl
#      backend with the run seed DEEPPORT_CERT_SEED, on --device cuda (float64 oracles as GPU DGEMM; the 2-rank
#      MoE cases need NCCL on two GPUs, so they are not_supported on one), detached by `gpu_check.sh parts-start`
#      with this script's environment; `bash scripts/gpu_check.sh parts-collect` in later calls, then
#      `gpu_check.sh merge` of every part's results.json into one certificate
#   6. (cert-start) the whole full tier as a certificate (`deepport certify --certify --backend opencl`, the
#      MoE ranks over gloo, OpenCL kernels on the GPU, float64 oracles on the 16 host cores), detached by
#      `scripts/gpu_check.sh cpu-cert-start` with this script's environment, so it outlives the call while the
#      machine stays warm; collect it with `bash scripts/gpu_check.sh cpu-cert-collect` (exit 1 until done)
#      in later calls, each within 30 s of the last
# At most 8 files land in $OUT: log.txt, info.json, opencl_bench.json, summaries.md, and one
# <name>_results.json per certify run.
set -uo pipefail
stage="${1:-all}"
OUT="${OUT:-/tmp/deepport-opencl}"; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
start=$(date +%s)
budget="${DEEPPORT_GPU_BUDGET_S:-540}"  # the whole script, seconds
left() { echo $(( budget - ($(date +%s) - start) )); }

WHL="${WHL:-.whl}"
[ -d "$WHL" ] || WHL=../../.whl  # a copy under .devcarry/<name>/ with the wheels at the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
  || { echo "FAILED: installing the wheels of $WHL"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
lib=""
for candidate in /usr/lib/libnvidia-opencl.so.1 /usr/lib/x86_64-linux-gnu/libnvidia-opencl.so.1 \
                 /usr/local/nvidia/lib64/libnvidia-opencl.so.1 /usr/lib64/libnvidia-opencl.so.1; do
  [ -e "$candidate" ] && { lib="$candidate"; break; }
done
[ -n "$lib" ] || lib="$(ldconfig -p | awk '/libnvidia-opencl.so.1/ {print $NF; exit}')"
echo "NVIDIA OpenCL library: ${lib:-not found}"
mkdir -p /tmp/icd; echo "${lib:-/usr/lib/libnvidia-opencl.so.1}" > /tmp/icd/nvidia.icd
export OCL_ICD_VENDORS=/tmp/icd DEEPPORT_OPENCL_DEVICE="${DEEPPORT_OPENCL_DEVICE:-NVIDIA}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import torch, pyopencl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyopencl', pyopencl.VERSION_TEXT)"

python3 -m deepport info --json > "$OUT/info.json" 2>/dev/null
python3 - "$OUT/info.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for b in doc["backends"]:
    if b["name"] == "opencl":
        print("opencl backend:", "available" if b["available"] else f"UNAVAILABLE: {b['unavailable_reason']}")
        for d in (b.get("toolchain") or {}).get("opencl_devices", []):
            print(f"  {'*' if d['selected'] else ' '} {d['device']} | {d['version']} | {d['opencl_c']} | driver "
                  f"{d['driver']} | {d['compute_units']} CUs, WG {d['max_work_group_size']}, local "
                  f"{d['local_mem_bytes']} B | {len(d['extensions'])} extensions: {' '.join(d['extensions'])}")
EOF
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_opencl_conversions.py tests/test_opencl_backend.py \
  2>&1 | tail -n 6

if [ "$stage" = parts-start ]; then  # parts-start NAME...: full-tier parts of one run seed, detached (see above)
  shift
  DEEPPORT_CERT_BACKENDS=opencl bash scripts/gpu_check.sh parts-start "$@"
  status=$?; sleep 1; exit "$status"
fi
if [ "$stage" = cert-start ]; then
  DEVICE=cpu bash scripts/gpu_check.sh cpu-cert-start opencl
  echo "== done in $(( $(date +%s) - start )) s"
  sleep 1
  exit 0
fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
  echo "== bench ($(left) s left)"
  # the bench alone may take longer (MLA: both split kernels and the staged kernel's tile variants);
  # BENCH_ARGS passes options through, e.g. BENCH_ARGS=--mla-only
  bench_s="${BENCH_TIMEOUT_S:-$([ "$stage" = bench ] && echo 420 || echo 170)}"
  # shellcheck disable=SC2086
  timeout "$bench_s" python3 scripts/opencl_bench.py --out "$OUT/opencl_bench.json" ${BENCH_ARGS:-} \
    || echo "bench: exit status $?"
fi

certify() {  # certify NAME DEVICE OPS...: full tier with a deadline; results.json and summary.md kept
  local name="$1" device="$2"; shift 2
  local deadline=$(( $(left) - 25 ))
  timeout "$deadline" python3 -m deepport certify --backend opencl --tier full --device "$device" --op "$@" \
    --out "/tmp/cert_$name" > "/tmp/cert_$name.log" 2>&1
  echo "exit status $? (deadline ${deadline} s)" >> "/tmp/cert_$name.log"
}
if [ "$stage" = all ] || [ "$stage" = certify ]; then
  echo "== certify, four runs in parallel ($(left) s left)"
  pids=()  # a bare `wait` would also wait for the tee of the log
  OMP_NUM_THREADS=8 certify mla cpu mla_decode & pids+=($!)
  OMP_NUM_THREADS=4 certify fp8_dense cuda fp8_gemm_nt fp8_gemm_nn fp8_gemm_tn fp8_gemm_tt & pids+=($!)
  OMP_NUM_THREADS=4 certify fp8_grouped cuda m_grouped_fp8_gemm_nt_contiguous m_grouped_fp8_gemm_nt_masked & pids+=($!)
  OMP_NUM_THREADS=2 certify moe cpu moe_layout moe_dispatch moe_combine moe_dispatch_expanded moe_combine_expanded \
    moe_low_latency_dispatch moe_low_latency_combine & pids+=($!)
  wait "${pids[@]}"
  for name in mla fp8_dense fp8_grouped moe; do
    echo "== certify $name"
    grep -v "━" "/tmp/cert_$name.log" | tail -n 22
    cp "/tmp/cert_$name/results.json" "$OUT/${name}_results.json" 2>/dev/null
    { echo "# $name"; cat "/tmp/cert_$name/summary.md" 2>/dev/null; echo; } >> "$OUT/summaries.md"
  done
fi
echo "== done in $(( $(date +%s) - start )) s"
sleep 1  # let the tee of the log finish writing
