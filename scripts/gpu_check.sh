#!/usr/bin/env bash
# The device-machine batch, one stage per device call (each fits the 10-minute call limit). Writes logs and
# reports under $OUT (the device tool brings them back).
#
# GPU tests:
#   bash scripts/gpu_check.sh mla          tests/test_mla_decode_gpu.py
#   bash scripts/gpu_check.sh fp8          tests/test_fp8_gemm_gpu.py, test_fp8_grouped_gemm_gpu.py, test_f64_products.py
#   bash scripts/gpu_check.sh moe-tests    tests/test_moe_gpu.py (1 GPU and 2-rank NCCL: run on 2 GPUs)
#
# The full-tier certificate of the torch backend (DEEPPORT_CERT_BACKENDS="torch triton hopper": of several in one
# run; each backend isolated, a case's float64 oracle is computed once for all of them), in parts of one run
# (the same run seed), merged on the host:
#   DEEPPORT_CERT_SEED=N bash scripts/gpu_check.sh cert-a    parts mla + fp8-dense           (1 GPU is enough)
#   DEEPPORT_CERT_SEED=N bash scripts/gpu_check.sh cert-b    parts fp8-grouped + moe         (2 GPUs: 2-rank NCCL)
#   DEEPPORT_CERT_SEED=N bash scripts/gpu_check.sh part NAME one part: mla, fp8-dense, fp8-grouped or moe
#                                                             (fp8-grouped also as fp8-contiguous + fp8-masked)
#   DEEPPORT_CERT_SEED=N bash scripts/gpu_check.sh parts NAME...  several parts in one call, in order
#   DEEPPORT_CERT_SEED=N bash scripts/gpu_check.sh parts-start NAME...  the same detached: a run longer than one
#   bash scripts/gpu_check.sh parts-collect                           call, collected by the next (within 30 s)
#   (on one GPU the moe part's 2-rank cases come back not_supported: too few GPUs; the multi-rank profile
#   is then unclaimed, not failed, and the certificate covers the single-GPU profiles)
#   bash scripts/gpu_check.sh merge PARTS_DIR OUT_DIR         (host) deepport merge of PARTS_DIR/part-*/results.json
#                                                             into OUT_DIR, then deepport verify > OUT_DIR/verify.txt
# Each part writes $OUT/part-NAME/{results.json,summary.md,junit.xml} and $OUT/part-NAME.log as soon as it
# ends, so a stage cut short by the call limit keeps the parts it finished; rerun only the missing ones.
#
# CPU certificates on the device machine's 16 cores (scripts/cpu_certify.sh), across device calls while
# the machine stays warm (a call within 30 s of the last), next to GPU work:
#   bash scripts/gpu_check.sh cpu-cert-start "reference torch"   starts it detached (setsid), returns at once
#                                                                (extra args go to deepport certify)
#   bash scripts/gpu_check.sh cpu-cert-collect                   progress, or (when done) the folder as
#                                                                $OUT/cpu-certify.tar.gz; exit 1 until done
#
#   bash scripts/gpu_check.sh hopper-mla   scripts/gpu_hopper_mla.py: probe (own deadline: a hung kernel ends
#                                          only this step), then smoke certify and the MLA bench
#   bash scripts/gpu_check.sh profile      ncu (speed of light, pipes, stall reasons) of each shape that misses a
#                                          target: triton MLA compute-bound and FP8 M=4096, hopper FP8 dense and grouped
#   bash scripts/gpu_check.sh bench        deepport bench (MoE configs need 2 GPUs)
#   bash scripts/gpu_check.sh tune         sweeps of code not yet measured on a GPU (fused MoE dispatch and
#                                          combine kernels, triton FP8 tail split), with their GPU tests
#   bash scripts/gpu_check.sh backends     GPU tests + smoke certify of torch/triton/hopper on cuda (a cold machine
#                                          needs ~250 s and ~210 s for them: deepport bench is the next call's
#                                          stage, `bench`, within 30 s)
#   bash scripts/gpu_check.sh selection    automatic choice on real inputs vs the shipped performance table
#                                          (scripts/gpu_selection.py) + the automatic-choice GPU tests
#   bash scripts/gpu_check.sh peer-1gpu    the hopper NVLink transport's protocol with 2 processes on ONE GPU
#                                          (CUDA IPC mapping, flag kernel, chunks, the one-launch fixed exchange,
#                                          graph replays, both stall records; the exchange kernel in loopback, timed):
#                                          what one GPU can check of issue 14's hopper path (tests/peer_cuda_one_gpu.py)
#   bash scripts/gpu_check.sh ep-host-1gpu the portable path's host path over real NCCL launches (tests/mirror_cuda_host.py),
#                                          NCCL launch costs, the staged checks and the MoE GPU tests (~10 min at most)
#   bash scripts/gpu_check.sh ll-1gpu      the hopper path's low-latency dispatch and combine end to end, two ranks in
#                                          one process (tests/peer_ll_loopback.py: checks, graph timings, kernels)
#   bash scripts/gpu_check.sh ll-ncu       ncu of each kernel of those ops, each rank alone (durations, occupancy, stalls)
set -uo pipefail
stage="${1:-mla}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the commit the bench JSON records: the carried .git_revision (a copied tree's .git may be stale or absent)
if [ -f .git_revision ]; then export DEEPPORT_GIT_REVISION="$(cat .git_revision)"; fi
OUT="${OUT:-/tmp/deepport-out}"; mkdir -p "$OUT"

environment() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__, 'gpus', torch.cuda.device_count())"
  local git_rev; git_rev="$(cat .git_revision 2>/dev/null || echo unknown)"; echo "deepport commit: $git_rev" | tee "$OUT/commit.txt"
}

ops_of() {  # the ops of one certificate part
  case "$1" in
    mla) echo mla_decode ;;
    fp8-dense) echo fp8_gemm_nt fp8_gemm_nn fp8_gemm_tn fp8_gemm_tt ;;
    fp8-grouped) echo m_grouped_fp8_gemm_nt_contiguous m_grouped_fp8_gemm_nt_masked ;;
    fp8-contiguous) echo m_grouped_fp8_gemm_nt_contiguous ;;  # fp8-grouped in two calls, when one is too short
    fp8-masked) echo m_grouped_fp8_gemm_nt_masked ;;
    moe) echo moe_layout moe_dispatch moe_combine moe_dispatch_expanded moe_combine_expanded \
              moe_low_latency_dispatch moe_low_latency_combine ;;
    *) return 1 ;;
  esac
}

part() {  # part NAME: certify --tier full on $DEEPPORT_CERT_BACKENDS (default torch; isolated) for the part's ops, with the run seed
  local name="$1" ops start
  ops="$(ops_of "$name")" || { echo "unknown part $name (mla, fp8-dense, fp8-grouped, fp8-contiguous, fp8-masked, moe)"; return 2; }
  if [ -z "${DEEPPORT_CERT_SEED:-}" ]; then
    echo "set DEEPPORT_CERT_SEED (one random seed for every part of the certificate)"; return 2
  fi
  start=$SECONDS
  # shellcheck disable=SC2086 # the op list is meant to split into words
  # shellcheck disable=SC2086 # so is the backend list
  python3 -m deepport certify --device cuda --tier full --backend ${DEEPPORT_CERT_BACKENDS:-torch} \
    --seed "$DEEPPORT_CERT_SEED" --op $ops --out "$OUT/part-$name" > "$OUT/part-$name.log" 2>&1
  local status=$?
  tail -n 25 "$OUT/part-$name.log"
  echo "part $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/parts.txt"
  if [ -f "$OUT/part-$name/results.json" ]; then  # not a certificate alone: shows any finding early
    python3 -m deepport verify "$OUT/part-$name/results.json" --regenerate 0 2>&1 | tail -n 6
  fi
}

collect_parts() {  # collect_parts SECONDS: wait for the detached parts run, then archive its output into $OUT
  local dir=/tmp/deepport-parts waited=0 pid
  pid="$(cat "$dir/pid" 2>/dev/null)" || { echo "no parts-start run in $dir"; return 2; }
  while kill -0 "$pid" 2> /dev/null && [ "$waited" -lt "$1" ]; do sleep 5; waited=$((waited + 5)); done
  # one archive: each part is a folder of three files, and at most 8 files come back from a device call
  tar -czf "$OUT/parts.tar.gz" -C "$dir" out script.log 2>/dev/null
  if kill -0 "$pid" 2> /dev/null; then
    echo "still running after $waited s (call parts-collect within 30 s to keep the machine):"
    cat "$dir/out/parts.txt" 2>/dev/null; return 1
  fi
  echo "done:"; cat "$dir/out/parts.txt" 2>/dev/null
}

case "$stage" in
  mla)
    environment
    python3 -m pytest -q -p no:cacheprovider tests/test_mla_decode_gpu.py 2>&1 | tee "$OUT/gpu_tests_mla.txt" | tail -n 15 ;;
  fp8)
    environment
    python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gemm_gpu.py tests/test_fp8_grouped_gemm_gpu.py \
      tests/test_f64_products.py 2>&1 | tee "$OUT/gpu_tests_fp8.txt" | tail -n 15 ;;
  moe-tests)
    environment
    python3 -m pytest -q -p no:cacheprovider tests/test_moe_gpu.py 2>&1 | tee "$OUT/gpu_tests_moe.txt" | tail -n 25 ;;
  cert-a)
    environment; part mla; part fp8-dense ;;
  cert-b)
    environment; part fp8-grouped; part moe ;;
  part)
    environment; part "${2:?part NAME}" ;;
  parts)  # parts NAME...: several parts in one call, in order (each kept as soon as it ends)
    environment; shift; for name in "${@:?parts NAME...}"; do part "$name"; done ;;
  merge)
    parts_dir="${2:?merge PARTS_DIR OUT_DIR}"; out_dir="${3:?merge PARTS_DIR OUT_DIR}"
    python3 -m deepport merge "$parts_dir"/part-*/results.json --out "$out_dir" || exit $?
    python3 -m deepport verify "$out_dir/results.json" 2>&1 | tee "$out_dir/verify.txt" | tail -n 12
    exit "${PIPESTATUS[0]}" ;;
  backends)  # every GPU backend in one call: GPU tests, smoke certify on cuda (torch, triton, hopper)
    environment
    timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py tests/test_hopper_gpu.py \
      tests/test_custom_ops_gpu.py tests/test_mla_decode_gpu.py tests/test_fp8_gemm_gpu.py \
      tests/test_fp8_grouped_gemm_gpu.py > "$OUT/gpu_tests.txt" 2>&1; tail -n 25 "$OUT/gpu_tests.txt"
    timeout 250 python3 -m deepport certify --device cuda --tier smoke --backend torch triton hopper \
      --out "$OUT/smoke" > "$OUT/smoke.log" 2>&1; tail -n 30 "$OUT/smoke.log" ;;
  selection)
    environment
    timeout 300 python3 scripts/gpu_selection.py > "$OUT/selection.txt" 2>&1; echo "gpu_selection exit $?"
    tail -n 50 "$OUT/selection.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -k automatic tests/test_fp8_gemm_gpu.py \
      tests/test_hopper_gpu.py tests/test_mla_decode_gpu.py tests/test_triton_gpu.py 2>&1 | tail -n 15 ;;
  hopper-mla)
    environment
    timeout 150 python3 scripts/gpu_hopper_mla.py --stages probe > "$OUT/hopper_mla_probe.txt" 2>&1
    status=$?; echo "probe: exit $status" >> "$OUT/hopper_mla_probe.txt"; cat "$OUT/hopper_mla_probe.txt"
    if [ "$status" = 0 ]; then
      OUT=/tmp/hopper-mla timeout "${HOPPER_MLA_S:-260}" python3 scripts/gpu_hopper_mla.py --stages "${HOPPER_MLA_STAGES:-smoke,bench}" \
        > "$OUT/hopper_mla.txt" 2>&1; echo "exit $?" >> "$OUT/hopper_mla.txt"; tail -n 45 "$OUT/hopper_mla.txt"
      cp /tmp/hopper-mla/bench/bench.json "$OUT/mla_bench.json" 2>/dev/null
      cp /tmp/hopper-mla/certify-full/results.json "$OUT/mla_full_results.json" 2>/dev/null
    fi ;;
  ecosystem)  # issue 17 on the GPU: the decode-step example (automatic, and all-triton) eager and as one CUDA
              # graph, and the GPU tests of the example, the custom ops (torch.compile, graphs) and hopper MLA
    environment
    { timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_hopper_mla_gpu.py \
        tests/test_decode_step_example.py tests/test_custom_ops_gpu.py 2>&1 | tail -n 20
      echo "== automatic choice on this GPU (the measured performance table)"
      timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -k automatic tests/test_fp8_gemm_gpu.py \
        tests/test_hopper_gpu.py tests/test_mla_decode_gpu.py tests/test_triton_gpu.py 2>&1 | tail -n 12
      for backend in "" triton; do
        echo "== example --device cuda --cuda-graph ${backend:+--backend $backend}"
        timeout 120 python3 -m deepport.examples.deepseek_v3_decode_step --device cuda --cuda-graph \
          ${backend:+--backend $backend} 2>&1 | tail -n 25
      done; } > "$OUT/ecosystem.txt" 2>&1
    cat "$OUT/ecosystem.txt" ;;
  profile)  # ncu of the shapes that miss a target (issues 10 and 11): what limits each kernel, with the warp
             # stall reasons per issued instruction; one launch each after a warm-up call, the bench config's own
             # inputs (scripts/profile_call.py). The whole report lands in ncu_profile.txt; a digest is printed.
    environment
    stalls='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
    while read -r backend op config regex skip; do  # skip: launches of the kernel before the one profiled
      echo "== ncu $backend $op $config"
      timeout 100 ncu --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count 1 --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats --metrics "$stalls" \
        python3 scripts/profile_call.py --op "$op" --config "$config" --backend "$backend" --calls 1 2>&1 \
        | grep -v "^==PROF=="
    done > "$OUT/ncu_profile.txt" 2>&1 <<'SHAPES'
triton mla_decode b128_sq1_hq128_sk4096 mla_decode_split 1
triton fp8_gemm_nt m4096_n576_k7168 fp8_gemm_nt_kernel 1
triton fp8_gemm_nt m4096_n7168_k16384 fp8_gemm_nt_kernel 1
triton moe_combine_expanded t4096_h7168_top8_of_256 moe_token_rows_kernel 1
triton moe_dispatch_expanded t4096_h7168_top8_of_256 moe_expanded_rows_kernel 1
hopper fp8_gemm_nt m4096_n7168_k16384 sm90_fp8_gemm 1
hopper m_grouped_fp8_gemm_nt_contiguous g4_m8192_n4096_k7168 sm90_fp8_gemm 1
hopper m_grouped_fp8_gemm_nt_masked g4_m256_n7168_k2048 sm90_fp8_gemm 1
SHAPES
    grep -E "^== |Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Issue Slots Busy|highest-utilized|Registers Per|Achieved Occupancy|Spilling Requests  |issue_stalled_(barrier|long_scoreboard|short_scoreboard|wait|math_pipe_throttle|mio_throttle|lg_throttle|membar|sleeping|dispatch_stall|not_selected|selected|no_instruction|branch_resolving|tex_throttle|drain|imc_miss)_per" \
      "$OUT/ncu_profile.txt" | cut -c1-120 | head -n 260 ;;
  profile-mla)  # ncu speed-of-light of the hopper MLA kernel, compute- and memory-bound shapes
    for shape in compute memory; do
      echo "== ncu $shape"
      timeout 90 ncu --kernel-name regex:sm90_mla_decode --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
        python3 scripts/gpu_hopper_mla.py --stages profile --shape "$shape" 2>&1 | grep -v "^==PROF==" | tail -n 80
    done > "$OUT/ncu_mla.txt" 2>&1
    grep -E "==|Throughput|Pipe|Bandwidth|Duration|Utilization|Issue" "$OUT/ncu_mla.txt" | head -n 60 ;;
  parts-start)  # parts-start NAME...: the parts detached (setsid), so a part longer than one call (the
                # masked grouped GEMM: about 650 s on one H200) outlives it while the machine stays warm;
                # waits up to WAIT_S (default 540) s, then returns what ended. Finish with parts-collect.
    shift; dir=/tmp/deepport-parts; rm -rf "$dir"; mkdir -p "$dir/out"
    OUT="$dir/out" setsid nohup bash scripts/gpu_check.sh parts "${@:?parts-start NAME...}" > "$dir/script.log" 2>&1 \
      < /dev/null &
    echo $! > "$dir/pid"; echo "started: parts $* in $dir (pid $!)"
    collect_parts "${WAIT_S:-540}" ;;
  parts-collect)  # waits up to WAIT_S (default 560) s for parts-start's run, then copies what ended to $OUT
    collect_parts "${WAIT_S:-560}" ;;
  cpu-cert-start)  # a detached CPU certify: it outlives this call while the machine stays warm
    backends="${2:?cpu-cert-start BACKENDS [CERTIFY ARGS...]}"; shift 2; dir=/tmp/deepport-cpu-certify
    rm -rf "$dir"; mkdir -p "$dir"
    setsid nohup bash scripts/cpu_certify.sh "$backends" "$dir/out" "$@" > "$dir/script.log" 2>&1 < /dev/null &
    echo "started: scripts/cpu_certify.sh \"$backends\" in $dir (pid $!)" ;;
  cpu-cert-collect)
    dir=/tmp/deepport-cpu-certify
    if [ -f "$dir/out/verify.txt" ] && ! pgrep -f "scripts/cpu_certify.sh" > /dev/null; then
      tail -n 30 "$dir/script.log"; tar -czf "$OUT/cpu-certify.tar.gz" -C "$dir" out script.log
      echo "collected: $OUT/cpu-certify.tar.gz"
    else
      echo "not done yet:"; tail -n 5 "$dir/out/certify.log" 2>/dev/null || tail -n 5 "$dir/script.log" 2>/dev/null
      exit 1
    fi ;;
  tune)  # the tuning sweeps of code not yet measured on a GPU, one call (~5 min): the fused MoE dispatch
         # (rows gathered vs scattered), the combine's kernels (the per-token table, no sort) and the
         # low-latency dispatch per place_rows variant (scripts/gpu_moe_trace.py, each candidate checked bit for
         # bit first), the triton dense FP8 sweep (new 576 x 7168 and 7168 x 16384 candidates), and the GPU tests
    environment
    DEEPPORT_CHECK_VALUES=0 timeout 170 python3 scripts/gpu_moe_trace.py --rows-mode --combine --place \
      > "$OUT/moe_trace.txt" 2>&1; grep -E "BLOCK_C|rows |place |WRONG|us  " "$OUT/moe_trace.txt" | head -n 80
    timeout 60 python3 -m pytest -q tests/test_moe_one_process_expanded.py tests/test_triton_gpu.py 2>&1 | tail -n 3
    timeout 280 python3 scripts/gpu_triton_sweep.py --only fp8 --budget-s 240 --out "$OUT/triton-sweep" \
      > "$OUT/triton_sweep.txt" 2>&1; tail -n 60 "$OUT/triton_sweep.txt"
    tar -czf "$OUT/triton-sweep.tar.gz" -C "$OUT" triton-sweep 2>/dev/null && rm -rf "$OUT/triton-sweep" ;;
  moe-verify)  # the triton MoE kernels not yet run on a GPU (token table, low-latency layout and positions) and
               # the unzeroed one-process low-latency rows: GPU tests (each against torch), smoke certify of the MoE
               # ops, the combine/dispatch trace, then deepport bench of the single-GPU MoE configs
    environment
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_moe.py tests/test_moe_one_process_expanded.py \
      tests/test_triton_gpu.py tests/test_moe_gpu.py tests/test_decode_step_example.py > "$OUT/gpu_tests_moe.txt" 2>&1
    tail -n 8 "$OUT/gpu_tests_moe.txt"
    timeout 120 python3 -m deepport certify --device cuda --tier smoke --backend torch triton --op moe_layout \
      moe_dispatch_expanded moe_combine_expanded moe_low_latency_dispatch moe_low_latency_combine \
      --out "$OUT/smoke" > "$OUT/smoke.log" 2>&1; tail -n 12 "$OUT/smoke.log"
    DEEPPORT_CHECK_VALUES=0 timeout 120 python3 scripts/gpu_moe_trace.py --combine --place > "$OUT/moe_trace.txt" 2>&1
    grep -vE "^BLOCK_C" "$OUT/moe_trace.txt" | head -n 40
    timeout 150 python3 -m deepport bench --device cuda --op moe_dispatch_expanded moe_combine_expanded \
      moe_low_latency_dispatch moe_low_latency_combine --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    tail -n 30 "$OUT/bench.log"; cp "$OUT/bench/bench.json" "$OUT/bench_moe.json" 2>/dev/null; rm -rf "$OUT/bench" "$OUT/smoke" ;;
  peer-1gpu)
    environment
    for mode in "--stall rounds" "--stall fixed" "--loopback" "--moe"; do
      echo "== python3 -m tests.peer_cuda_one_gpu $mode" >> "$OUT/peer_1gpu.txt"
      # shellcheck disable=SC2086 # the mode is two words
      TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 timeout 300 \
        python3 -m tests.peer_cuda_one_gpu $mode >> "$OUT/peer_1gpu.txt" 2>&1; echo "exit $?" >> "$OUT/peer_1gpu.txt"
    done
    cat "$OUT/peer_1gpu.txt" ;;
  ep-host-1gpu)  # issue 14 on one GPU: the portable path's host path over real NCCL launches (a mirrored EP=2), the
    environment   # launch costs, the staged path's checks (two processes, stand-in transport), the MoE GPU tests
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 DEEPPORT_CHECK_VALUES=0
    step() { local name=$1 limit=$2; shift 2; local t=$SECONDS; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
             echo "$name: exit $? in $((SECONDS - t)) s"; }
    step mirror 200 python3 -m tests.mirror_cuda_host --calls 20 --timeline
    step nccl_launch 90 python3 -m tests.nccl_launch_host
    step staged_peer 200 python3 -m tests.staged_cuda_host --calls 10 --via peer
    step gpu_ep 130 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_torch_moe_ep.py tests/test_triton_moe.py \
      tests/test_hopper_peer_transport.py tests/test_moe_gpu.py
    grep -vE "Warning|_warn_once" "$OUT/mirror.txt" | head -n 75; tail -n 8 "$OUT/nccl_launch.txt"
    grep -E "checks|synchronizing" "$OUT/staged_peer.txt"; tail -n 3 "$OUT/gpu_ep.txt" ;;
  ll-1gpu)
    environment
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    timeout 240 python3 -m tests.peer_ll_loopback --calls 20 --profile ${LL_ARGS:-} > "$OUT/ll_loopback.txt" 2>&1
    echo "ll loopback: exit $?" >> "$OUT/ll_loopback.txt"; grep -vE "Warning|_warn_once" "$OUT/ll_loopback.txt" | tail -n 40 ;;
  ll-ncu)  # ncu of every kernel of the low-latency ops, each rank alone (tests/peer_ll_loopback.py --ncu):
    environment  # durations, speed of light, occupancy, warp stalls; the report in ll_ncu.txt, a digest printed
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    timeout 400 ncu --kernel-name "regex:moe_|dp_fixed" --launch-skip 40 --launch-count 20 --section SpeedOfLight \
      --section LaunchStats --section Occupancy --section WarpStateStats python3 -m tests.peer_ll_loopback --ncu \
      > "$OUT/ll_ncu.txt" 2>&1
    echo "ll ncu: exit $?" >> "$OUT/ll_ncu.txt"
    grep -E "^  [a-z_]+kernel|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|exit" \
      "$OUT/ll_ncu.txt" | head -n 200 ;;
  bench)
    environment
    python3 -m deepport bench --device cuda --out "$OUT/bench" 2>&1 | tail -n 80
    cp "$OUT/bench/bench.json" "$OUT/bench.json" 2>/dev/null; cp "$OUT/bench/bench.png" "$OUT/bench.png" 2>/dev/null
    rm -rf "$OUT/bench" ;;
  *) echo "unknown stage $stage (mla, fp8, moe-tests, cert-a, cert-b, part NAME, merge, parts-start, parts-collect, cpu-cert-start, cpu-cert-collect, hopper-mla, ecosystem, profile, profile-mla, bench, tune, moe-verify, backends, selection, peer-1gpu, ep-host-1gpu, ll-1gpu, ll-ncu)"; exit 2 ;;
esac
