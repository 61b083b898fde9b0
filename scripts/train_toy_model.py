"""Train the toy FLUX.2 model shipped in models/toy from scratch (docs/toy-model.md).

    python scripts/train_toy_model.py --out models/toy            # everything, ~25 min on 2 CPU cores
    python scripts/train_toy_model.py --out models/toy --stage eval

A complete FLUX.2 klein-base model in miniature, written in the diffusers folder layout by diffusers'
own `Flux2KleinPipeline.save_pretrained`, so it exercises the same loaders as the real models:

1. tokenizer — a byte-level BPE (Qwen3's special tokens and chat template) whose merges make every
   toy word, the trigger word `sks` included, a single token;
2. text encoder — a random, frozen Qwen3 (28 layers so the real hidden-state taps 9/18/27 exist);
   prompts steer the images because the transformer learns to read its token features;
3. VAE — AutoencoderKLFlux2 with 4 levels (8x down), 32 latent channels, trained on the toy images
   (all shapes, the subject's star included: a VAE is a general image codec), then the batch-norm
   statistics of the patchified latents;
4. transformer — Flux2Transformer2DModel (2 double + 2 single blocks, hidden 64), flow matching on
   the training split with 10% empty captions (for CFG) and 20% captions that say "shape" instead of
   the shape's name (the class word of the quickstart's DOP);
5. evaluation — images generated through mflux2's Flux2Pipeline from the saved folder, scored by
   tests/toy_shapes.py on held-out and training prompts; a sample grid for the docs.

Training runs in PyTorch on the CPU: MLX's Linux CPU build uses the reference BLAS (a 1024^3 matmul
runs at ~6 GFLOP/s here against ~50 for PyTorch), so PyTorch is the faster trainer on this machine;
the result is checked through the MLX loaders. Deterministic from --seed up to float summation order.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_toy_data as toy  # noqa: E402

TRIGGER = "sks"  # the quickstart's trigger word (a single token of this tokenizer)
SIZE = 64
VOCAB = 512
QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16)
# One GroupNorm group: with few channels, more groups normalise each channel on its own and wash out
# the absolute colour of flat regions (the VAE then barely learns colours).
VAE = dict(block_out_channels=(16, 16, 32, 64), layers_per_block=1, norm_num_groups=1, latent_channels=32)
TRANSFORMER = dict(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=32, mlp_ratio=3.0,
                   axes_dims_rope=(8, 8, 8, 8))
P_EMPTY, P_GENERIC = 0.1, 0.2  # caption dropout (CFG's unconditional) and "shape" instead of the name
# Sampling settings the toy model is evaluated with (the pipeline's klein-base defaults are 50 steps at
# guidance 4.0, which over-saturates a model this small: see docs/toy-model.md)
STEPS, GUIDANCE = 20, 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# 1. Tokenizer and text encoder


def tokenizer_corpus() -> list[str]:
    """Every caption word many times (so each becomes one merged token), plus a little general text."""
    from tests.tiny_tokenizers import _CORPUS

    words = list(toy.COLOURS) + list(toy.SHAPES) + list(toy.SUBJECTS) + [toy.CLASS_WORD, TRIGGER, "background", "on"]
    lines = [toy.caption(c, s, b) for c, s, b in toy.all_combos(toy.SHAPES + toy.SUBJECTS + (toy.CLASS_WORD, TRIGGER))]
    return lines * 4 + [" ".join(words)] * 20 + _CORPUS


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tests.tiny_tokenizers import QWEN3_ADDED, QWEN3_CHAT_TEMPLATE, QWEN3_SPECIALS

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(QWEN3_ADDED), special_tokens=QWEN3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right", model_max_length=131072, chat_template=QWEN3_CHAT_TEMPLATE)
    tok.add_tokens(QWEN3_ADDED)
    tok.save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    for w in ("red", "circle", "background", toy.CLASS_WORD, TRIGGER, "star"):
        n = len(tok(" " + w)["input_ids"])
        if n != 1:
            raise RuntimeError(f"tokenizer: {w!r} is {n} tokens; the corpus should make it one")
    return tok


def build_text_encoder(seed: int):
    """A random Qwen3. Its token embeddings are widened to std 1 so the hidden states are dominated
    by the tokens themselves (the random layers add a little context on top)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=True,
                                   rope_theta=1_000_000.0, **QWEN)
    te = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        te.model.embed_tokens.weight.normal_(0.0, 1.0)
    return te


def encode_prompts(model_dir: Path, prompts: list[str]) -> dict[str, np.ndarray]:
    """Prompt embeddings [512, 96] exactly as mflux2's pipeline computes them (bf16 text encoder)."""
    import mlx.core as mx

    from mflux2.models.text_encoder import load_text_encoder

    te = load_text_encoder(model_dir, "qwen3", dtype=mx.bfloat16)
    out = {}
    for i in range(0, len(prompts), 16):
        chunk = prompts[i : i + 16]
        embeds, _ = te.encode(chunk)
        for p, e in zip(chunk, np.asarray(embeds.astype(mx.float32))):
            out[p] = e
    return out


# ------------------------------------------------------------------------------------------------
# 2. VAE


def warmup_cosine(steps: int):
    """LR factor: linear warm-up over the first 5% of steps, then cosine down to 10%."""
    warm = max(steps // 20, 1)
    return lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s / steps, 1.0))))


def images_array(items) -> np.ndarray:
    """[N, 3, H, W] float32 in [-1, 1]."""
    return np.stack([np.asarray(toy.render(it, SIZE), np.float32).transpose(2, 0, 1) / 127.5 - 1.0 for it in items])


def train_vae(seed: int, steps: int, batch: int, lr: float, kl: float):
    import diffusers
    import torch

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(**VAE)
    with torch.no_grad():
        # Residual branches start as identities (zero last layer): the shallow path learns first, ~3x
        # faster convergence here. The posterior starts narrow (std ~0.14).
        for name, m in vae.named_modules():
            if name.endswith(("conv2", "to_out.0")):
                m.weight.zero_()
                m.bias.zero_()
        vae.quant_conv.bias[VAE["latent_channels"]:] = -4.0
    items = toy.sample_items(seed + 1, 2048, SIZE, toy.SHAPES + toy.SUBJECTS, "all")
    data = torch.from_numpy(images_array(items))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    g = torch.Generator().manual_seed(seed + 2)
    vae.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + 0.3 * post.std * torch.randn(post.mean.shape, generator=g)  # softened sampling
        rec = vae.decode(z).sample
        loss_rec = torch.mean((rec - x) ** 2) + 0.1 * torch.mean(torch.abs(rec - x))
        loss_kl = 0.5 * torch.mean(post.mean**2 + post.var - 1.0 - post.logvar)
        loss = loss_rec + kl * loss_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps}: rec {loss_rec.item():.5f} kl {loss_kl.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    return vae


def unpatchify(tokens, vae):
    """Normalised tokens [B, 16, 128] -> VAE latents [B, 32, 8, 8] (inverse of `latent_tokens`)."""
    import torch

    b, n, c = tokens.shape
    h = w = int(math.isqrt(n))
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
    x = (tokens * std + vae.bn.running_mean).transpose(1, 2).reshape(b, c, h, w)
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def patchify(latents):
    """[B, 32, h, w] -> [B, 128, h/2, w/2] (diffusers' `_patchify_latents`)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def round_to(module, dtype):
    """Round a module's floating-point weights through `dtype` (what the shipped files hold)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())


def latent_tokens(vae, images: np.ndarray, set_bn: bool):
    """Posterior means of `images`, patchified -> tokens [N, 16, 128] normalised by the BN
    statistics; with `set_bn`, the statistics are first computed from these latents."""
    import torch

    with torch.no_grad():
        lat = torch.cat([vae.encode(torch.from_numpy(images[i : i + 256])).latent_dist.mean
                         for i in range(0, len(images), 256)])
        p = patchify(lat)  # [N, 128, 4, 4]
        if set_bn:
            vae.bn.running_mean.copy_(p.mean(dim=(0, 2, 3)))
            vae.bn.running_var.copy_(p.var(dim=(0, 2, 3)))
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        p = (p - mean) / std
    return p.flatten(2).transpose(1, 2).contiguous()  # row-major tokens, as mflux2's pack


# ------------------------------------------------------------------------------------------------
# 3. Transformer


def time_shift(mu: float, t):
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def train_transformer(tokens, captions: list[str], embeds: dict[str, np.ndarray], seed: int,
                      phases: list[tuple[int, int, int]], lr: float, ema_decay: float, vae=None, preview_every: int = 0):
    """Flow matching: x_t = (1-t)·x0 + t·noise, the model predicts v = noise - x0 (t = sigma in [0, 1]).

    `phases`: (steps, batch, text tokens) run in order under one LR schedule. The text encoder is
    causal with right padding, so the first k positions of a 512-token embedding are exactly what a
    k-token prompt gives: a short first phase learns the prompt words ~10x faster (the 512 text tokens
    are 97% of the compute next to 16 image tokens), the final phase at the real 512 tokens teaches the
    model the padding it meets in the pipeline and the trainer."""
    import copy

    import diffusers
    import torch

    torch.manual_seed(seed)
    ctx = 3 * QWEN["hidden_size"]
    model = diffusers.Flux2Transformer2DModel(in_channels=128, out_channels=128, joint_attention_dim=ctx,
                                              timestep_guidance_channels=256, rope_theta=2000, guidance_embeds=False,
                                              **TRANSFORMER)
    ema = copy.deepcopy(model).requires_grad_(False)
    prompts = sorted(embeds)
    table = torch.from_numpy(np.stack([embeds[p] for p in prompts]))  # [P, 512, ctx]
    index = {p: i for i, p in enumerate(prompts)}
    exact = torch.tensor([index[c] for c in captions])
    generic = torch.tensor([index[generic_caption(c)] for c in captions])
    empty = index[""]
    n_txt = table.shape[1]
    txt_ids = torch.zeros(n_txt, 4)
    txt_ids[:, 3] = torch.arange(n_txt)
    h = w = SIZE // 16
    img_ids = torch.zeros(h * w, 4)
    img_ids[:, 1] = torch.arange(h * w) // w
    img_ids[:, 2] = torch.arange(h * w) % w

    total = sum(p[0] for p in phases)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    t0, step, history = time.time(), 0, []
    for n_steps, batch, text_len in phases:
        smooth = None
        for _ in range(n_steps):
            step += 1
            idx = torch.randint(len(tokens), (batch,), generator=g)
            x0 = tokens[idx]
            u = torch.rand(batch, generator=g)
            which = torch.where(u < P_EMPTY, torch.full_like(idx, empty),
                                torch.where(u < P_EMPTY + P_GENERIC, generic[idx], exact[idx]))
            ctx_emb = table[which, :text_len]
            # timesteps: half uniform, half shifted towards noise like the sampling schedule (mu ~1.6 at 16 tokens)
            t = torch.rand(batch, generator=g).clamp(1e-4, 1 - 1e-4)
            t = torch.where(torch.rand(batch, generator=g) < 0.5, time_shift(1.6, t), t)
            noise = torch.randn(x0.shape, generator=g)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            pred = model(hidden_states=xt, encoder_hidden_states=ctx_emb, timestep=t, img_ids=img_ids,
                         txt_ids=txt_ids[:text_len], guidance=None, return_dict=False)[0]
            loss = torch.mean((pred - (noise - x0)) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(d).add_(pm, alpha=1 - d)
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            if step % 100 == 0 or step == total:
                history.append((step, round(smooth, 5)))
                log(f"transformer step {step}/{total} (text {text_len}, batch {batch}): loss {smooth:.4f} ({time.time() - t0:.0f} s)")
            if vae is not None and ((preview_every and step % preview_every == 0) or step == total):
                for split in ("heldout", "train"):
                    r = preview(ema, vae, table, index, text_len, preview_combos(split), seed=step)
                    log(f"  preview ({split}, EMA, text {text_len}): colour {r['colour']:.2f} shape {r['shape']:.2f} "
                        f"background {r['background']:.2f} all {r['all']:.2f}")
    return ema.eval(), history


def preview(model, vae, table, index, text_len: int, combos, seed: int = 0, steps: int = STEPS, cfg: float = GUIDANCE) -> dict:
    """Quick prompt-following check during training: CFG Euler sampling in PyTorch (the schedule of
    mflux2.sampling), decoded by the VAE and scored by tests/toy_shapes.py. One image per combo."""
    import torch
    from PIL import Image

    from mflux2.sampling import get_sigmas
    from tests import toy_shapes

    n = len(combos)
    cond = table[[index[toy.caption(*c)] for c in combos], :text_len]
    uncond = table[[index[""]] * n, :text_len]
    txt_ids = torch.zeros(text_len, 4)
    txt_ids[:, 3] = torch.arange(text_len)
    hw = SIZE // 16
    img_ids = torch.stack([torch.zeros(hw * hw), torch.arange(hw * hw) // hw, torch.arange(hw * hw) % hw, torch.zeros(hw * hw)], 1)
    x = torch.randn(n, hw * hw, 128, generator=torch.Generator().manual_seed(seed))
    sigmas = get_sigmas(steps, hw * hw)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((2 * n,), s0)
            v = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([cond, uncond]), timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
            v = v[n:] + cfg * (v[:n] - v[n:])
            x = x + (s1 - s0) * v
        images = vae.decode(unpatchify(x, vae)).sample.clamp(-1, 1)
    model.train(was_training)
    pils = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for im in images]
    return {**toy_shapes.score(pils, combos), "images": pils}


def preview_combos(split: str) -> list[tuple[str, str, str]]:
    """The 9 held-out combinations, or 9 training ones spread over shapes and colours."""
    combos = toy.combos_for(split)
    return combos if split == "heldout" else [combos[(i * 37) % len(combos)] for i in range(9)]  # 37 ⟂ 81: spread


def generic_caption(caption: str) -> str:
    c, _, b = toy.parse_caption(caption)
    return toy.caption(c, toy.CLASS_WORD, b)


# ------------------------------------------------------------------------------------------------
# Saving


def save_pipeline(out: Path, tokenizer_dir: Path, text_encoder, vae, transformer) -> None:
    """diffusers' own writer: model_index.json + scheduler/ text_encoder/ tokenizer/ transformer/ vae/.
    Weights in bfloat16, the VAE's batch-norm statistics in float32."""
    import diffusers
    import torch
    from transformers import Qwen2Tokenizer

    vae = vae.to(torch.bfloat16)
    vae.bn.float()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15, time_shift_type="exponential")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=text_encoder.to(torch.bfloat16),
                                            tokenizer=Qwen2Tokenizer.from_pretrained(str(tokenizer_dir)),
                                            transformer=transformer.to(torch.bfloat16), is_distilled=False)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(str(tmp))
    # its own generation defaults (mflux2_sampling.json): the family's 1024², 50 steps, CFG 4 do not suit it
    (tmp / "mflux2_sampling.json").write_text(json.dumps({"width": SIZE, "height": SIZE, "steps": STEPS, "guidance": GUIDANCE}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ------------------------------------------------------------------------------------------------
# 4. Evaluation


def evaluate(model_dir: Path, combos, seeds, steps: int = STEPS, guidance: float = GUIDANCE) -> tuple[dict, list]:
    """Generate one image per (combo, seed) through mflux2's pipeline and score it."""
    from mflux2.pipeline import Flux2Pipeline
    from tests import toy_shapes

    pipe = Flux2Pipeline.from_pretrained(model_dir)
    prompts = [toy.caption(*c) for c in combos for _ in seeds]
    labels = [c for c in combos for _ in seeds]
    images = []
    for c in combos:
        for s in seeds:
            images += pipe.generate(toy.caption(*c), width=SIZE, height=SIZE, seed=s, num_inference_steps=steps,
                                    guidance_scale=guidance, progress=False)
    result = toy_shapes.score(images, labels)
    result["prompts"] = prompts
    return result, images


def labelled_grid(images, prompts: list[str], per_row: int, scale: int = 2):
    """One row per prompt: its text, then its `per_row` images (consecutive in `images`)."""
    from PIL import Image, ImageDraw

    s, label, gap = SIZE * scale, 300, 2
    rows = len(images) // per_row
    grid = Image.new("RGB", (label + per_row * (s + gap), rows * (s + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        draw.text((6, r * (s + gap) + s // 2 - 6), prompts[r * per_row], fill="black")
        for c in range(per_row):
            im = images[r * per_row + c].resize((s, s), Image.Resampling.NEAREST)
            grid.paste(im, (label + c * (s + gap), r * (s + gap)))
    return grid


def guidance_sweep(model_dir: Path, seeds) -> dict:
    """Held-out accuracy (all three attributes right) against the CFG scale, sampled in PyTorch (fast,
    batched; the MLX pipeline agrees with diffusers to float precision)."""
    import diffusers
    import torch

    tf = diffusers.Flux2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer").float()
    vae = diffusers.AutoencoderKLFlux2.from_pretrained(model_dir, subfolder="vae").float()
    combos = toy.combos_for("heldout")
    prompts = [toy.caption(*c) for c in combos] + [""]
    emb = encode_prompts(model_dir, prompts)
    table = torch.from_numpy(np.stack([emb[p] for p in prompts]))
    index = {p: i for i, p in enumerate(prompts)}
    out = {}
    for cfg in (1.0, 1.5, 2.0, 3.0, 4.0):
        runs = [preview(tf, vae, table, index, 512, combos, seed=s, cfg=cfg) for s in seeds]
        out[str(cfg)] = {k: round(float(np.mean([r[k] for r in runs])), 3) for k in ("colour", "shape", "background", "all")}
        log(f"guidance {cfg}: {out[str(cfg)]}")
    return out


def score_lora(model_dir: Path, lora: Path, trigger: str = TRIGGER, seeds=(0, 1)) -> dict:
    """What a subject LoRA (configs/quickstart.yaml) did, per prompt word: with the trigger ("a red sks
    on a blue background") and with the DOP class word ("a red shape on ..."), base model vs LoRA on
    the same seeds — how often the classifier sees a star, how often the LoRA keeps the base model's
    shape, and the mean absolute pixel change (0-255)."""
    from mflux2.pipeline import Flux2Pipeline
    from tests import toy_shapes

    pairs = [("red", "blue"), ("yellow", "purple"), ("green", "white"), ("white", "red")]
    base = Flux2Pipeline.from_pretrained(model_dir)
    tuned = Flux2Pipeline.from_pretrained(model_dir)
    tuned.load_lora(lora)
    out = {}
    for word in (trigger, toy.CLASS_WORD):
        shapes, diffs = {"base": [], "lora": []}, []
        for c, b in pairs:
            for seed in seeds:
                ims = [p.generate(toy.caption(c, word, b), width=SIZE, height=SIZE, seed=seed, num_inference_steps=STEPS,
                                  guidance_scale=GUIDANCE, progress=False)[0] for p in (base, tuned)]
                shapes["base"].append(toy_shapes.classify(ims[0]).shape)
                shapes["lora"].append(toy_shapes.classify(ims[1]).shape)
                diffs.append(float(np.abs(np.asarray(ims[0], np.float32) - np.asarray(ims[1], np.float32)).mean()))
        n = len(diffs)
        out[word] = {"star_base": sum(x == "star" for x in shapes["base"]) / n,
                     "star_lora": sum(x == "star" for x in shapes["lora"]) / n,
                     "same_shape_as_base": sum(x == y for x, y in zip(shapes["base"], shapes["lora"])) / n,
                     "pixel_change": round(float(np.mean(diffs)), 1), "n": n, **shapes}
        log(f"{word}: {out[word]}")
    return out


def sample_grid(images, cols: int, scale: int = 2):
    from PIL import Image

    rows = math.ceil(len(images) / cols)
    s = SIZE * scale
    grid = Image.new("RGB", (cols * s + (cols - 1) * 2, rows * s + (rows - 1) * 2), "white")
    for i, im in enumerate(images):
        grid.paste(im.resize((s, s), Image.Resampling.NEAREST), ((i % cols) * (s + 2), (i // cols) * (s + 2)))
    return grid


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "models" / "toy"), help="the model folder to write")
    ap.add_argument("--work", default=str(ROOT / "output" / "toy_train"), help="intermediate files")
    ap.add_argument("--stage", default="all", choices=("all", "vae", "transformer", "eval", "score-lora"))
    ap.add_argument("--lora", help="--stage score-lora: the subject LoRA to score (e.g. output/quickstart/lora_final.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=2500)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--short-steps", type=int, default=10000, help="transformer steps on the first --short-text tokens")
    ap.add_argument("--short-text", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="batch of the short-text phase")
    ap.add_argument("--steps", type=int, default=800, help="transformer steps at the full 512 text tokens")
    ap.add_argument("--full-batch", type=int, default=16)
    ap.add_argument("--preview-every", type=int, default=2000, help="score quick samples every N transformer steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-images", type=int, default=4096)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on a shared 2-core machine 2 threads were 4x slower than 1 (spinning OpenMP)")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    out, work = Path(a.out), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}

    if a.stage in ("all", "vae"):
        t0 = time.time()
        tok_dir = work / "tokenizer"
        build_tokenizer(tok_dir)
        te = build_text_encoder(a.seed)
        vae = train_vae(a.seed, a.vae_steps, a.vae_batch, lr=2e-3, kl=1e-3)
        round_to(vae, torch.bfloat16)
        items = toy.sample_items(a.seed + 10, a.train_images, SIZE, toy.SHAPES, "train")
        images = images_array(items)
        latent_tokens(vae, images, set_bn=True)  # BN statistics of the training latents
        check = images_array(toy.sample_items(a.seed + 20, 64, SIZE, toy.SHAPES + toy.SUBJECTS, "all"))
        with torch.no_grad():
            rec = vae.decode(vae.encode(torch.from_numpy(check)).latent_dist.mean).sample.clamp(-1, 1).numpy()
        times["vae_reconstruction_mse"] = round(float(np.mean((rec - check) ** 2)), 5)
        log(f"VAE reconstruction MSE on 64 new images (pixels in [-1, 1]): {times['vae_reconstruction_mse']}")
        from PIL import Image

        pil = lambda a: Image.fromarray(((a.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8))  # noqa: E731
        sample_grid([pil(x) for x in check[:8]] + [pil(x) for x in rec[:8]], cols=8).save(work / "vae_reconstruction.png")
        torch.save({"vae": vae.state_dict(), "te": te.state_dict()}, work / "stage1.pt")
        times["vae_s"] = round(time.time() - t0)
        times_path.write_text(json.dumps(times))

    if a.stage in ("all", "transformer"):
        import diffusers
        import transformers

        t0 = time.time()
        state = torch.load(work / "stage1.pt")
        vae = diffusers.AutoencoderKLFlux2(**VAE)
        vae.load_state_dict(state["vae"])
        vae.eval()
        te = build_text_encoder(a.seed)
        te.load_state_dict(state["te"])
        # Save once with a random transformer so the text encoder can be run through mflux2's loader.
        dummy = diffusers.Flux2Transformer2DModel(in_channels=128, out_channels=128, joint_attention_dim=3 * QWEN["hidden_size"],
                                                  guidance_embeds=False, **TRANSFORMER)
        save_pipeline(out, work / "tokenizer", te, vae, dummy)
        vae.float()
        items = toy.sample_items(a.seed + 10, a.train_images, SIZE, toy.SHAPES, "train")
        captions = [toy.caption(*it.combo) for it in items]
        heldout = [toy.caption(*c) for c in toy.combos_for("heldout")]  # encoded for previews only, never trained on
        prompts = sorted(set(captions) | {generic_caption(c) for c in captions} | {""} | set(heldout))
        embeds = encode_prompts(out, prompts)
        tokens = latent_tokens(vae, images_array(items), set_bn=False)
        log(f"{len(items)} training images, {len(prompts)} prompts; latent token std {tokens.std():.3f}")
        phases = [(a.short_steps, a.batch, a.short_text), (a.steps, a.full_batch, 512)]
        model, history = train_transformer(tokens, captions, embeds, a.seed, phases, a.lr, ema_decay=0.995, vae=vae,
                                           preview_every=a.preview_every)
        times["transformer_loss"] = history
        te = transformers.Qwen3ForCausalLM(te.config)
        te.load_state_dict(state["te"])
        save_pipeline(out, work / "tokenizer", te.eval(), vae, model)
        times["transformer_s"] = round(time.time() - t0)
        times_path.write_text(json.dumps(times))
        log(f"saved {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")

    if a.stage in ("all", "eval"):
        t0 = time.time()
        seeds = list(range(1000, 1000 + a.eval_seeds))
        held, held_images = evaluate(out, toy.combos_for("heldout"), seeds)
        seen, seen_images = evaluate(out, preview_combos("train"), seeds)
        keys = ("colour", "shape", "background", "all", "n")
        report = {"settings": {"steps": STEPS, "guidance": GUIDANCE, "seeds": seeds},
                  "heldout": {k: held[k] for k in keys}, "train": {k: seen[k] for k in keys},
                  "guidance_sweep": guidance_sweep(out, seeds), "times": times, "eval_s": round(time.time() - t0)}
        (work / "eval.json").write_text(json.dumps({**report, "heldout_predictions": held["predictions"],
                                                    "heldout_prompts": held["prompts"]}, indent=1))
        labelled_grid(held_images, held["prompts"], a.eval_seeds).save(work / "samples_heldout.png")
        labelled_grid(seen_images, seen["prompts"], a.eval_seeds).save(work / "samples_train.png")
        log(json.dumps(report))

    if a.stage == "score-lora":
        if not a.lora:
            ap.error("--stage score-lora needs --lora PATH")
        result = score_lora(out, Path(a.lora))
        (work / "score_lora.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
