#!/usr/bin/env bash
# Session 12's GPU calls (issues 33, 32, 34), one mode per call, back to back on one warm machine; every
# row has its own time limit and each result goes to $OUT as it comes (results.jsonl, log.txt), and to
# /tmp/gpu-s12/results.jsonl on the machine, which the later calls of the same machine read.
#   peers (call 1, torch only, before MLX is installed): the compiled diffusers+peft variants that were
#         the strongest (whole model + autocast: plain, checkpointed, DOP) and the cuDNN attention backend
#   ours  (call 2, after .gpu/py/stage.sh b): our plain step with today's defaults, the ops agreement
#         check (the new LayerNorm paths too), the norms probe, then one row per switch: the
#         modulation folded into MLX's LayerNorm (MFLUX2_FAST_MODULATE_LN=1), our CUDA LayerNorm
#         (MFLUX2_CUDA_LAYER_NORM=1), the norm + RoPE kernel (MFLUX2_CUDA_NORM_ROPE=1), the LoRA factors
#         stored as they are (MFLUX2_FLAT_TRANSPOSED=0), the fastest combination, the kernels off (the
#         graph a Mac runs) with and without the fold; checkpointed and DOP rows with the fastest switches
#   more  (call 3): checkpointed / DOP / int8 rows with today's defaults and with the fastest switches
#         of call 2, the adapter types interleaved (issue 32) and each alone for its peak, dev int4 +
#         checkpointing, klein-9b int8 + checkpointing
#   jobs  (call 4, issue 34): the validation pieces with and without the sampling memory bound, the VLM
#   job   (issue 34): the klein-4b cat-toy job, cold and with its caches
# Run from the root of the checkout: bash scripts/gpu_s12.sh MODE [PEERS_DIR]
# A CPU check of the plumbing: DRY=1 OUT=/tmp/o bash scripts/gpu_s12.sh ours
set -uo pipefail
KEEP=${KEEP:-/tmp/gpu-s12}  # rows of this machine's earlier calls (best() reads them)
P=${2:-.gpu/peers}
. "$(dirname "$0")/gpu_rows.sh"  # OUT, BUDGET, left, run, machine_info, peer_wheels
B="python3 scripts/benchmark.py --steps ${STEPS:-10} --warmup ${WARMUP:-3}"
[ -n "${DRY:-}" ] && B="python3 scripts/benchmark.py --steps 1 --warmup 1 --tiny"
TS="python3 $P/torch_step.py"
OFF="MFLUX2_CUDA_ROPE=0 MFLUX2_CUDA_DEQUANTIZE=0"  # our CUDA kernels off: the graph a Mac runs
MLN="MFLUX2_FAST_MODULATE_LN=1"  # the modulation as LayerNorm's weight and bias (every backend)
LNC="MFLUX2_CUDA_LAYER_NORM=1"   # our LayerNorm kernel pair (CUDA)
NR="MFLUX2_CUDA_NORM_ROPE=1"     # q/k's RMS norm + RoPE as one kernel each way (CUDA)
# the switches of the fastest plain row of this machine's calls so far (call 2), as VAR=1 words
best() {
  python3 - "$KEEP/results.jsonl" <<'EOF'
import json, sys
env = {"k4_plain": "", "k4_plain_mln": "MFLUX2_FAST_MODULATE_LN=1", "k4_plain_lnc": "MFLUX2_CUDA_LAYER_NORM=1",
       "k4_plain_nr": "MFLUX2_CUDA_NORM_ROPE=1", "k4_plain_nr_lnc": "MFLUX2_CUDA_NORM_ROPE=1 MFLUX2_CUDA_LAYER_NORM=1",
       "k4_plain_nr_mln": "MFLUX2_CUDA_NORM_ROPE=1 MFLUX2_FAST_MODULATE_LN=1"}
rows = {}
try:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r.get("run") in env and r.get("rc") == 0 and r.get("median_s_per_step"):
            rows.setdefault(r["run"], []).append(r["median_s_per_step"])
except FileNotFoundError:
    pass
print(env[min(rows, key=lambda k: min(rows[k]))] if rows else "")
EOF
}
machine_info
case ${1:-} in
peers)
  peer_wheels "$P"
  run peer_compile        200 $TS --compile
  run peer_compile_ckpt   180 $TS --compile --gradient-checkpointing
  run peer_compile_dop    150 $TS --compile --dop
  run peer_compile_cudnn  150 $TS --compile --attn-backend _native_cudnn
  ;;
ours)
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  run k4_plain           300 $B --model klein-4b
  run ops_check          200 python3 scripts/ops_check.py
  run norms               90 python3 scripts/kernel_profile.py norms
  cp "$OUT/row.log" "$OUT/norms.log" 2>/dev/null
  run k4_plain_mln       100 env $MLN $B --model klein-4b
  run k4_plain_lnc       100 env $LNC $B --model klein-4b
  run k4_plain_nr        100 env $NR $B --model klein-4b
  run k4_plain_nr_lnc    100 env $NR $LNC $B --model klein-4b
  run k4_plain_nr_mln    100 env $NR $MLN $B --model klein-4b
  run k4_plain_flat_t0   100 env MFLUX2_FLAT_TRANSPOSED=0 $B --model klein-4b  # the LoRA factors as they are: a copy per factor's gradient
  run k4_plain_off       100 env $OFF $B --model klein-4b
  run k4_plain_off_mln   100 env $OFF $MLN $B --model klein-4b
  run k4_plain_2         100 $B --model klein-4b
  run k4_plain_pa4       100 $B --model klein-4b --pipeline-ahead 4  # the host 4 pieces ahead instead of 2 (fewer waits, more memory)
  BEST=$(best); echo "best switches: '$BEST'" | tee -a "$OUT/log.txt"
  run k4_ckpt_best       100 env $BEST $B --model klein-4b --checkpointing 1
  run k4_dop_best        100 env $BEST $B --model klein-4b --mode dop
  ;;
more)
  BEST=$(best); echo "best switches: '$BEST'" | tee -a "$OUT/log.txt"
  run k4_plain_best      100 env $BEST $B --model klein-4b
  run k4_ckpt            100 $B --model klein-4b --checkpointing 1
  run k4_dop             100 $B --model klein-4b --mode dop
  run k4_int8_ckpt_best  100 env $BEST $B --model klein-4b --base int8 --checkpointing 1
  run k4_adapters        150 python3 scripts/benchmark.py --model klein-4b --resolution 512 --rank 32 --targets attention --compare lora,lokr:4,loha,dora --steps 20
  for a in lora lokr loha dora; do
    f=""; [ $a = lokr ] && f="--factor 4"
    run k4_peak_$a        60 $B --model klein-4b --adapter $a $f --memory-limit none
  done
  run dev_int4_ckpt      240 env $BEST python3 scripts/benchmark.py --model dev --base int4 --checkpointing 1 --ahead 0 --steps 3 --warmup 2
  run k9_int8_ckpt       150 env $BEST $B --model klein-9b --base int8 --checkpointing 1 --steps 4 --warmup 2
  ;;
jobs)
  run validation          200 python3 scripts/validation_benchmark.py
  run validation_noahead  200 env MFLUX2_SAMPLING_RUN_AHEAD=none python3 scripts/validation_benchmark.py
  # issue 34's VLM at full size: the default VLM's architecture with random 4-bit weights (mlx-vlm is
  # staged beside the MLX wheels and installed by stage.sh b without its dependencies)
  run vlm                 300 python3 scripts/vlm_benchmark.py --random-4b
  ;;
job)  # issue 34: the klein-4b cat-toy job, cold then with its caches (the cold run builds this machine's kernels)
  run job_klein4b         560 python3 scripts/job_benchmark.py --model klein-4b --work /tmp/job-k4 --runs 2
  cp /tmp/job-k4/*.json "$OUT/" 2>/dev/null
  ;;
*) echo "usage: gpu_s12.sh peers|ours|more|jobs|job [PEERS_DIR]" >&2; exit 2 ;;
esac
echo "done at $((SECONDS - T0)) s"
