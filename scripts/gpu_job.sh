#!/usr/bin/env bash
# On the GPU machine (after .gpu/py/stage.sh b): the ops agreement check, then the whole-job
# benchmark for the models named (default klein-4b), each JSON line and log under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 scripts/ops_check.py > "$OUT/ops_check.json" 2> "$OUT/ops_check.log"; echo "ops_check rc=$?"; cat "$OUT/ops_check.json"
for m in "${@:-klein-4b}"; do
  python3 scripts/job_benchmark.py --model "$m" --work "/tmp/job-$m" > "$OUT/job-$m.json" 2> "$OUT/job-$m.log"
  echo "job $m rc=$?"; cat "$OUT/job-$m.json"; tail -5 "$OUT/job-$m.log"
  rm -rf "/tmp/job-$m"  # the disk holds one model at a time
done
