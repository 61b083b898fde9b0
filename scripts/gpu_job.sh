#!/usr/bin/env bash
# On the GPU machine (after .gpu/py/stage.sh b): the ops agreement check, the step benchmark
# (and, with OLD=folder holding an older checkout's mflux2/ and scripts/, the same runs of that
# code: same machine, same call), then the whole-job benchmark for the models named (default
# klein-4b). Each JSON line and log goes under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 scripts/ops_check.py > "$OUT/ops_check.json" 2> "$OUT/ops_check.log"; echo "ops_check rc=$?"; cat "$OUT/ops_check.json"
bench() {  # name, then benchmark.py arguments; runs this checkout's code and, with OLD, the older one
  local name=$1; shift
  timeout 150 python3 scripts/benchmark.py --model klein-4b --steps 10 --warmup 3 "$@" 2>&1 | grep '^{' | sed "s/^{/{\"run\": \"new_$name\", /" >> "$OUT/bench.jsonl"
  if [ -n "${OLD:-}" ]; then
    (cd "$OLD" && timeout 150 python3 scripts/benchmark.py --model klein-4b --steps 10 --warmup 3 "$@" 2>&1) | grep '^{' | sed "s/^{/{\"run\": \"old_$name\", /" >> "$OUT/bench.jsonl"
  fi
  tail -n 2 "$OUT/bench.jsonl" | cut -c1-260
}
# the validation image's pieces (transformer forward, VAE decode/encode, PNG) at 512² and 1024²
timeout 300 python3 scripts/validation_benchmark.py > "$OUT/validation_bench.json" 2> "$OUT/validation_bench.log"; echo "validation_bench rc=$?"; cat "$OUT/validation_bench.json"
[ -n "${BENCH:-}" ] && bench plain
[ -n "${BENCH:-}" ] && bench dop_ckpt --mode dop --checkpointing 1
for m in "${@:-klein-4b}"; do
  timeout "${JOB_LIMIT:-3000}" python3 scripts/job_benchmark.py --model "$m" --work "/tmp/job-$m" --runs "${RUNS:-2}" > "$OUT/job-$m.json" 2> "$OUT/job-$m.log"
  echo "job $m rc=$?"; cat "$OUT/job-$m.json"; tail -5 "$OUT/job-$m.log"
  for r in run1 run2; do [ -f "/tmp/job-$m/$r/metrics.jsonl" ] && grep phase "/tmp/job-$m/$r/metrics.jsonl" > "$OUT/job-$m-$r-phases.jsonl"; done
  rm -rf "/tmp/job-$m"  # the disk holds one model at a time
done
exit 0
