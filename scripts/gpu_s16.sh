#!/usr/bin/env bash
# The next session's GPU calls, back to back on one warm machine; each row has its own time limit and
# goes to $OUT as it comes (results.jsonl, log.txt, shapes-*.txt).
#   stage (call 1): the first half of the MLX wheel only (.gpu/py/stage.sh a)
#   pad   (call 2, after .gpu/py/stage.sh b): the padded attention (MFLUX2_SDPA_PAD=1: sequences padded
#         to a multiple of 128, so cuDNN's attention backward runs instead of MLX's unfused one) against
#         the default, klein-4b at cat-toy's buckets (1,024, 1,008 and 960 image tokens + 512 text),
#         20 steps each: one cold process (kernels built), then default / padded / default / padded;
#         the same with checkpointing and with DOP at 576 × 448; klein-9b int8 + checkpointing at
#         576 × 448 (the unfused backward's scores grow with the square of the sequence); and each kind
#         of operation's first call at a new shape alone (scripts/first_calls.py)
#   job   (call 3, needs .gpu/peers carried for diffusers): issue 34's klein-4b cat-toy job, cold then
#         cached, then cached with MFLUX2_SDPA_PAD=1 (job_benchmark.json written after each run)
# Run from the root of the checkout: bash scripts/gpu_s16.sh MODE
set -uo pipefail
. "$(dirname "$0")/gpu_rows.sh"  # OUT, BUDGET, left, run, machine_info, peer_wheels
SH="512x512,576x448,640x384,512x512" SH2="512x512,576x448" SH1="576x448"
S="python3 scripts/benchmark.py --model klein-4b --shape-steps 20"
[ -n "${DRY:-}" ] && SH="64x64,80x48,64x64" SH2="64x64,80x48" SH1="80x48" && S="python3 scripts/benchmark.py --tiny --shape-steps 2"
machine_info
case ${1:-} in
stage) ;;
pad)
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  shapes() {  # name, limit, environment, benchmark arguments...
    local name=$1 limit=$2 e=$3; shift 3
    run $name $limit env $e sh -c "$S $* 2> $OUT/shapes-$name.txt"
  }
  shapes cold 220 MFLUX2_SDPA_PAD=0 --shapes $SH
  run first_calls 60 python3 scripts/first_calls.py ${DRY:+--tiny}  # which operations pay per new shape
  for i in 1 2; do
    shapes default_$i 60 MFLUX2_SDPA_PAD=0 --shapes $SH
    shapes pad_$i 60 MFLUX2_SDPA_PAD=1 --shapes $SH
  done
  for v in 0 1; do
    shapes ckpt_pad$v 90 MFLUX2_SDPA_PAD=$v --checkpointing 1 --shapes $SH2
    shapes dop_pad$v 90 MFLUX2_SDPA_PAD=$v --mode dop --shapes $SH2
  done
  for v in 0 1; do
    run k9_int8_ckpt_pad$v 120 env MFLUX2_SDPA_PAD=$v sh -c "python3 scripts/benchmark.py ${DRY:+--tiny} --model klein-9b --base int8 \
      --checkpointing 1 --shapes $SH1 --shape-steps 4 2> $OUT/shapes-k9-pad$v.txt"
  done
  ;;
job)
  peer_wheels .gpu/peers
  J="python3 scripts/job_benchmark.py --model klein-4b --work /tmp/job-k4 --runs 2 --cached-env MFLUX2_SDPA_PAD=1"
  [ -n "${DRY:-}" ] && J="python3 scripts/job_benchmark.py --tiny --work /tmp/job-k4 --runs 2 --cached-env MFLUX2_SDPA_PAD=1"
  run job_klein4b 560 $J
  cp /tmp/job-k4/job_benchmark.json "$OUT/job-klein4b.json" 2>/dev/null
  ;;
*) echo "usage: gpu_s16.sh stage|pad|job" >&2; exit 2 ;;
esac
echo "done at $((SECONDS - T0)) s"
