#!/usr/bin/env bash
# Session 15's GPU calls, back to back on one warm machine; each row has its own time limit and goes to
# $OUT as it comes (results.jsonl, log.txt, shapes-*.txt).
#   stage  (call 1): the first half of the MLX wheel only (.gpu/py/stage.sh a)
#   shapes (call 2, after .gpu/py/stage.sh b): what each new image shape's first step costs (a bucketed
#          job's step 2 took 8.5 s in a run whose kernels were all on disk): klein-4b, 512² then cat-toy's
#          other buckets, one process cold (kernels built), one warm, then without cuDNN's attention
#          (cold for MLX's own attention kernels, then warm); issue 32's LoHa against a LoRA of its
#          product's rank; the shapes with CUDA graphs
#   job    (call 3): klein-9b int8 + checkpointing (issue 33's target)
# Run from the root of the checkout: bash scripts/gpu_s15.sh MODE
set -uo pipefail
. "$(dirname "$0")/gpu_rows.sh"  # OUT, BUDGET, left, run, machine_info
B="python3 scripts/benchmark.py --steps ${STEPS:-15} --warmup ${WARMUP:-3}"
S="python3 scripts/benchmark.py --model klein-4b --shapes 512x512,576x448,448x576,640x384,512x512"
[ -n "${DRY:-}" ] && B="python3 scripts/benchmark.py --steps 1 --warmup 1 --tiny" \
  && S="python3 scripts/benchmark.py --tiny --shapes 64x64,80x48,48x80,64x64"
machine_info
case ${1:-} in
stage) ;;
shapes)
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  shapes() {  # name, limit, environment
    run shapes_$1 $2 env $3 sh -c "$S 2> $OUT/shapes-$1.txt"
  }
  shapes cold 220 MFLUX2_ROW=cold  # (a no-op variable: env needs one)
  shapes warm 80 MFLUX2_ROW=warm
  shapes nosdpa_cold 150 MLX_CUDA_USE_CUDNN_SDPA=0
  shapes nosdpa_warm 80 MLX_CUDA_USE_CUDNN_SDPA=0
  run k4_loha_floor 120 python3 scripts/benchmark.py --model klein-4b --compare lora,loha,lora@256 --steps 20 ${DRY:+--tiny}
  shapes graphs 80 MLX_USE_CUDA_GRAPHS=1
  ;;
job)  # (the job itself ran in a call of its own, as `gpu_s16.sh job` runs it: it needs the peer wheels)
  run k9_int8_ckpt 100 $B --model klein-9b --base int8 --checkpointing 1 --steps 4 --warmup 2
  ;;
*) echo "usage: gpu_s15.sh stage|shapes|job" >&2; exit 2 ;;
esac
echo "done at $((SECONDS - T0)) s"
