#!/usr/bin/env bash
# Session 9's GPU calls (issue 34), one mode per call, made back to back on one warm machine. Every
# piece has its own time limit; every result goes to $OUT as JSON lines as it comes.
#   peers  (call 1, torch only, before MLX is installed; diffusers' wheels installed first):
#          text-encoder and VAE peers (phase_peers.py te-peer, vae-peer)
#   vae    (call 2, after .gpu/py/stage.sh b): ops_check, vae_profile, validation_benchmark, the
#          klein-4b folder, our loads and text encoding of it beside transformers'/safetensors'/diffusers'
#   jobs   (call 3): the klein-4b whole job (cold, then caches present), the VLM benchmark
#   dev    (call 4): the dev whole job (int8 folder)
# Run from this checkout's root: bash scripts/gpu_s9.sh MODE
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
K4=/tmp/job-klein-4b
t0=$SECONDS
step() {  # name, limit (s), command...: stdout (JSON lines) to $OUT/<file>, stderr to $OUT/log.txt
  local name=$1 limit=$2 file=$3; shift 3
  echo "== $name ($((SECONDS - t0)) s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" >> "$OUT/$file" 2>> "$OUT/log.txt"
  local rc=$?
  echo "   $name rc=$rc after $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  return 0
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; df -h /tmp /dev/shm | tail -n 2; free -g | head -2; } >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
case ${1:-} in
peers)
  step te_peer_random 100 peers.jsonl python3 "$HERE/phase_peers.py" te-peer
  step vae_peer_eager 100 peers.jsonl python3 "$HERE/phase_peers.py" vae-peer --vae-variants eager cudnn_benchmark
  step vae_peer_compile "${COMPILE_LIMIT:-150}" peers.jsonl python3 "$HERE/phase_peers.py" vae-peer --vae-variants compile
  ;;
vae)
  python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"))' | tee -a "$OUT/gpu.txt"
  step ops_check 120 ops_check.json python3 scripts/ops_check.py
  step vae_profile 200 vae_profile.jsonl python3 scripts/vae_profile.py --quick
  step validation 100 validation.json python3 scripts/validation_benchmark.py
  step write_klein4b 200 log.txt python3 -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import job_benchmark as j; j.write_klein_folders(Path('$K4'), '4B')"
  du -sh $K4/* >> "$OUT/log.txt" 2>&1
  step ours_load_te 150 loads.jsonl python3 scripts/phase_peers.py ours --folder "$K4/FLUX.2-klein-base-4B" --drop-caches
  step te_peer_files 100 loads.jsonl python3 scripts/phase_peers.py te-peer --folder "$K4/FLUX.2-klein-base-4B"
  step load_peer 100 loads.jsonl python3 scripts/phase_peers.py load-peer --folder "$K4/FLUX.2-klein-base-4B"
  ;;
jobs)
  ptx=$(ls -d /tmp/mlx/*/ptx 2>/dev/null | head -1); echo "ptx cache before: $(ls "$ptx" 2>/dev/null | wc -l) files" >> "$OUT/log.txt"
  step job_klein4b 330 job-klein-4b.json python3 scripts/job_benchmark.py --model klein-4b --work "$K4" --runs 2
  echo "ptx cache after: $(ls "$ptx" 2>/dev/null | wc -l) files" >> "$OUT/log.txt"
  tail -n 4 "$K4/run1/job.log" "$K4/run2/job.log" >> "$OUT/log.txt" 2>/dev/null
  rm -rf "$K4"
  [ "${VLM:-1}" = 1 ] && step vlm "${VLM_LIMIT:-150}" vlm.json python3 scripts/vlm_benchmark.py --random-4b --work /tmp/vlm
  rm -rf /tmp/vlm
  ;;
dev)
  rm -rf "$K4" /tmp/vlm
  work=/tmp/job-dev
  free_tmp=$(df -BG --output=avail /tmp | tail -1 | tr -dc 0-9)
  if [ "$free_tmp" -lt 56 ]; then work=/dev/shm/job-dev; fi  # the int8 folder is ~50 GB
  echo "dev work folder: $work (/tmp free ${free_tmp} GB)" | tee -a "$OUT/log.txt"
  # DEV_STEPS < 250 shortens the job (validation and checkpoints at its half and end): every phase
  # runs, the steps are fewer; the full job's wall is this one's plus (250 - DEV_STEPS) median steps
  short=(); s=${DEV_STEPS:-250}
  [ "$s" -lt 250 ] && short=(--set "training.max_steps=$s" --set "checkpoints.save_every=$((s / 2))" --set "validation.every_n_steps=$((s / 2))")
  step job_dev "${DEV_LIMIT:-520}" job-dev.json python3 scripts/job_benchmark.py --model dev --work "$work" --runs 1 "${short[@]}"
  for f in "$work"/run1/metrics.jsonl; do [ -f "$f" ] && grep phase "$f" > "$OUT/job-dev-phases.jsonl"; done
  tail -n 6 "$work/run1/job.log" >> "$OUT/log.txt" 2>/dev/null
  rm -rf "$work"
  ;;
*) echo "usage: gpu_s9.sh peers|vae|jobs|dev" >&2; exit 2 ;;
esac
echo "== done after $((SECONDS - t0)) s"
for f in "$OUT"/*.json*; do echo "--- $f"; cut -c1-400 "$f"; done
