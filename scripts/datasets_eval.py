"""Masked loss and a regularisation set on the toy model (issue 31's demonstrations, docs/toy-model.md).

    python scripts/datasets_eval.py masks --steps 150 --seed 0,1     # one JSON line
    python scripts/datasets_eval.py masks --size 128 --steps 80 --seed 0 --draws 2
    python scripts/datasets_eval.py reg --steps 150 --seed 0,1

masks: the quickstart's star subject (16 images, scripts/make_toy_data.py --seed 1) twice, once on its
plain backgrounds and once with random discs drawn outside each star's mask (the star and 3 pixels
around it: the two sets differ only outside the mask), each trained with and without the masks (DOP
off, the same seed: the same timesteps, noise and order). How much the two LoRAs of a pair differ:

    lora        ||ΔW_plain − ΔW_cluttered|| / mean(||ΔW_plain||, ||ΔW_cluttered||) over every LoRA layer
                (ΔW = B·A, the dense weight change)
    inside      the same for the trained models' velocities on the plain star images' noisy latents
                (t = 0.5, 0.7, 0.9, the trigger captions), on the tokens the masks weigh (each token's
                change weighted by its mask weight, data.mask_weights), relative to the LoRA's own change
                there

    gradient    the same for the loss gradients at the LoRA's initialisation (summed over the 16 images ×
                --draws noise draws, the same timesteps and noise for all): the first step, without
                Adam's normalisation and the later steps' divergence
    *_latent_clutter  the same measures with the clutter put into the latents instead of the pixels: the
                plain image's cached latents with the cluttered image's on the tokens of weight 0 only
                (no VAE encoder mixes the clutter into the weighed tokens; only attention carries it)

and `ratio_<measure>`: masked / unmasked (1: the masks changed nothing; 0: the clutter left no trace).
`--size`: the images drawn at that size (64 px is 4 × 4 tokens, 128 px 8 × 8, 256 px 16 × 16).

reg: scripts/preservation_eval.py's velocity drift (the relative change of the guided velocity from the
base model's) of modes none, dop and reg (a regularisation set of the base model's own class images,
data/toy/shape-reg), per prompt group, and the seconds per training step of each.

Prompts padded to 64 tokens as preservation_eval's comparisons.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mflux2.training.data import mask_weights  # noqa: E402
from scripts import preservation_eval as pe  # noqa: E402
from tests.toy_shapes import toy_data  # noqa: E402

TEXT_LENGTH = 64
TIMESTEPS = (0.5, 0.7, 0.9)


def mask_data(root: Path, aligned: bool = False, size: int = 64) -> dict[str, Path]:
    """The star subject plain and cluttered, and its masks (deterministic), drawn at `size` px. `aligned`:
    the masks snapped to the 16-pixel token grid (a token cell white where the star's mask touches it)
    and the clutter only in the black cells, so that no token the loss weighs holds a clutter pixel."""
    paths = {"plain": root / "plain", "cluttered": root / "cluttered", "masks": root / "masks"}
    toy_data.make_dataset(paths["plain"], 1, 16, size, subject="star", trigger="sks", masks=paths["masks"])
    toy_data.make_dataset(paths["cluttered"], 1, 16, size, subject="star", trigger="sks", cluttered=True)
    if aligned:
        k = size // 16
        for m in sorted(paths["masks"].glob("*.png")):
            g = np.asarray(Image.open(m)) > 0
            cells = g.reshape(k, 16, k, 16).any(axis=(1, 3))
            snapped = np.repeat(np.repeat(cells, 16, axis=0), 16, axis=1)
            Image.fromarray(np.where(snapped, 255, 0).astype(np.uint8)).save(m)
            plain = np.asarray(Image.open(paths["plain"] / m.name))
            cluttered = np.asarray(Image.open(paths["cluttered"] / m.name))
            Image.fromarray(np.where(snapped[..., None], plain, cluttered)).save(paths["cluttered"] / m.name)
    return paths


def lora_deltas(path: Path) -> dict[str, np.ndarray]:
    w = mx.load(str(path))
    out = {}
    for k in w:
        if k.endswith("lora_A.weight"):
            name = k[: -len("lora_A.weight")]
            out[name] = np.asarray((w[name + "lora_B.weight"].astype(mx.float32) @ w[k].astype(mx.float32)))
    return out


def lora_difference(a: Path, b: Path) -> float:
    da, db = lora_deltas(a), lora_deltas(b)
    diff = np.sqrt(sum(float(np.sum((da[k] - db[k]) ** 2)) for k in da))
    size = 0.5 * (np.sqrt(sum(float(np.sum(v**2)) for v in da.values())) + np.sqrt(sum(float(np.sum(v**2)) for v in db.values())))
    return diff / size


def inside_velocities(pipe, loras: dict[str, Path], data: dict[str, Path], noise_seed: int = 99) -> dict[str, np.ndarray]:
    """name -> velocities [T, n, N, C] of the model with that LoRA (and "base") on the plain images."""
    pngs = sorted(data["plain"].glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    embeds, txt_ids, x0, noise, ids = pe.noised_inputs(pipe, captions, [Image.open(p).convert("RGB") for p in pngs], noise_seed)

    def velocities():
        vs = []
        for t in TIMESTEPS:
            xt = ((1 - t) * x0 + t * noise).astype(pipe.transformer.dtype)
            vs.append(pipe.transformer(xt, embeds, mx.full((len(pngs),), t), ids, txt_ids, None).astype(mx.float32))
        v = mx.stack(vs)
        mx.eval(v)
        return np.asarray(v)

    out = {"base": velocities()}
    for name, lora in loras.items():
        pipe.load_lora(lora)
        out[name] = velocities()
        pipe.unload_loras()
    return out


def token_weights(data: dict[str, Path]) -> np.ndarray:
    """[n, N] the masks' per-token weights, in the order of the plain images."""
    return np.stack([mask_weights(np.asarray(Image.open(data["masks"] / p.name).convert("L"), np.float32) / 255.0, 0.0)
                     for p in sorted(data["plain"].glob("*.png"))])


def first_step_gradients(data: dict[str, Path], root: Path, size: int, draws: int = 4) -> dict[str, np.ndarray]:
    """name -> the LoRA's loss gradient at its initialisation (before any update), summed over the 16
    images × `draws` noise draws (the same timesteps and noise for every name), flattened: what the first
    step of each run follows, without Adam's normalisation or later steps' divergence."""
    from mlx.utils import tree_flatten

    from mflux2.training import trainer as trainer_mod
    from mflux2.training.step import Batch
    from mflux2.training.trainer import Trainer

    trainers = {}
    for masked in (False, True):
        for bg in ("plain", "cluttered"):
            name = f"{'masked' if masked else 'unmasked'}-{bg}"
            entry = {"path": str(data[bg]), **({"mask_path": str(data["masks"])} if masked else {})}
            cfg = pe.config({"training.max_steps": 1, "training.seed": 0, "checkpoints.output": str(root / f"grad-{name}"),
                             "checkpoints.save_every": 0, "validation.prompts": [], "loss.diff_output_preservation": False,
                             "dataset.image_size": size}, [entry])
            open_model = trainer_mod.open_model

            def with_length(cfg, *a):
                pipe = open_model(cfg, *a)
                pipe.text_encoder_options["max_length"] = TEXT_LENGTH
                return pipe

            trainer_mod.open_model = with_length
            try:
                t = Trainer(cfg, resume=False, log=lambda *a: None)
                t._setup()
                _, step_fn = t._prepare(None)
            finally:
                trainer_mod.open_model = open_model
            trainers[name] = (t, step_fn._grad_fn(False))

    def summed(name: str, latents=None) -> np.ndarray:
        t, grad = trainers[name]
        total = None
        for i, s in enumerate(sorted(t.samples, key=lambda s: s.path.name)):
            batch = Batch(latents=(t._latents(s) if latents is None else latents[i])[None],
                          prompt_embeds=t.cond.embeds(s.caption)[None], img_ids=t.cond.img_ids(s.bucket),
                          txt_ids=t.cond.txt_ids, **t._loss_weights([s]))
            for d in range(draws):
                _, g = grad(t.model, batch, mx.random.key(1000 * i + d))
                flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in sorted(tree_flatten(g), key=lambda kv: kv[0])])
                total = flat if total is None else total + flat
                mx.eval(total)
        return np.asarray(total)

    out = {name: summed(name) for name in trainers}
    # The clutter put into the latents directly, on the tokens of weight 0 only (the plain image's latents
    # elsewhere): no VAE encoder mixes it into the weighed tokens, only attention carries it there.
    tp, tc = trainers["masked-plain"][0], trainers["masked-cluttered"][0]
    order = lambda t: sorted(t.samples, key=lambda s: s.path.name)  # noqa: E731
    swapped = [mx.where((tp._mask_weights(a) == 0)[:, None], tc._latents(b), tp._latents(a))
               for a, b in zip(order(tp), order(tc))]
    out["masked-swapped"] = summed("masked-plain", swapped)
    out["unmasked-swapped"] = summed("unmasked-plain", swapped)
    # ... and into the cluttered run's latent cache, for training on them (masks(): "latent clutter")
    for s, lat in zip(order(tc), swapped):
        tc.lat_cache.put(tc._lat_key(s), {**tc.lat_cache.get(tc._lat_key(s)), "latents": lat})
    return out


def masks(steps: int, seeds: list[int], root: Path, aligned: bool = False, size: int = 64, log=lambda *a: None,
          gradients: bool = True, draws: int = 4) -> dict:
    from mflux2.pipeline import Flux2Pipeline

    data = mask_data(root / "data", aligned, size)
    loras, seconds = {}, {}
    result = {"per_seed": {}}
    for seed in seeds if steps else []:  # steps 0: the first-step gradients alone
        for masked in (False, True):
            for bg in ("plain", "cluttered"):
                name = f"{'masked' if masked else 'unmasked'}-{bg}@{seed}"
                entry = {"path": str(data[bg]), **({"mask_path": str(data["masks"])} if masked else {})}
                t = time.perf_counter()
                loras[name] = pe.train("none", root / name, steps, seed, text_length=TEXT_LENGTH, datasets=[entry],
                                       overrides={"dataset.image_size": size})
                seconds[name] = round(time.perf_counter() - t, 1)
                log(f"trained {name} in {seconds[name]} s")
    w = token_weights(data)[None, :, :, None]  # [1, n, N, 1]
    if steps:
        pipe = Flux2Pipeline.from_pretrained(pe.MODEL, max_sequence_length=TEXT_LENGTH)
        v = inside_velocities(pipe, loras, data)

    def change(a, b, w):  # the (weighted) change between two LoRAs, relative to their own change from the base
        num = np.sqrt(np.sum(w * (v[a] - v[b]) ** 2))
        own = 0.5 * (np.sqrt(np.sum(w * (v[a] - v["base"]) ** 2)) + np.sqrt(np.sum(w * (v[b] - v["base"]) ** 2)))
        return float(num / own)

    for seed in seeds if steps else []:
        r = {}
        for kind in ("unmasked", "masked"):
            a, b = f"{kind}-plain@{seed}", f"{kind}-cluttered@{seed}"
            r[kind] = {"lora": round(lora_difference(loras[a], loras[b]), 4), "inside": round(change(a, b, w), 4),
                       "outside": round(change(a, b, (w == 0).astype(np.float32)), 4)}
        for k in ("lora", "inside", "outside"):
            r[f"ratio_{k}"] = round(r["masked"][k] / r["unmasked"][k], 3)
        result["per_seed"][seed] = r
    for k in ("ratio_lora", "ratio_inside", "ratio_outside") if steps else ():
        result[k] = round(float(np.mean([r[k] for r in result["per_seed"].values()])), 3)
    if gradients:
        g = first_step_gradients(data, root, size, draws)
        gdiff = {}
        for kind in ("unmasked", "masked"):
            a, b = g[f"{kind}-plain"], g[f"{kind}-cluttered"]
            gdiff[kind] = round(float(np.linalg.norm(a - b) / (0.5 * (np.linalg.norm(a) + np.linalg.norm(b)))), 4)
        for kind in ("unmasked", "masked"):  # plain against the latent-space clutter (attention only)
            a, b = g[f"{kind}-plain"], g[f"{kind}-swapped"]
            gdiff[f"{kind}_latent_clutter"] = round(float(np.linalg.norm(a - b) / (0.5 * (np.linalg.norm(a) + np.linalg.norm(b)))), 4)
        result["gradient"] = gdiff
        result["ratio_gradient"] = round(gdiff["masked"] / gdiff["unmasked"], 3)
        result["ratio_gradient_latent_clutter"] = round(gdiff["masked_latent_clutter"] / gdiff["unmasked_latent_clutter"], 3)
        # Training on the latent-space clutter (the cached latents of the cluttered images replaced by the
        # plain ones except on the tokens of weight 0): the LoRA ratio without the VAE encoder's mixing.
        for seed in seeds if steps else []:
            r = result["per_seed"][seed]
            for kind in ("unmasked", "masked"):
                entry = {"path": str(data["cluttered"]), **({"mask_path": str(data["masks"])} if kind == "masked" else {})}
                lora = pe.train("none", root / f"{kind}-swapped@{seed}", steps, seed, caches_from=root / "grad-masked-cluttered",
                                text_length=TEXT_LENGTH, datasets=[entry], overrides={"dataset.image_size": size})
                r[kind]["lora_latent_clutter"] = round(lora_difference(loras[f"{kind}-plain@{seed}"], lora), 4)
            r["ratio_lora_latent_clutter"] = round(r["masked"]["lora_latent_clutter"] / r["unmasked"]["lora_latent_clutter"], 3)
        if steps:
            result["ratio_lora_latent_clutter"] = round(float(np.mean([r["ratio_lora_latent_clutter"]
                                                                       for r in result["per_seed"].values()])), 3)
    result["settings"] = {"steps": steps, "seeds": seeds, "text_length": TEXT_LENGTH, "aligned": aligned, "size": size, "draws": draws,
                          "seconds": seconds,
                          "outside_tokens": round(float(np.mean(w == 0)), 3),
                          "mask_fraction": round(float(np.mean([np.asarray(Image.open(p)) > 0 for p in sorted(data["masks"].glob("*.png"))])), 3)}
    return result


def reg(steps: int, seeds: list[int], root: Path, modes=("none", "dop", "reg"), log=lambda *a: None) -> dict:
    from mflux2.pipeline import Flux2Pipeline

    loras, per_step = {}, {}
    for seed in seeds:
        for mode in modes:
            name = f"{mode}@{seed}"
            loras[name] = pe.train(mode, root / name, steps, seed, text_length=TEXT_LENGTH,
                                   log=lambda *a: None)
            rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            times = [r["step_time_s"] for r in rows if r.get("step_time_s")]
            per_step[name] = round(float(np.median(times)), 3) if times else None
            log(f"trained {name}: {per_step[name]} s/step")
    cfg = pe.config()
    pipe = Flux2Pipeline.from_pretrained(pe.MODEL, max_sequence_length=TEXT_LENGTH)
    drift = pe.velocity_drift(pipe, loras, pe.eval_prompts(cfg), [0.7, 0.9], cfg.validation.guidance)
    result = {m: {g: round(float(np.mean([drift[f"{m}@{s}"][g] for s in seeds])), 4) for g in pe.GROUPS} for m in modes}
    for m in modes:
        result[m]["s_per_step"] = round(float(np.median([per_step[f"{m}@{s}"] for s in seeds])), 3)
    result["per_seed"] = drift
    result["settings"] = {"steps": steps, "seeds": seeds, "text_length": TEXT_LENGTH}
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("masks", "reg"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", default="0,1", help="training seeds, comma-separated")
    ap.add_argument("--modes", default="none,dop,reg", help="reg: preservation_eval's modes to train (reg-48: the 48-image set)")
    ap.add_argument("--aligned", action="store_true", help="masks: snapped to the token grid, clutter only outside them")
    ap.add_argument("--size", type=int, default=64, help="masks: the images' size in pixels (a multiple of 16)")
    ap.add_argument("--no-gradient", action="store_true", help="masks: skip the first-step gradient measure")
    ap.add_argument("--draws", type=int, default=4, help="masks: noise draws per image in the gradient measure")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    seeds = [int(x) for x in a.seed.split(",")]
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="datasets_eval_"))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if a.what == "masks":
        result = masks(a.steps, seeds, root, a.aligned, a.size, log=log, gradients=not a.no_gradient, draws=a.draws)
    else:
        result = reg(a.steps, seeds, root, modes=tuple(a.modes.split(",")), log=log)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
