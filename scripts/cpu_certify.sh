#!/usr/bin/env bash
# A CPU certificate of one backend: `deepport certify --certify` (the whole full tier, each backend isolated,
# seeded from a nonce) on the cpu device (or DEVICE), then `deepport verify` of the archive and `--replay 3` here.
#
#   bash scripts/cpu_certify.sh BACKEND OUT_DIR [CERTIFY ARGS...]     e.g. --nonce TEXT
#   bash scripts/cpu_certify.sh "reference torch" OUT_DIR               both in one run and one archive
#
# Writes into OUT_DIR: certificate-BACKEND-<UTC time>.tar.gz, machine.txt (cores, memory, CPU, a float64
# GEMM rate), certify.log (the run's console output and its duration), verify.txt (both verifications with
# exit codes and durations) and summary.md (the archive's own summary). Commit the folder as
# benchmarks/results/<date>-cpu-certify-BACKEND/ and name it in benchmarks/results/CERTIFICATES.md.
#
# What it needs (suite 2026.12.1, measured on a 2-core machine shared by other jobs): about 12 TFLOP of
# float64 GEMM per pass over the FP8 GEMM cases (the judge's oracle makes two passes, the reference backend
# two more), MLA decode about 20 min at ~10 GFLOP/s, and more than 20 GB of memory in the judging process
# for the largest MoE case (moe_dispatch_expanded/world1_fp8_t4096_h7168_top8_of_256_align128: 2.3e8
# outputs compared in float64). Hence a many-core host with >= 32 GB (the H200 machine's 16 cores and
# 128 GB) rather than a small CI runner. The per-call limit is 3600 s for the same reason.
# Environment: PYTHON (default python3), NICE (default 10), DEVICE (default cpu; DEVICE=cuda certifies on the
# GPU instead, e.g. the triton backend, whose interpreter is far too slow for the full tier on a CPU: started
# on the device machine with `DEVICE=cuda bash scripts/gpu_check.sh cpu-cert-start triton`, collected later).
#
# Rehearsal of the script itself in seconds (a test archive, never a certificate):
#   DEEPPORT_TEST_CERTIFY_TIER=smoke bash scripts/cpu_certify.sh reference /tmp/x --tier smoke --op mla_decode --case empty
set -uo pipefail
backend="${1:?BACKEND OUT_DIR [CERTIFY ARGS...]}"; out="${2:?BACKEND OUT_DIR [CERTIFY ARGS...]}"; shift 2
py="${PYTHON:-python3}"; niceness="${NICE:-10}"; device="${DEVICE:-cpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the commit the bench JSON records: the carried .git_revision (a copied tree's .git may be stale or absent)
if [ -f .git_revision ]; then export DEEPPORT_GIT_REVISION="$(cat .git_revision)"; fi
mkdir -p "$out"

{
  echo "host: $(uname -srm), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2 " GB memory, " $7 " GB available"}')"
  grep -m1 "model name" /proc/cpuinfo || true
  echo "deepport commit: $(cat .git_revision 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$py" - <<'EOF'
import time
import numpy as np
a = np.random.rand(2048, 2048)
a @ a
t = time.perf_counter(); a @ a; dt = time.perf_counter() - t
print(f"float64 GEMM 2048^3: {2 * 2048**3 / dt / 1e9:.1f} GFLOP/s (numpy)")
EOF
} 2>&1 | tee "$out/machine.txt"

start=$SECONDS
# shellcheck disable=SC2086 # BACKEND may name several backends ("reference torch": one oracle per case for both)
nice -n "$niceness" "$py" -m deepport certify --certify --backend $backend --device "$device" --timeout 3600 \
  --out "$out/run" "$@" > "$out/certify.log" 2>&1
status=$?
echo "certify: exit $status after $((SECONDS - start)) s" | tee -a "$out/certify.log"
tail -n 25 "$out/certify.log"
archive="$(ls -t "$out"/run/certificate-"${backend// /-}"-*.tar.gz 2>/dev/null | head -n 1)"
if [ -z "$archive" ]; then
  echo "no archive written (see $out/certify.log)"; exit 1
fi
mv "$archive" "$out/"
archive="$out/$(basename "$archive")"
rm -rf "$out/run"  # results.json, junit.xml, summary.md: all inside the archive

{
  for replay in 0 3; do
    args=("$archive"); [ "$replay" -gt 0 ] && args+=(--replay "$replay")
    echo "\$ deepport verify $(basename "$archive")${args[1]:+ ${args[*]:1}}"
    t0=$SECONDS
    nice -n "$niceness" "$py" -m deepport verify "${args[@]}" 2>&1
    echo "(exit $?, $((SECONDS - t0)) s)"
    echo
  done
} | tee "$out/verify.txt"
tar -xzOf "$archive" --wildcards '*/summary.md' > "$out/summary.md"
ls -l "$archive"
