#!/usr/bin/env bash
# Session 14's GPU calls, back to back on one warm machine; each row has its own time limit and goes to
# $OUT as it comes (results.jsonl, log.txt).
#   stage (call 1): the first half of the MLX wheel only (.gpu/py/stage.sh a)
#   job   (call 2, after .gpu/py/stage.sh b): issue 34's klein-4b cat-toy job, cold then with its caches
#         (mflux2 runs MLX's CUDA backend without CUDA graphs unless MLX_USE_CUDA_GRAPHS is exported)
#   ab    (call 3): the cached job again without and with CUDA graphs (MLX_USE_CUDA_GRAPHS=1), a whole-job
#         A/B, and without cuDNN's attention (the first step of each shape); then issue 33's step rows,
#         graphs off (the default) and on, interleaved: plain, checkpointed, DOP; LoHa against a LoRA of
#         its product's rank; klein-9b int8 + checkpointing
#   te    (call 4): the text encoder's first prompt with and without cuDNN's attention
#   peers (call 1 instead of stage, torch only, before MLX is installed): the strongest checkpointed peer
#         on this card, then the plain and DOP ones as the budget allows
# Run from the root of the checkout: bash scripts/gpu_s14.sh MODE [PEERS_DIR]
set -uo pipefail
P=${2:-.gpu/peers}
. "$(dirname "$0")/gpu_rows.sh"  # OUT, BUDGET, left, run, machine_info, peer_wheels
B="python3 scripts/benchmark.py --steps ${STEPS:-15} --warmup ${WARMUP:-3}"
[ -n "${DRY:-}" ] && B="python3 scripts/benchmark.py --steps 1 --warmup 1 --tiny"
G1="MLX_USE_CUDA_GRAPHS=1"  # MLX's own default: the step's kernels batched into CUDA graphs
OFF="MFLUX2_CUDA_ROPE=0 MFLUX2_CUDA_DEQUANTIZE=0"  # our CUDA kernels off: the graph a Mac runs
machine_info
case ${1:-} in
stage) ;;
job)  # the cold run builds this machine's kernels (~3 min on a fresh one), so the job has a call of its own
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  J="python3 scripts/job_benchmark.py --model klein-4b --work /tmp/job-k4 --runs 2"
  [ -n "${DRY:-}" ] && J="python3 scripts/job_benchmark.py --tiny --work /tmp/job-k4 --runs 2"
  run job_klein4b        580 $J
  cp /tmp/job-k4/job_benchmark.json "$OUT/job-klein4b.json" 2>/dev/null
  ;;
ab)  # after `job` on the same machine: the cached job without and with CUDA graphs, and without cuDNN's
  # attention (MLX's own SDPA): do its per-shape plans make the first step of each token count cost
  # 8-10 s in a run whose kernels are all built? Then the step rows.
  NOSDPA="MLX_CUDA_USE_CUDNN_SDPA=0"
  J="python3 scripts/job_benchmark.py --model klein-4b --work /tmp/job-k4 --cached-only --cached-env $G1 --cached-env $NOSDPA"
  [ -n "${DRY:-}" ] && J="python3 scripts/job_benchmark.py --tiny --work /tmp/job-k4 --cached-only --cached-env $G1 --cached-env $NOSDPA"
  run job_klein4b_ab     330 $J
  cp /tmp/job-k4/job_benchmark.json "$OUT/job-klein4b-ab.json" 2>/dev/null
  run k4_plain_1         40 $B --model klein-4b
  run k4_plain_g1_1      40 env $G1 $B --model klein-4b
  run k4_plain_off       40 env $OFF $B --model klein-4b
  run k4_ckpt            50 $B --model klein-4b --checkpointing 1
  run k4_ckpt_g1         40 env $G1 $B --model klein-4b --checkpointing 1
  run k4_dop             50 $B --model klein-4b --mode dop
  run k4_dop_g1          40 env $G1 $B --model klein-4b --mode dop
  # issue 32: is LoHa (rank 16: a rank-256 product) as costly as a rank-256 LoRA, i.e. at its floor?
  run k4_loha_floor      80 python3 scripts/benchmark.py --model klein-4b --compare lora,loha,lora@256 --steps 20
  run k9_int8_ckpt      100 $B --model klein-9b --base int8 --checkpointing 1 --steps 4 --warmup 2
  run k4_plain_2         40 $B --model klein-4b
  run k4_plain_g1_2      40 env $G1 $B --model klein-4b
  ;;
te)  # after `job` on the same machine: the text encoder's first prompt (10.9 s in session 9) with and
     # without cuDNN's attention, with the loads beside it (phase_peers.py ours, every line kept)
  F=/tmp/job-k4/FLUX.2-klein-base-4B  # (DRY: --tiny, the toy model instead)
  for v in default nosdpa; do
    e=""; [ $v = nosdpa ] && e="MLX_CUDA_USE_CUDNN_SDPA=0"
    run te_ours_$v       120 env $e sh -c "python3 scripts/phase_peers.py ours --folder $F ${DRY:+--tiny} | tee $OUT/te-ours-$v.jsonl"
  done
  ;;
peers)
  peer_wheels "$P"
  run peer_compile_ckpt   150 python3 "$P/torch_step.py" --compile --gradient-checkpointing
  run peer_compile        150 python3 "$P/torch_step.py" --compile
  run peer_compile_dop    150 python3 "$P/torch_step.py" --compile --dop
  ;;
*) echo "usage: gpu_s14.sh stage|peers|job|ab|te [PEERS_DIR]" >&2; exit 2 ;;
esac
echo "done at $((SECONDS - T0)) s"
