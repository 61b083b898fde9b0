#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md, in one command on the lent H100/H200 (after the
# MLX CUDA wheels are installed: .gpu/py/stage.sh). Each configuration runs in its own process so
# peak memory is its own; each prints one JSON line, collected in OUT_DIR/results.jsonl.
#   bash scripts/gpu_bench.sh OUT_DIR [SET...]
#   SET: ours (the rows with targets in docs/performance.md; checkpointed runs use MLX command batches of 4 on CUDA, as the
#        trainer does) | preserve (DOP with more preservation prompts) | edit (the edit step, one same-size reference) | sync (synchronous checkpointed segments) | extra (no memory
#        limit, one evaluation, the elementwise RoPE, checkpointing in one graph, int8/int4,
#        1024², klein-9b bf16, the profile, the GEMM floor) | before (the committed code, copied to
#        .gpu/orig) | peers (diffusers+peft, torch.compile, mflux: .gpu/peers, after its
#        install_wheels.sh) | all (= ours extra before peers)
# The first run of a fresh machine also compiles MLX's fused kernels (about two minutes, more than a
# 130 s limit: the first row gets 300 s).
set -uo pipefail
out=${1:-/tmp/bench}; shift || true
sets=${*:-ours}
[ "$sets" = all ] && sets="ours extra before peers"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu.txt"
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__)' | tee -a "$out/gpu.txt"
run() {  # name, time limit (s), then the command
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep '^{' "$out/$name.log" | tail -n 1 | sed "s/^{/{\"run\": \"$name\", /" >> "$out/results.jsonl" || true
  echo "   rc=$rc $((SECONDS - t0))s $(grep '^{' "$out/$name.log" | tail -n 1 | cut -c1-300)"
  [ $rc -eq 0 ] || tail -n 5 "$out/$name.log"
}
B="python3 scripts/benchmark.py --steps ${STEPS:-10} --warmup ${WARMUP:-3}"
for s in $sets; do case $s in
ours)  # memory limit "auto" (TrainStep's default) unless "none"
  run k4_plain        300 $B --model klein-4b
  run ops_check       120 python3 scripts/ops_check.py  # every fast path (CUDA kernels included) vs its fallback
  run k4_plain_nolim  120 $B --model klein-4b --memory-limit none
  run k4_dop          120 $B --model klein-4b --mode dop
  run k4_dop_nolim    120 $B --model klein-4b --mode dop --memory-limit none
  run k4_ckpt         120 $B --model klein-4b --checkpointing 1
  run k4_int8_ckpt    120 $B --model klein-4b --base int8 --checkpointing 1
  run k4_int8_ckpt_sync 120 $B --model klein-4b --base int8 --checkpointing 1 --ahead 0
  run k9_int8_ckpt_sync 150 python3 scripts/benchmark.py --model klein-9b --base int8 --checkpointing 1 --ahead 0 --steps 4 --warmup 2
  run dev_int8_ckpt_sync 240 python3 scripts/benchmark.py --model dev --base int8 --checkpointing 1 --ahead 0 --steps 3 --warmup 2
  ;;
preserve)  # DOP alone vs DOP with loss.diff_output_preservation_prompts (3 prompts taking turns): what the extra prompts cost;
  # interleaved and the first pair repeated, so drift between rows shows
  run k4_dop          300 $B --model klein-4b --mode dop
  run k4_dop_prompts  150 $B --model klein-4b --mode dop --dop-prompts 3
  run k4_dop_ckpt     150 $B --model klein-4b --mode dop --checkpointing 1
  run k4_dop_ckpt_prompts 150 $B --model klein-4b --mode dop --checkpointing 1 --dop-prompts 3
  run k4_dop_2        150 $B --model klein-4b --mode dop
  run k4_dop_prompts_2 150 $B --model klein-4b --mode dop --dop-prompts 3
  ;;
edit)  # edit (image-to-image) training: 512² target + one 512² reference (--control 1), rank 32, beside the text-to-image step
  run k4_t2i_ckpt   300 $B --model klein-4b --checkpointing 1
  run k4_edit_ckpt  150 $B --model klein-4b --checkpointing 1 --control 1
  run k4_edit       150 $B --model klein-4b --control 1
  ;;
sync)  # checkpointed segments run one at a time (what the trainer picks when only that fits)
  run k4_ckpt_sync      120 $B --model klein-4b --checkpointing 1 --ahead 0
  run k4_int8_ckpt_sync 120 $B --model klein-4b --base int8 --checkpointing 1 --ahead 0
  run k9_int8_ckpt_sync 150 $B --model klein-9b --base int8 --checkpointing 1 --ahead 0
  run dev_int8_ckpt_sync 300 python3 scripts/benchmark.py --model dev --base int8 --checkpointing 1 --ahead 0 --steps 4 --warmup 3
  ;;
extra)
  run k4_ckpt_ops20   120 env MLX_MAX_OPS_PER_BUFFER=20 $B --model klein-4b --checkpointing 1
  run k4_int8_ckpt_g64 120 $B --model klein-4b --base int8 --checkpointing 1 --group-size 64
  run quant_gemm      120 python3 scripts/quant_gemm_bench.py
  run k4_ckpt_nolim   120 $B --model klein-4b --checkpointing 1 --memory-limit none
  run k4_onepiece     120 $B --model klein-4b --pipeline-ahead none
  run k4_rope_formula 120 env MFLUX2_CUDA_ROPE=0 $B --model klein-4b
  run k4_ckpt_graph   120 $B --model klein-4b --checkpointing 1 --no-blockwise
  run k4_int8         120 $B --model klein-4b --base int8
  run k4_int4_ckpt    120 $B --model klein-4b --base int4 --checkpointing 1
  run k4_1024         150 $B --model klein-4b --resolution 1024
  run k4_1024_ckpt    150 $B --model klein-4b --resolution 1024 --checkpointing 1
  run k9_plain        150 $B --model klein-9b
  run k4_profile      200 $B --model klein-4b --profile --memory-limit none
  [ -f .gpu/exp/gemm_floor.py ] && run gemm_floor 120 python3 .gpu/exp/gemm_floor.py
  ;;
before)  # the committed code (git archive HEAD mflux2 scripts/benchmark.py | tar -x -C .gpu/orig)
  O="python3 .gpu/orig/scripts/benchmark.py --steps ${STEPS:-10} --warmup ${WARMUP:-3}"
  run before_k4_plain 150 $O --model klein-4b
  run before_k4_dop   150 $O --model klein-4b --mode dop
  ;;
peers)
  P=.gpu/peers
  # "the strongest peer" of a row = the fastest of its variants here, so no row is compared with a
  # weaker peer than exists: per-block and whole-model torch.compile, with/without autocast,
  # max-autotune, flash attention where present
  run peer_torch_eager    180 python3 $P/torch_step.py
  run peer_torch_compile_blocks 300 python3 $P/torch_step.py --compile-blocks
  run peer_torch_compile  300 python3 $P/torch_step.py --compile
  run peer_torch_compile_bf16 300 python3 $P/torch_step.py --compile --no-autocast --dtype bf16
  run peer_torch_compile_autotune 420 python3 $P/torch_step.py --compile --compile-mode max-autotune-no-cudagraphs
  for be in flash _flash_3; do
    run peer_torch_compile_$be 300 python3 $P/torch_step.py --compile --attn-backend $be
  done
  run peer_torch_dop      180 python3 $P/torch_step.py --dop
  run peer_torch_compile_dop 300 python3 $P/torch_step.py --compile --dop
  run peer_torch_compile_ckpt 300 python3 $P/torch_step.py --compile --gradient-checkpointing
  run peer_mflux          180 python3 $P/mflux_step.py
  run peer_mflux_dop      180 python3 $P/mflux_step.py --dop
  ;;
*) echo "unknown set $s" >&2 ;;
esac; done
echo; cat "$out/results.jsonl"
