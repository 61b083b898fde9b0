# Sourced by the GPU session scripts (scripts/gpu_s10.sh, scripts/gpu_s12.sh): rows that share one
# call's time budget. `run NAME LIMIT CMD...` runs CMD with at most LIMIT seconds (less if the budget
# has less left, skipped under 20 s) and appends its last JSON line, tagged with the row's name, exit
# status and wall time, to $OUT/results.jsonl (and to $KEEP/results.jsonl when KEEP is set: a folder
# that outlives the call on a warm machine, so later calls can read earlier rows).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -n "${KEEP:-}" ] && mkdir -p "$KEEP"
T0=$SECONDS
BUDGET=${BUDGET:-570}  # seconds this call may use; a row gets at most what is left (minus 10 s)
left() { echo $((BUDGET - (SECONDS - T0) - 10)); }
run() {  # name, limit (s), command...: the last JSON line of its stdout -> results.jsonl
  local name=$1 limit=$2; shift 2
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 20 ]; then echo "-- $name skipped: $l s left" | tee -a "$OUT/log.txt"; return 0; fi
  echo "== $name (limit $limit s, at $((SECONDS - T0)) s): $*" | tee -a "$OUT/log.txt"
  local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/row.log" 2>&1
  local rc=$?
  local line; line=$(grep '^{' "$OUT/row.log" | tail -n 1 | sed "s/^{/{\"run\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t)), /")
  if [ -n "$line" ]; then
    echo "$line" >> "$OUT/results.jsonl"
    [ -n "${KEEP:-}" ] && echo "$line" >> "$KEEP/results.jsonl"
  fi
  echo "   rc=$rc $((SECONDS - t)) s $(grep '^{' "$OUT/row.log" | tail -n 1 | cut -c1-260)" | tee -a "$OUT/log.txt"
  [ $rc -eq 0 ] || tail -n 6 "$OUT/row.log" | cut -c1-400 | tee -a "$OUT/log.txt"
}
machine_info() {  # the date and the card, to $OUT/gpu.txt and the call's output
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } >> "$OUT/gpu.txt" 2>&1
  cat "$OUT/gpu.txt"
}
peer_wheels() {  # the peers' wheels staged in $1/wheels (diffusers and its few missing dependencies)
  python3 -m pip install -q --no-deps --no-index "$1"/wheels/*.whl 2>&1 | tail -n 3 | tee -a "$OUT/log.txt"
  python3 -c 'import torch, diffusers, peft; print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)' | tee -a "$OUT/gpu.txt"
}
