#!/usr/bin/env bash
# Session 13's GPU calls (issues 33, 32, 34), one mode per call, back to back on one warm machine; each
# row has its own time limit and goes to $OUT as it comes (results.jsonl, log.txt).
#   stage (call 1): nothing but the first half of the MLX wheel (.gpu/py/stage.sh a)
#   peer  (call 1 instead, torch only, before MLX is installed): the strongest peer's plain step (whole-model
#         torch.compile + autocast), for this card's ratio
#   graph (call 2, after .gpu/py/stage.sh b): how MLX batches the step's kernels into CUDA graphs —
#         the graph size (MLX_MAX_OPS_PER_BUFFER / MLX_MAX_MB_PER_BUFFER), no CUDA graphs, the step in
#         one evaluation instead of pieces — interleaved with the defaults; the checkpointed step's
#         small batches against larger ones (time and peak); the adapter types interleaved and each
#         one's peak (LoHa's split up-projection, DoRA's rescale); klein-9b int8
#   adapters (a short lease instead of graph): the adapter row and two peaks
#   job   (call 3, issue 34): the klein-4b cat-toy job, cold and with its caches
#   vlm   (call 4, issue 34): the default VLM's architecture with random 4-bit weights
# Run from the root of the checkout: bash scripts/gpu_s13.sh MODE [PEERS_DIR]
# A CPU check of the plumbing: DRY=1 OUT=/tmp/o bash scripts/gpu_s13.sh graph
set -uo pipefail
P=${2:-.gpu/peers}
. "$(dirname "$0")/gpu_rows.sh"  # OUT, BUDGET, left, run, machine_info, peer_wheels
B="python3 scripts/benchmark.py --steps ${STEPS:-15} --warmup ${WARMUP:-3}"
[ -n "${DRY:-}" ] && B="python3 scripts/benchmark.py --steps 1 --warmup 1 --tiny"
BIG="MLX_MAX_OPS_PER_BUFFER=250 MLX_MAX_MB_PER_BUFFER=20000"  # graphs of up to 250 kernels (MLX: < 255)
NOG="MLX_USE_CUDA_GRAPHS=0"  # every kernel launched on its own
machine_info
case ${1:-} in
stage) ;;
peer)
  peer_wheels "$P"
  run peer_compile        220 python3 "$P/torch_step.py" --compile
  ;;
graph)
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  run k4_plain           300 $B --model klein-4b
  round() {  # the graph rows and the defaults, interleaved
    local i=$1
    run k4_plain_big_$i     60 env $BIG $B --model klein-4b
    run k4_plain_nog_$i     60 env $NOG $B --model klein-4b
    run k4_plain_one_$i     60 $B --model klein-4b --pipeline-ahead none
    run k4_plain_bigone_$i  60 env $BIG $B --model klein-4b --pipeline-ahead none
    run k4_plain_def_$i     60 $B --model klein-4b
  }
  round 1
  # issue 32: LoHa's rank-r² path now split per part as LoRA's (interleaved with the others), peaks alone
  run k4_adapters       150 python3 scripts/benchmark.py --model klein-4b --resolution 512 --rank 32 --targets attention --compare lora,lokr:4,loha,dora --steps 20
  for a in lora loha dora; do
    run k4_peak_$a        60 $B --model klein-4b --adapter $a --memory-limit none
  done
  round 2
  run k4_ckpt            60 $B --model klein-4b --checkpointing 1
  run k4_ckpt_ops20      60 env MLX_MAX_OPS_PER_BUFFER=20 $B --model klein-4b --checkpointing 1
  run k4_ckpt_ops100     60 env MLX_MAX_OPS_PER_BUFFER=100 $B --model klein-4b --checkpointing 1
  run k4_ckpt_big        60 env $BIG $B --model klein-4b --checkpointing 1
  run k9_int8_ckpt      120 $B --model klein-9b --base int8 --checkpointing 1 --steps 4 --warmup 2
  run k9_int8_ckpt_ops20 60 env MLX_MAX_OPS_PER_BUFFER=20 $B --model klein-9b --base int8 --checkpointing 1 --steps 4 --warmup 2
  ;;
adapters)  # a short lease: issue 32's interleaved row, then the peaks of LoRA and DoRA
  run k4_adapters       200 python3 scripts/benchmark.py --model klein-4b --resolution 512 --rank 32 --targets attention --compare lora,lokr:4,loha,dora --steps 20
  for a in lora dora; do
    run k4_peak_$a        40 $B --model klein-4b --adapter $a --memory-limit none
  done
  ;;
job)  # the klein-4b cat-toy job, cold then with its caches (the cold run builds this machine's kernels)
  run job_klein4b        580 python3 scripts/job_benchmark.py --model klein-4b --work /tmp/job-k4 --runs 2
  cp /tmp/job-k4/*.json "$OUT/" 2>/dev/null
  ;;
vlm)
  run vlm                580 python3 scripts/vlm_benchmark.py --random-4b
  ;;
*) echo "usage: gpu_s13.sh stage|peer|graph|adapters|job|vlm [PEERS_DIR]" >&2; exit 2 ;;
esac
echo "done at $((SECONDS - T0)) s"
