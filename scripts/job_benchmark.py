"""The whole training job, timed phase by phase: `mflux2-train` on a shipped config, twice.

    python scripts/job_benchmark.py --model klein-4b     # on the GPU machine: full size, random weights
    python scripts/job_benchmark.py --model dev --runs 1  # dev from a converted int8 folder (disk)
    python scripts/job_benchmark.py --tiny               # this machine's CPU, the toy model, < 2 min

It writes a model folder in the exact diffusers layout of the FLUX.2 model the config names (random
weights: transformer/ sharded with its index, vae/, text_encoder/ = Qwen3 sharded, tokenizer/ with
the real vocabulary size, model_index.json), for klein both the klein-base folder that trains and
the distilled folder validation images come from (its weight files are hard links: same bytes, the
loader reads them again); a dataset shaped like diffusers/cat_toy_example (6 JPEGs at its sizes, no
captions); then runs the real CLI in a subprocess with only --model-path, --dataset, --output (and
model.validation_path for the distilled folder) overridden. The second run starts a new output
folder holding the first run's caches (latents, text embeddings, baseline images), so it skips the
text encoder, the VAE encoder and the baseline's rendering.

`--cached-env VAR=VALUE` adds a run with the caches per variable, with that variable set (a
whole-job A/B on one machine, e.g. MLX_USE_CUDA_GRAPHS=1); `--cached-only` skips the cold run and
reuses the caches an earlier invocation left in --work.

Prints a JSON line after each run, the last one the whole result (also in WORK/job_benchmark.json,
so a run cut off by a time limit keeps the runs that finished): for each run wall_s, phases
(name -> s), phase_peak_gb, peak_gb, steps, median_step_s, the share of the job that is not
training steps, and phases_sum_s (it must match wall_s: every second of the run is in a phase); and
`preflight_vs_measured`: the peak per phase that `mflux2-train --dry-run` predicted for the cold run
next to the one measured (they should agree within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mflux2 and tests/ from this checkout
from mflux2.models import text_encoder as te_mod  # noqa: E402
CONFIGS = {"klein-4b": "configs/cat-toy.yaml", "klein-9b": "configs/klein-9b-subject.yaml", "dev": "configs/dev-subject.yaml"}
# diffusers/cat_toy_example: 6 photos (1, 2, 3, 4, 6, 7.jpeg), no captions, these sizes (W x H)
CAT_TOY_SIZES = [(1121, 1022), (902, 846), (1147, 1231), (905, 1097), (1103, 1141), (1167, 1010)]
QWEN3_VOCAB = 151643  # regular tokens; the specials follow
# the released text encoders' language models (the fields that set shapes), as the plan weighs them
MISTRAL = te_mod.PRESET_CONFIGS["mistral-small-24b"]


def _qwen3_config(name: str) -> dict:
    """Qwen/Qwen3-4B's or -8B's config.json fields for klein-4b / klein-9b."""
    return {**{k: v for k, v in te_mod.PRESET_CONFIGS[te_mod.PRESET_OF[name]].items() if k != "model_type"},
            "torch_dtype": "bfloat16"}


# ------------------------------------------------------------------------------------------------
# A full-size model folder with random weights, in the diffusers layout


def _shapes_transformer(config: dict) -> dict[str, tuple]:
    import diffusers
    import torch

    with torch.device("meta"):
        m = diffusers.Flux2Transformer2DModel(**config)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _shapes_vae() -> tuple[dict[str, tuple], dict]:
    import diffusers
    import torch

    with torch.device("meta"):
        m = diffusers.AutoencoderKLFlux2()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}, dict(m.config)


def _shapes_qwen3(config: dict) -> dict[str, tuple]:
    import torch
    import transformers

    with torch.device("meta"):
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)  # a tied checkpoint has no lm_head
    return shapes


def _init(key: str, shape: tuple, rng):
    """Random weights a forward pass stays finite with: unit norms and BN variance, small rest."""
    import mlx.core as mx

    if key.endswith("running_var"):
        return mx.ones(shape, mx.float32)
    if key.endswith("num_batches_tracked"):
        return mx.zeros(shape, mx.int64)
    if key.endswith("running_mean"):
        return mx.zeros(shape, mx.float32)
    if "norm" in key and len(shape) == 1 and key.endswith("weight"):
        return mx.ones(shape, mx.bfloat16)
    if key.endswith("bias"):
        return mx.zeros(shape, mx.bfloat16)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return (mx.random.normal(shape, key=mx.random.key(rng.integers(1 << 31))) * (0.5 / fan_in**0.5)).astype(mx.bfloat16)


def _write_shards(folder: Path, shapes: dict[str, tuple], stem: str, index_name: str, shard_gb: float = 5.0, seed: int = 0):
    """Sharded safetensors + index.json, as `save_pretrained` writes them."""
    import mlx.core as mx

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups, cur, size = [], [], 0
    for k, s in shapes.items():
        n = int(np.prod(s)) * 2
        if cur and size + n > shard_gb * 1e9:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else f"{stem}.safetensors"
        arrays = {k: _init(k, shapes[k], rng) for k in keys}
        mx.eval(arrays)
        mx.save_safetensors(str(folder / name), arrays, metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({k: name for k in keys})
        del arrays
    if len(groups) > 1:
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _synthetic_bpe(vocab: int, first: list[str] = ()):
    """A byte-level BPE of exactly `vocab` entries (synthetic merges; the prompt words merged first,
    so prompts tokenize into a realistic mix), with `first` (special tokens) at ids 0, 1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = sorted(alphabet)
    vocab_map = {t: i for i, t in enumerate([*first, *tokens])}
    merges = []
    rng = np.random.default_rng(0)
    words = [w for w in "a photo of toy sitting on beach garden golden hour sks in the".split()]
    for w in words:
        for j in range(1, len(w)):
            a, b = w[:j], w[j]
            if a + b not in vocab_map and a in vocab_map:
                merges.append((a, b))
                vocab_map[a + b] = len(vocab_map)
    while len(vocab_map) < vocab:
        for i, j in (rng.random((65536, 2)) * len(tokens)).astype(np.int64):
            a, b = tokens[i], tokens[j]
            if len(vocab_map) >= vocab or a + b in vocab_map or len(a) + len(b) > 12:
                continue
            merges.append((a, b))
            vocab_map[a + b] = len(vocab_map)
            tokens.append(a + b)
    raw = Tokenizer(models.BPE(vocab=vocab_map, merges=merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return raw


def _qwen3_tokenizer(folder: Path, vocab: int = QWEN3_VOCAB) -> None:
    """The real Qwen3 vocabulary size (synthetic merges), its specials and chat template: loading
    and tokenizing cost what the real one does."""
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_tokenizers import QWEN3_ADDED, QWEN3_CHAT_TEMPLATE, QWEN3_SPECIALS

    raw = _synthetic_bpe(vocab)
    raw.add_special_tokens(QWEN3_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right", model_max_length=131072, chat_template=QWEN3_CHAT_TEMPLATE)
    tok.add_tokens(QWEN3_ADDED)
    tok.save_pretrained(str(folder))


def _mistral_tokenizer(folder: Path, vocab: int = MISTRAL["vocab_size"]) -> None:
    """Mistral Small 3.x's (tekken) vocabulary size, its control tokens at their ids, left padding
    and its chat template (system prompt first)."""
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_tokenizers import MISTRAL_CHAT_TEMPLATE, MISTRAL_SPECIALS

    raw = _synthetic_bpe(vocab, MISTRAL_SPECIALS)
    raw.add_special_tokens(MISTRAL_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left", model_max_length=131072,
                                  chat_template=MISTRAL_CHAT_TEMPLATE)
    tok.save_pretrained(str(folder))


def write_klein_folders(work: Path, size: str) -> tuple[Path, Path]:
    """klein-base (trains) and distilled klein (validation images) folders of klein-4b or klein-9b."""
    from mflux2.models.transformer import preset

    base, distilled = work / f"FLUX.2-klein-base-{size}", work / f"FLUX.2-klein-{size}"
    if (distilled / "model_index.json").exists():
        return base, distilled
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(distilled, ignore_errors=True)
    name = f"klein-{size.lower()}"
    t0 = time.time()
    tcfg = preset(name).to_dict()
    _write_shards(base / "transformer", _shapes_transformer(tcfg), "diffusion_pytorch_model",
                  "diffusion_pytorch_model.safetensors.index.json")
    (base / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel", **tcfg}, indent=1))
    vshapes, vcfg = _shapes_vae()
    _write_shards(base / "vae", vshapes, "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json", seed=1)
    (base / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLFlux2", **{
        k: list(v) if isinstance(v, tuple) else v for k, v in vcfg.items() if not k.startswith("_")}}, indent=1))
    qcfg = _qwen3_config(name)
    _write_shards(base / "text_encoder", _shapes_qwen3(qcfg), "model", "model.safetensors.index.json", seed=2)
    (base / "text_encoder" / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **qcfg}, indent=1))
    _qwen3_tokenizer(base / "tokenizer")
    (base / "scheduler").mkdir()
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "time_shift_type": "exponential"}))
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": False, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    (base / "model_index.json").write_text(json.dumps(index, indent=1))
    _link_tree(base, distilled)
    (distilled / "model_index.json").unlink()
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}, indent=1))
    print(f"wrote {base} and {distilled} in {time.time() - t0:.0f} s", file=sys.stderr)
    return base, distilled


def write_dev_folder(work: Path, quantize: str = "int8", tiny: bool = False) -> Path:
    """FLUX.2 dev with random weights as a folder written by scripts/convert.py (mflux2.json, MLX
    layout), the transformer and the Mistral encoder stored in `quantize`.

    Why not the diffusers layout: in bf16 dev's transformer (64 GB) and Mistral Small (48 GB) do not
    fit the GPU machine's 64 GiB disk; stored int8 they take 32 + 18 GB. The job still runs the real
    order from disk — encoder loaded, embeddings cached, encoder freed, then the transformer — through
    the loader a converted folder takes. The encoder folder holds the 30 of Mistral's 40 layers the
    loader reads (FLUX.2 takes hidden states 10, 20, 30; mflux2 never builds or reads the rest).
    `tiny`: the same code on small shapes (the CPU test)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from mflux2.model_files import MFLUX2_CONFIG, MFLUX2_FORMAT_VERSION, save_component
    from mflux2.models.quantization import QUANT_BITS, QUANT_GROUP_SIZE, quantize_outside_blocks, quantize_predicate
    from mflux2.models.transformer import Flux2Transformer, TransformerConfig, preset
    from mflux2.models.vae import Flux2VAE, VAEConfig

    root = work / f"FLUX.2-dev-{'tiny-' if tiny else ''}{quantize}"
    if (root / MFLUX2_CONFIG).exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    bits, group = QUANT_BITS[quantize], QUANT_GROUP_SIZE[quantize]

    def smaller(module):  # random weights a 56-block forward stays finite with (as _init's 0.5/sqrt(fan_in))
        module.update(tree_map(lambda w: w * 0.5 if w.ndim == 2 else w, module.parameters()))

    # transformer: quantized as the loader quantizes (the large layers outside the blocks, every block)
    tcfg = (TransformerConfig(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32,
                              in_channels=128, joint_attention_dim=192, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=True)
            if tiny else preset("dev"))
    model = Flux2Transformer(tcfg)
    model.set_dtype(mx.bfloat16)
    smaller(model)
    quantize_outside_blocks(model, bits, group, min_weights=0 if tiny else None)
    for kind in ("double_blocks", "single_blocks"):
        for block in model[kind]:
            nn.quantize(block, class_predicate=quantize_predicate(group, bits))
    save_component(model, root / "transformer", tcfg.to_dict())  # evaluated shard by shard
    del model

    vcfg = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4) if tiny else VAEConfig()
    vae = Flux2VAE(vcfg)
    vae.set_dtype(mx.bfloat16)
    vae.bn.update(tree_map(lambda a: a.astype(mx.float32), vae.bn.parameters()))
    from dataclasses import asdict

    save_component(vae, root / "vae", asdict(vcfg))
    del vae

    lm = {**MISTRAL, **(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=40, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=512) if tiny else {})}
    hf_cfg = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "text_config": lm,
              "torch_dtype": "bfloat16"}
    depth = max(te_mod.MISTRAL_LAYERS)
    enc, backbone = te_mod._build("mistral", te_mod._lm_config(hf_cfg, "mistral", root), depth)
    backbone.set_dtype(mx.bfloat16)
    smaller(backbone)
    nn.quantize(backbone, class_predicate=te_mod._quant_predicate(bits))
    prefix = "language_model.model."
    hf_cfg["quantization"] = {"group_size": 64, "bits": bits, "mode": "affine"}
    for path, m in backbone.named_modules():  # per-layer entries where a group size differs (as convert.py)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.group_size != 64:
            hf_cfg["quantization"][prefix + path] = {"group_size": m.group_size, "bits": m.bits}
    save_component([(prefix + k, v) for k, v in tree_flatten(backbone.parameters())], root / "text_encoder", hf_cfg)
    del enc, backbone
    _mistral_tokenizer(root / "tokenizer", lm["vocab_size"] if tiny else MISTRAL["vocab_size"])

    record = {"format": "mflux2", "version": MFLUX2_FORMAT_VERSION, "family": "dev", "variant": None if tiny else "dev",
              "source": "scripts/job_benchmark.py (random weights)", "source_layout": "diffusers", "dtype": "bfloat16",
              "transformer": {"quantization": {"name": quantize, "bits": bits, "group_size": group}},
              "text_encoder": {"quantization": {"name": quantize, "bits": bits, "group_size": 64}},
              "vae": {"quantization": None},
              "text_encoder_options": {"max_length": 512, "hidden_layers": list(te_mod.MISTRAL_LAYERS), "masked_rows": "zero"}}
    (root / MFLUX2_CONFIG).write_text(json.dumps(record, indent=2))
    mx.clear_cache()
    print(f"wrote {root} in {time.time() - t0:.0f} s", file=sys.stderr)
    return root


def _link_tree(src: Path, dst: Path) -> None:
    for p in src.rglob("*"):
        q = dst / p.relative_to(src)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, q)


def write_tiny_folders(work: Path) -> tuple[Path, Path]:
    """The bundled toy model (diffusers layout) as a klein-base folder and a distilled one."""
    base, distilled = work / "toy-base", work / "toy-distilled"
    for folder, distilled_flag in ((base, False), (distilled, True)):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(ROOT / "models" / "toy", folder)
        index = json.loads((folder / "model_index.json").read_text())
        index.update({"_class_name": "Flux2KleinPipeline", "is_distilled": distilled_flag})
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return base, distilled


def write_dataset(folder: Path, scale: float = 1.0) -> Path:
    """6 JPEGs at diffusers/cat_toy_example's sizes (`scale` shrinks them for --tiny), no captions."""
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in zip((1, 2, 3, 4, 6, 7), CAT_TOY_SIZES):
        w, h = max(32, int(w * scale)), max(32, int(h * scale))
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x / w, y / h, 1 - x / w], -1) * 160 + rng.integers(0, 60, (h, w, 3))
        cy, cx, r = h // 2, w // 2, min(w, h) // 4
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpeg", quality=90)
    return folder


# ------------------------------------------------------------------------------------------------
# The runs


def _cli(config: str, model: Path, validation_model: Path | None, dataset: Path, output: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "mflux2.training.cli", config, "--model-path", str(model), "--dataset", str(dataset),
           "--output", str(output), *extra]
    if validation_model is not None:
        cmd += ["--set", f"model.validation_path={validation_model}"]
    return cmd


# The dry run's memory phases (mflux2-train --dry-run) and the run's phases whose peaks they predict.
PREFLIGHT_PHASES = {"text-encoder cache": ("text encoder: load, embed, free",), "latent cache": ("latent cache",),
                    "training step": ("training steps", "first step (tracing, compiling)"),
                    "validation images": ("baseline validation", "validation*")}  # *: a prefix


def preflight_memory(*args) -> dict[str, float]:
    """The peak per phase `mflux2-train --dry-run` predicts for this job (GB)."""
    out = subprocess.run([*_cli(*args), "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):  # 1: it predicts the run does not fit, still a prediction
        raise SystemExit(f"dry run failed (exit {out.returncode}): {out.stderr[-2000:]}")
    names = "|".join(re.escape(k) for k in PREFLIGHT_PHASES)
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^\s*({names})\s+([\d.]+) GB", out.stdout, re.M)}


def compare_preflight(predicted: dict[str, float], measured: dict[str, float]) -> dict:
    """Predicted vs measured peak per dry-run phase; the measured peak of a phase is the largest of
    the run's phases it covers (every validation for "validation images")."""
    rows = {}
    for name, gb in predicted.items():
        peaks = [v for k, v in measured.items() if any(k == p or (p.endswith("*") and k.startswith(p[:-1])) for p in PREFLIGHT_PHASES[name])]
        if peaks:
            rows[name] = {"predicted_gb": gb, "measured_gb": round(max(peaks), 3),
                          "ratio": round(gb / max(peaks), 3) if max(peaks) > 0 else None}
    return rows


def run_job(config: str, model: Path, validation_model: Path | None, dataset: Path, output: Path, extra: list[str],
            env_extra: dict | None = None) -> dict:
    cmd = _cli(config, model, validation_model, dataset, output, extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5", **(env_extra or {})}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (output / "job.log").write_text(out.stdout + "\n" + out.stderr.replace("\r", "\n"))
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"job failed (exit {out.returncode}): {' '.join(cmd)}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phases, peaks = {}, {}
    for r in records:
        if "phase" in r:
            phases[r["phase"]] = phases.get(r["phase"], 0.0) + r["seconds"]  # one record per occurrence
            peaks[r["phase"]] = max(peaks.get(r["phase"], 0.0), r["peak_gb"])
    steps = [r for r in records if "step_time_s" in r]
    step_times = [r["step_time_s"] for r in steps]
    train = phases.get("training steps", 0.0)
    return {**_step_spread(records),
        "wall_s": round(wall, 2), "phases": {k: round(v, 3) for k, v in phases.items()},
        "phases_sum_s": round(sum(phases.values()), 2), "phase_peak_gb": peaks,
        "peak_gb": max(peaks.values(), default=0.0), "steps": len(steps),
        "median_step_s": round(float(np.median(step_times)), 4) if step_times else None,
        "not_steps_share": round(1 - train / wall, 4),
        "wall_over_250_median": round(wall / (len(steps) * float(np.median(step_times))), 3) if step_times else None,
        "log_tail": out.stderr.strip().splitlines()[-3:],
    }


def _step_spread(records: list[dict]) -> dict:
    """Where the steps' time above their median goes: the steps slower than twice the median (the
    first step, a new bucket's first step — a trace and compile of its own shape —, a step after a
    validation), each with its samples, and what all the others add above the median."""
    timed = [(r["step"], r["step_time_s"]) for r in records if "step_time_s" in r]
    if not timed:
        return {}
    med = float(np.median([t for _, t in timed]))
    samples = {r["step"]: r["samples"] for r in records if "samples" in r and "step" in r}
    slow = [{"step": st, "s": round(t, 3), "samples": samples.get(st)} for st, t in timed if t > 2 * med]
    rest = sum(t - med for _, t in timed if med < t <= 2 * med)
    return {"slow_steps": slow, "slow_steps_excess_s": round(sum(x["s"] - med for x in slow), 2),
            "other_steps_excess_s": round(rest, 2)}


def _emit(result: dict, work: Path) -> None:
    """The result so far, after each run: a line on stdout (the last one is the whole result) and
    work/job_benchmark.json, so a run cut off by a time limit keeps the runs it finished."""
    line = json.dumps(result)
    print(line, flush=True)
    (work / "job_benchmark.json").write_text(line + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(CONFIGS), default="klein-4b")
    ap.add_argument("--tiny", action="store_true", help="the toy model on the CPU, a shortened job (CI)")
    ap.add_argument("--work", default=None, help="where the model, data and outputs go (default: a folder in /tmp)")
    ap.add_argument("--runs", type=int, default=2, help="1: only the cold run; 2: also the run that reuses the caches")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for both runs (KEY=VALUE)")
    ap.add_argument("--cached-only", action="store_true",
                    help="skip the cold run: reuse the caches of an earlier invocation's cold run in --work")
    ap.add_argument("--cached-env", action="append", default=[], metavar="VAR=VALUE",
                    help="one more run with the caches per use, with this environment variable set (e.g. "
                         "MLX_USE_CUDA_GRAPHS=1): a whole-job A/B on one machine")
    ap.add_argument("--dev-quantize", choices=["int8", "int4"], default="int8",
                    help="dev: the precision its transformer and Mistral encoder are stored (and so trained) in")
    args = ap.parse_args(argv)
    cached_runs = [("cached", {})] if args.runs > 1 or args.cached_only else []
    for kv in args.cached_env:
        var, sep, value = kv.partition("=")
        if not sep or not var:
            ap.error(f"--cached-env {kv!r}: expected VAR=VALUE")
        cached_runs.append((f"cached {var}={value}", {var: value}))
    work = Path(args.work or f"/tmp/mflux2-job-{'tiny' if args.tiny else args.model}")
    work.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[args.model]
    # every step's time in metrics.jsonl (for the median); logging changes nothing else
    extra = ["--set", "training.log_every_n_steps=1"] + [x for s in args.set for x in ("--set", s)]
    if args.tiny:
        base, distilled = write_tiny_folders(work)
        dataset = write_dataset(work / "cat_toy", scale=0.06)
        # the same job, shortened (steps, cadence), at the toy's size; the toy is no klein-4b, so no name
        extra += ["--set", "model.name=null", "--max-steps", "6", "--save-every", "3", "--set", "validation.every_n_steps=3",
                  "--set", "memory.bucketing.resolutions=[64]",
                  "--set", "validation.prompts=[{prompt: a toy on a beach, apply_trigger: true, sizes: [64]}]"]
    else:
        if args.model == "dev":  # dev validates with itself (no distilled twin)
            base, distilled = write_dev_folder(work, args.dev_quantize), None
        else:
            base, distilled = write_klein_folders(work, args.model.split("-")[1].upper())
        dataset = write_dataset(work / "cat_toy")
    result = {"model": "toy" if args.tiny else args.model, "config": config, "date": time.strftime("%Y-%m-%d")}
    try:
        import mlx.core as mx

        result["device"] = mx.device_info().get("device_name", str(mx.default_device()))
    except Exception:  # noqa: BLE001 - informative only
        pass
    out1 = work / "run1"
    if args.cached_only:
        if not (out1 / ".latent_cache").is_dir():
            ap.error(f"--cached-only: {out1} holds no caches; run once without it first (same --work)")
    else:
        shutil.rmtree(out1, ignore_errors=True)
        predicted = preflight_memory(config, base, distilled, dataset, out1, extra)
        result["cold"] = run_job(config, base, distilled, dataset, out1, extra)
        # the dry run's memory figures are the ones the run uses; here they meet the measured peaks
        result["preflight_vs_measured"] = compare_preflight(predicted, result["cold"]["phase_peak_gb"])
        _emit(result, work)
    for i, (name, env_extra) in enumerate(cached_runs):
        out2 = work / f"run{i + 2}"
        shutil.rmtree(out2, ignore_errors=True)
        out2.mkdir()
        for cache in (".latent_cache", ".text_cache", ".baseline_cache"):  # all the caches a job keeps
            if (out1 / cache).is_dir():
                shutil.copytree(out1 / cache, out2 / cache)
        result[name] = run_job(config, base, distilled, dataset, out2, extra, env_extra)
        _emit(result, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
