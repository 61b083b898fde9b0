#!/usr/bin/env bash
# Session 10's GPU calls (issue 33), one mode per call, back to back on one warm machine; every row
# has its own time limit and each result goes to $OUT as it comes (results.jsonl, log.txt).
#   peers (call 1, torch only, before MLX is installed): every compiled diffusers+peft variant
#         (whole model with and without autocast, max-autotune, attention backends, DOP, checkpointing)
#   ours  (call 2, after .gpu/py/stage.sh b): our rows, each with the CUDA kernels on and off, the
#         LoRA factors stored as they are (MFLUX2_FLAT_TRANSPOSED=0), the q/k/v change on (MFLUX2_QKV_PARTS=1), the frozen-scale RMS norm (MFLUX2_FAST_RMS_FROZEN=1),
#         the norm + RoPE kernel on (MFLUX2_CUDA_NORM_ROPE=1), all of them together,
#         the ops agreement check, the adapter types' steps (LoKr, LoHa, DoRA against LoRA; issue 32),
#         the masked step against the plain one and the masks' clutter ratio at 512 px (issue 31)
#   final (call 3): the strongest peers again beside our plain / DOP / checkpointed rows (the same
#         call), the kernel profile (ncu) of our step, the GEMMs and attention alone, klein-9b int8 +
#         checkpointing, dev int4 + checkpointing
# Run from the root of the checkout holding the code: [EXTRA="VAR=1 ..."] bash scripts/gpu_s10.sh MODE [PEERS_DIR]
set -uo pipefail
P=${2:-.gpu/peers}
. "$(dirname "$0")/gpu_rows.sh"  # OUT, BUDGET, left, run, machine_info, peer_wheels
B="env ${EXTRA:-} python3 scripts/benchmark.py --steps ${STEPS:-10} --warmup ${WARMUP:-3}"  # EXTRA: switches for every row (final)
[ -n "${DRY:-}" ] && B="python3 scripts/benchmark.py --steps 1 --warmup 1 --tiny"  # a CPU check of the plumbing
TS="python3 $P/torch_step.py"
OFF="env MFLUX2_CUDA_ROPE=0 MFLUX2_CUDA_DEQUANTIZE=0"  # our CUDA kernels off: the graph a Mac runs
PARTS="env MFLUX2_QKV_PARTS=1"  # q/k/v as one GEMM each (switch qkv_parts)
RMS="env MFLUX2_FAST_RMS_FROZEN=1"  # q/k's RMS norm without the frozen scale's gradient (switch rms_frozen)
NR="env MFLUX2_CUDA_NORM_ROPE=1"  # q/k's RMS norm + RoPE as one CUDA kernel each way (off by default until measured)
machine_info
case ${1:-} in
peers)
  peer_wheels "$P"
  run peer_compile        240 $TS --compile
  run peer_compile_ckpt   200 $TS --compile --gradient-checkpointing
  run peer_compile_dop    200 $TS --compile --dop
  run peer_compile_bf16   200 $TS --compile --no-autocast --dtype bf16
  run peer_compile_cudnn  150 $TS --compile --attn-backend _native_cudnn
  run peer_compile_flash  60 $TS --compile --attn-backend flash
  run peer_compile_flash3 60 $TS --compile --attn-backend _flash_3
  run peer_compile_native_flash 150 $TS --compile --attn-backend _native_flash
  run peer_compile_autotune 420 $TS --compile --compile-mode max-autotune-no-cudagraphs
  ;;
ours)
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  run k4_plain           300 $B --model klein-4b
  run k4_plain_flat_t0   100 env MFLUX2_FLAT_TRANSPOSED=0 $B --model klein-4b  # LoRA factors stored as they are: a layout copy per factor's gradient (the census's 120)
  run k4_adapters       150 python3 scripts/benchmark.py --model klein-4b --resolution 512 --rank 32 --targets attention --compare lora,lokr:4,loha,dora --steps 20
  run ops_check          200 python3 scripts/ops_check.py  # 90 s was not enough on a fresh H100 (kernel builds)
  run k4_plain_parts     100 $PARTS $B --model klein-4b
  run k4_plain_nr        100 $NR $B --model klein-4b
  run k4_plain_off       100 $OFF $B --model klein-4b
  run k4_plain_off_graph 100 $OFF $PARTS $RMS $B --model klein-4b  # the graph a Mac runs, every graph change on
  run k4_plain_all       100 $PARTS $RMS $NR $B --model klein-4b
  run k4_ckpt            100 $B --model klein-4b --checkpointing 1
  run k4_dop             100 $B --model klein-4b --mode dop
  run k4_int8_ckpt       100 $B --model klein-4b --base int8 --checkpointing 1
  run k4_masked         120 python3 scripts/benchmark.py --model klein-4b --masked-interleaved --steps 30 --warmup 4  # issue 31
  run masks_512          150 python3 scripts/datasets_eval.py masks --size 512 --steps 80 --seed 0 --draws 1 --no-gradient
  run k4_ckpt_off        100 $OFF $B --model klein-4b --checkpointing 1
  run k4_dop_off         100 $OFF $B --model klein-4b --mode dop
  run k4_int8_ckpt_off   100 $OFF $B --model klein-4b --base int8 --checkpointing 1
  run k4_plain_rms       100 $RMS $B --model klein-4b
  run k4_ckpt_nr         100 $NR $B --model klein-4b --checkpointing 1
  run k4_dop_nr          100 $NR $B --model klein-4b --mode dop
  run k4_ckpt_parts      100 $PARTS $B --model klein-4b --checkpointing 1
  run k4_dop_parts       100 $PARTS $B --model klein-4b --mode dop
  run k4_plain_off_parts 100 $OFF $PARTS $B --model klein-4b
  run k4_plain_2         100 $B --model klein-4b
  run k4_plain_parts_2   100 $PARTS $B --model klein-4b
  run k4_plain_nr_2      100 $NR $B --model klein-4b
  ;;
final)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
  echo "ncu: $NCU" | tee -a "$OUT/log.txt"
  run peer_compile       200 $TS --compile
  run k4_plain           120 $B --model klein-4b
  run peer_compile_ckpt  200 $TS --compile --gradient-checkpointing
  run k4_ckpt            120 $B --model klein-4b --checkpointing 1
  run peer_compile_dop   200 $TS --compile --dop
  run k4_dop             120 $B --model klein-4b --mode dop
  if [ -n "$NCU" ]; then
    l=$(left); [ "$l" -gt 150 ] && l=150
    echo "== ncu (limit $l s)" | tee -a "$OUT/log.txt"
    timeout "$l" "$NCU" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum,launch__grid_size \
      --csv --page raw --print-units base --log-file "$OUT/ncu-step.csv" \
      env ${EXTRA:-} python3 scripts/benchmark.py --model klein-4b --steps 3 --warmup 3 --memory-limit none --cuda-profile-step > "$OUT/ncu-run.log" 2>&1
    echo "   ncu rc=$? at $((SECONDS - T0)) s; $(grep -c '^"[0-9]' "$OUT/ncu-step.csv" 2>/dev/null) kernels" | tee -a "$OUT/log.txt"
    tail -n 3 "$OUT/ncu-run.log" | cut -c1-300 | tee -a "$OUT/log.txt"
    step_s=$(grep '"run": "k4_plain"' "$OUT/results.jsonl" | tail -n 1 | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["median_s_per_step"])' 2>/dev/null)
    python3 scripts/kernel_profile.py parse "$OUT/ncu-step.csv" ${step_s:+--step-s $step_s} --markdown > "$OUT/profile.txt" 2>&1
    head -c 3000 "$OUT/profile.txt"
  fi
  run k9_int8_ckpt       150 $B --model klein-9b --base int8 --checkpointing 1 --steps 4 --warmup 2
  run shapes             90 python3 scripts/kernel_profile.py shapes --model klein-4b
  grep '^{' "$OUT/row.log" >> "$OUT/shapes.jsonl" 2>/dev/null
  run k4_profile         90 $B --model klein-4b --profile --memory-limit none
  run dev_int4_ckpt      240 env ${EXTRA:-} python3 scripts/benchmark.py --model dev --base int4 --checkpointing 1 --ahead 0 --steps 3 --warmup 2
  ;;
*) echo "usage: gpu_s10.sh peers|ours|final [PEERS_DIR]" >&2; exit 2 ;;
esac
echo "done at $((SECONDS - T0)) s"
