#!/usr/bin/env bash
# The device-machine batch, one stage per call (each fits the 10-minute call limit). Writes logs and
# reports at the top level of $OUT (the device tool brings them back).
#   bash scripts/gpu_check.sh mla     GPU tests of MLA decode; certify --tier full on torch (isolated); verify
#   bash scripts/gpu_check.sh fp8     FP8 GPU tests; certify --tier full on torch for the dense FP8 GEMMs
#   bash scripts/gpu_check.sh fp8-grouped   certify --tier full on torch for the grouped FP8 GEMMs
#   bash scripts/gpu_check.sh moe     MoE GPU tests; certify --tier full on torch for the MoE ops (2-rank NCCL needs 2 GPUs)
#   bash scripts/gpu_check.sh bench   deepport bench: MLA decode, dense and grouped FP8 GEMM (and MoE when 2 GPUs are present)
set -uo pipefail
stage="${1:-mla}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/deepport-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__, 'gpus', torch.cuda.device_count())"
git_rev="$(cat .git_revision 2>/dev/null || echo unknown)"; echo "deepport commit: $git_rev" | tee "$OUT/commit.txt"

certify() {  # certify NAME OPS...  (DEEPPORT_GPU_VERIFY=0: leave `deepport verify` to the host, saving device time)
  local name="$1"; shift
  python3 -m deepport certify --device cuda --tier full --backend torch --op "$@" --out "$OUT/$name" 2>&1 | tail -n 30
  if [ "${DEEPPORT_GPU_VERIFY:-1}" != 0 ]; then
    python3 -m deepport verify "$OUT/$name/results.json" 2>&1 | tail -n 8 | tee "$OUT/${name}_verify.txt"
  fi
  for f in results.json summary.md junit.xml; do cp "$OUT/$name/$f" "$OUT/${name}_$f" 2>/dev/null; done
  rm -rf "${OUT:?}/$name"
}

case "$stage" in
  mla)
    python3 -m pytest -q -p no:cacheprovider tests/test_mla_decode_gpu.py 2>&1 | tee "$OUT/gpu_tests_mla.txt" | tail -n 15
    certify full_torch_mla mla_decode ;;
  fp8)
    python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gemm_gpu.py tests/test_fp8_grouped_gemm_gpu.py \
      tests/test_f64_products.py 2>&1 | tee "$OUT/gpu_tests_fp8.txt" | tail -n 15
    certify full_torch_fp8_dense fp8_gemm_nt fp8_gemm_nn fp8_gemm_tn fp8_gemm_tt ;;
  fp8-grouped)
    certify full_torch_fp8_grouped m_grouped_fp8_gemm_nt_contiguous m_grouped_fp8_gemm_nt_masked ;;
  moe)
    python3 -m pytest -q -p no:cacheprovider tests/test_moe_gpu.py 2>&1 | tee "$OUT/gpu_tests_moe.txt" | tail -n 15
    certify full_torch_moe moe_layout moe_dispatch moe_combine moe_dispatch_expanded moe_combine_expanded \
      moe_low_latency_dispatch moe_low_latency_combine ;;
  bench)
    python3 -m deepport bench --device cuda --out "$OUT/bench" 2>&1 | tail -n 80
    cp "$OUT/bench/bench.json" "$OUT/bench.json" 2>/dev/null; cp "$OUT/bench/bench.png" "$OUT/bench.png" 2>/dev/null
    rm -rf "$OUT/bench" ;;
  *) echo "unknown stage $stage (mla, fp8, fp8-grouped, moe, bench)"; exit 2 ;;
esac
