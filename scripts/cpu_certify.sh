#!/usr/bin/env bash
# A CPU certificate of one backend: `deepport certify --certify` (the whole full tier, isolated, seeded
# from a nonce) on the cpu device, then `deepport verify` of the archive and `--replay 3`.
#
#   bash scripts/cpu_certify.sh BACKEND OUT_DIR [NONCE]
#
# Writes OUT_DIR/certificate-BACKEND-<UTC time>.tar.gz, OUT_DIR/certify.log (the run's console output),
# OUT_DIR/verify.txt (both verifications, with their exit codes and durations) and OUT_DIR/summary.md (the
# archive's own summary). Runs at `nice -n 10` (the full tier is hours of float64 GEMMs on a small
# CPU; the per-call limit is 3600 s for the same reason: a DeepSeek-V3 grouped GEMM case is about
# 2 TFLOP of float64 per call). Environment: PYTHON (default python3), NICE (default 10).
set -uo pipefail
backend="${1:?BACKEND OUT_DIR [NONCE]}"; out="${2:?BACKEND OUT_DIR [NONCE]}"; nonce="${3:-}"
py="${PYTHON:-python3}"; niceness="${NICE:-10}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
nonce_args=()
[ -n "$nonce" ] && nonce_args=(--nonce "$nonce")

start=$SECONDS
nice -n "$niceness" "$py" -m deepport certify --certify --backend "$backend" --device cpu --timeout 3600 \
  "${nonce_args[@]}" --out "$out/run" > "$out/certify.log" 2>&1
status=$?
echo "certify: exit $status after $((SECONDS - start)) s" | tee -a "$out/certify.log"
archive="$(ls -t "$out"/run/certificate-"$backend"-*.tar.gz 2>/dev/null | head -n 1)"
if [ -z "$archive" ]; then
  echo "no archive written (see $out/certify.log)"; exit 1
fi
mv "$archive" "$out/"
archive="$out/$(basename "$archive")"
rm -rf "$out/run"  # results.json, junit.xml, summary.md: all inside the archive

{
  for replay in 0 3; do
    args=("$archive"); [ "$replay" -gt 0 ] && args+=(--replay "$replay")
    echo "\$ deepport verify ${args[*]/#$out\//}"
    t0=$SECONDS
    nice -n "$niceness" "$py" -m deepport verify "${args[@]}" 2>&1
    echo "(exit $?, $((SECONDS - t0)) s)"
    echo
  done
} | tee "$out/verify.txt"
tar -xzOf "$archive" --wildcards '*/summary.md' > "$out/summary.md"
ls -l "$archive"
