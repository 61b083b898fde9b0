#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md, in one command on the lent H100/H200 (after the
# MLX CUDA wheels are installed: shared/tools/device-mlx-prepare.sh). Each configuration runs in its
# own process so peak memory is its own. Usage: bash scripts/gpu_bench.sh OUT_DIR [SET]
#   SET = ours (default) | peers | all | a space-separated list of "name:args" lines via $RUNS
set -uo pipefail
out=${1:-/tmp/bench}; set_=${2:-ours}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
run() {  # name, then the command
  local name=$1; shift
  echo "== $name: $*"
  timeout 300 "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$out/$name.log" | grep '^{' | sed "s/^{/{\"run\": \"$name\", /" >> "$out/results.jsonl" || true
  [ $rc -eq 0 ] || { echo "   rc=$rc"; tail -n 5 "$out/$name.log"; }
}
B="python3 scripts/benchmark.py --steps 10 --warmup 3"
if [ "$set_" = ours ] || [ "$set_" = all ]; then
  run k4_plain        $B --model klein-4b
  run k4_dop          $B --model klein-4b --mode dop
  run k4_plain_ckpt   $B --model klein-4b --checkpointing 1
  run k4_int8_ckpt    $B --model klein-4b --base int8 --checkpointing 1
  run k4_int8         $B --model klein-4b --base int8
  run k9_int8_ckpt    $B --model klein-9b --base int8 --checkpointing 1
  run dev_int8_ckpt   $B --model dev --base int8 --checkpointing 1 --steps 5 --warmup 2
fi
if [ "$set_" = peers ] || [ "$set_" = all ]; then
  P=.gpu/peers
  run peer_torch_eager    python3 $P/torch_step.py
  run peer_torch_compile  python3 $P/torch_step.py --compile-blocks
  run peer_torch_dop      python3 $P/torch_step.py --dop
  run peer_mflux          python3 $P/mflux_step.py
fi
cat "$out/results.jsonl"
