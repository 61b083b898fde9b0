"""Which prompts does a subject LoRA leave alone? DOP, and DOP with more preservation prompts, on the toy model.

    python scripts/preservation_eval.py          # CPU only, under 14 min on 2 cores; prints one JSON line
    python scripts/preservation_eval.py --modes none,dop,dop+prompts,dop-x2 --out runs/   # + a reference, kept

Trains the quickstart LoRA (configs/quickstart.yaml: the star subject `sks` on models/toy; 600 steps,
`--steps 300` for the quickstart's length) in each mode, once per training seed (`--seed 0,1`), with
the same data:

    none          DOP off
    dop           DOP on the class word `shape`, as shipped (multiplier 1)
    dop+prompts   DOP with loss.diff_output_preservation_prompts = PRESERVE (three shape prompts, none of
                  them an evaluation prompt) and multiplier 1.5 (PRESERVE_MULTIPLIER)
    dop-x1.5, dop-x2   (references, not run by default) DOP alone with multiplier 1.5 / 2
    reg           (not run by default) no DOP; data/toy/shape-reg, the base model's own "shape" images
                  (mflux2-regset), as a regularisation set beside the subject; reg-w0.5 with its loss
                  weighted 0.5, reg-subject-x2 with the subject's images repeated twice, reg-48 with
                  data/toy/shape-reg-48 (48 images of 8 class prompts: a set the size users make)

then renders held-out prompts of three groups with the base model and with each LoRA, image for image
with the same initial noise (`--seeds` per prompt), at the quickstart's validation settings (20 steps,
CFG 2.0):

    trigger     "a red sks on a blue background", ... (8 colour pairs)  should become stars
    class       "a red shape on a blue background", ... (4)             should stay the base model's
    unrelated   "a green circle on a white background", ... (4)         should stay the base model's

and scores each mode against the base model's images (each training seed alone, then averaged):

    <group>          drift: mean absolute pixel difference to the base image of the same prompt and
                     noise (0–255)
    subject          fraction of trigger images the toy-shape scorer (tests/toy_shapes.py) reads as a
                     star in the prompt's colours
    kept_<group>     fraction of class / unrelated images whose shape the scorer reads as the base image's

Prompts are padded to 64 tokens (TEXT_LENGTH; `--text-length 512` is the quickstart as shipped, ~10x
slower). Figures and what they say: docs/toy-model.md. tests/test_preservation.py runs a cut-down version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/toy_shapes.py: the toy-shape scorer

from mflux2 import sampling  # noqa: E402
from mflux2.images import pil_to_array  # noqa: E402
from mflux2.models.vae import image_ids  # noqa: E402
from mflux2.training.config import TrainConfig  # noqa: E402
from mflux2.training.config_loading import config_from_dict, load_config  # noqa: E402
from tests.toy_shapes import classify, toy_data  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"
MODEL = ROOT / "models" / "toy"
DATA = ROOT / "data" / "toy" / "star"

# The option's prompts in this comparison: one prompt per base shape, in colour pairs that no evaluation
# prompt uses. Not the empty prompt: on the toy it made every other prompt drift more (docs/toy-model.md).
PRESERVE = ["a blue square on a white background", "a purple triangle on a yellow background",
            "a yellow circle on a green background"]
# The option preserves each listed prompt and the class prompt on half as many steps as DOP alone its
# class prompt, so it is run with a stronger preservation term (docs/training.md).
PRESERVE_MULTIPLIER = 1.5
MODES = {
    "none": {"loss.diff_output_preservation": False},
    "dop": {},
    "dop+prompts": {"loss.diff_output_preservation_prompts": PRESERVE,
                    "loss.diff_output_preservation_multiplier": PRESERVE_MULTIPLIER},
    # references, not run by default: DOP alone with the option's multiplier, and with 2
    "dop-x1.5": {"loss.diff_output_preservation_multiplier": PRESERVE_MULTIPLIER},
    "dop-x2": {"loss.diff_output_preservation_multiplier": 2.0},
    # a regularisation set instead of DOP: the base model's own images of the class word (data/toy/shape-reg,
    # made with mflux2-regset; configs/quickstart-datasets.yaml), trained beside the subject
    "reg": {"loss.diff_output_preservation": False},
    "reg-w0.5": {"loss.diff_output_preservation": False},  # the set's loss weighted 0.5
    "reg-subject-x2": {"loss.diff_output_preservation": False},  # the subject's images with repeats 2
    "reg-w1.5": {"loss.diff_output_preservation": False},  # the set's loss weighted 1.5 (diffusers' prior_loss_weight)
    "reg-48": {"loss.diff_output_preservation": False},  # a set of 48 images (8 prompts × 6) instead of 12
}
REG = ROOT / "data" / "toy" / "shape-reg"
REG_48 = ROOT / "data" / "toy" / "shape-reg-48"
# modes that train a `datasets:` list instead of the quickstart's one folder
DATASETS = {"reg": [{"path": str(DATA)}, {"path": str(REG), "is_regularization": True}],
            "reg-w0.5": [{"path": str(DATA)}, {"path": str(REG), "is_regularization": True, "loss_weight": 0.5}],
            "reg-subject-x2": [{"path": str(DATA), "repeats": 2}, {"path": str(REG), "is_regularization": True}],
            "reg-w1.5": [{"path": str(DATA)}, {"path": str(REG), "is_regularization": True, "loss_weight": 1.5}],
            "reg-48": [{"path": str(DATA)}, {"path": str(REG_48), "is_regularization": True}]}
DEFAULT_MODES = ("none", "dop", "dop+prompts")
# The evaluation prompts: colour pairs (red/blue and green/white occur in the subject's captions,
# yellow/purple and white/red do not); the trigger group has four more pairs, so the subject score
# rests on more images; the unrelated group names a base shape instead of a word of the subject's.
PAIRS = [("red", "blue"), ("yellow", "purple"), ("green", "white"), ("white", "red")]
TRIGGER_PAIRS = PAIRS + [("blue", "green"), ("purple", "white"), ("red", "yellow"), ("green", "purple")]
UNRELATED_SHAPES = ["circle", "square", "triangle", "circle"]
GROUPS = ("trigger", "class", "unrelated")
# The toy's prompts are at most 16 tokens: padded to 64 instead of the shipped 512, a step and an image
# cost ~10x less (the text tokens dominate a 64² image's 16 image tokens), so the comparison can afford
# more images per prompt. Padding changes what the model sees, for the base model and every LoRA alike.
TEXT_LENGTH = 64
SEEDS = 4
# Twice the quickstart's 300 steps (its cosine schedule stretched over them): at 300 the toy LoRA is
# still forming the subject, and the option's subject score lags DOP's (docs/toy-model.md).
STEPS = 600


def config(overrides: dict | None = None, datasets: list[dict] | None = None) -> TrainConfig:
    """configs/quickstart.yaml with absolute paths (any working directory) and `overrides`; `datasets`:
    a `datasets:` list in place of its one dataset (the trigger word and image size stay the defaults)."""
    if datasets is None:
        return load_config(CONFIG, {"model.path": str(MODEL), "dataset.path": str(DATA), **(overrides or {})})
    raw = yaml.safe_load(CONFIG.read_text())
    raw["model"]["path"] = str(MODEL)
    raw["dataset"].pop("path")
    raw["datasets"] = datasets
    return config_from_dict(raw, str(CONFIG), overrides)


def train(mode: str, output: Path, steps: int = 300, seed: int = 0, caches_from: Path | None = None,
          overrides: dict | None = None, text_length: int = 512, log=lambda *a: None,
          datasets: list[dict] | None = None) -> Path:
    """The quickstart config in `mode` (a MODES key) through the real Trainer, without validation
    images or intermediate checkpoints; returns lora_final.safetensors. `caches_from`: an earlier
    run's output folder whose latent and text caches are reused (what is missing is encoded).
    `text_length`: the prompts' padded token length (the text encoder's max_length, 512 as shipped)."""
    from mflux2.training import trainer as trainer_mod
    from mflux2.training.trainer import Trainer

    output.mkdir(parents=True, exist_ok=True)
    if caches_from is not None:
        for name in (".latent_cache", ".text_cache"):
            shutil.copytree(caches_from / name, output / name, dirs_exist_ok=True)
    if datasets is None and mode in DATASETS:
        datasets = DATASETS[mode]
    cfg = config({"training.max_steps": steps, "training.seed": seed, "checkpoints.output": str(output),
                  "checkpoints.save_every": 0, "validation.prompts": [], **MODES[mode], **(overrides or {})}, datasets)
    open_model = trainer_mod.open_model

    def with_length(cfg, *a):
        pipe = open_model(cfg, *a)
        pipe.text_encoder_options["max_length"] = text_length  # part of the text cache's identity
        return pipe

    trainer_mod.open_model = with_length
    try:
        trainer = Trainer(cfg, resume=False, log=log)
        lora = trainer.run()
    finally:
        trainer_mod.open_model = open_model
    if trainer.result != {"reason": "finished", "step": steps, "lora": lora}:
        raise RuntimeError(f"{mode}: training ended early: {trainer.result}")
    return lora


def eval_prompts(cfg: TrainConfig) -> dict[str, list[tuple[str, str, str]]]:
    """group -> [(prompt, colour, background)]."""
    word = {"trigger": cfg.dataset.trigger_word, "class": cfg.loss.diff_output_preservation_class}
    return {"trigger": [(toy_data.caption(c, word["trigger"], b), c, b) for c, b in TRIGGER_PAIRS],
            "class": [(toy_data.caption(c, word["class"], b), c, b) for c, b in PAIRS],
            "unrelated": [(toy_data.caption(c, s, b), c, b) for (c, b), s in zip(PAIRS, UNRELATED_SHAPES)]}


def render(pipe, loras: dict[str, Path | None], prompts: list[str], seeds: int, steps: int, guidance: float,
           size: int = 64) -> dict[str, np.ndarray]:
    """name -> uint8 images [len(prompts) · seeds, size, size, 3], image k·seeds + s from prompt k and
    the noise of seed s, the same for every LoRA (None: the base model). All images of one LoRA are one
    batch; LoRAs are applied and removed in turn."""
    embeds, txt_ids = pipe.encode_prompt(prompts)
    neg, neg_ids = pipe.encode_prompt([""])
    pipe.release("text_encoder")
    n = len(prompts) * seeds
    idx = mx.array(np.repeat(np.arange(len(prompts)), seeds))
    embeds, txt_ids = embeds[idx], txt_ids[idx]
    neg, neg_ids = mx.broadcast_to(neg, (n, *neg.shape[1:])), mx.broadcast_to(neg_ids, (n, *neg_ids.shape[1:]))
    noise = mx.concatenate([sampling.initial_noise(s, 1, size, size) for _ in prompts for s in range(seeds)])
    sigmas = sampling.get_sigmas(steps, sampling.image_seq_len(size, size))
    out = {}
    for name, lora in loras.items():
        if lora is not None:
            pipe.load_lora(lora)
        x = sampling.denoise(pipe.transformer, noise, embeds, txt_ids, image_ids(size, size), sigmas,
                             neg_embeds=neg, neg_txt_ids=neg_ids, cfg_scale=guidance)
        if lora is not None:
            pipe.unload_loras()
        images = pipe.decode(x, size, size, output_type="array")
        out[name] = np.stack([np.asarray(im) for im in images])
        out[name] = np.clip(np.round(out[name] * 255), 0, 255).astype(np.uint8)
    return out


def score(images: np.ndarray, base: np.ndarray, groups: dict[str, list[tuple[str, str, str]]], seeds: int) -> dict:
    """drift per group, the subject score and kept per preserved group (module docstring) of one mode's
    images against the base model's; images are ordered as the groups' prompts, `seeds` each."""
    out, start = {}, 0
    for g in GROUPS:
        n = len(groups[g]) * seeds
        a, b = images[start : start + n].astype(np.int16), base[start : start + n].astype(np.int16)
        out[g] = round(float(np.abs(a - b).mean()), 2)
        preds = [classify(im) for im in images[start : start + n]]
        labels = [(c, bg) for _, c, bg in groups[g] for _ in range(seeds)]
        if g == "trigger":
            out["subject"] = round(float(np.mean([p.labels == (c, "star", bg) for p, (c, bg) in zip(preds, labels)])), 3)
        else:
            base_shapes = [classify(im).shape for im in base[start : start + n]]
            out[f"kept_{g}"] = round(float(np.mean([p.shape == s for p, s in zip(preds, base_shapes)])), 3)
        start += n
    return out


def noised_inputs(pipe, prompts: list[str], images, noise_seed: int):
    """(embeds, txt_ids, clean latents x0 [n, N, 128] float32, noise like x0, image ids) of square toy
    images (64² unless drawn larger) and their prompts; the text encoder is released after."""
    embeds, txt_ids = pipe.encode_prompt(prompts)
    pipe.release("text_encoder")
    vae = pipe.vae
    x0 = mx.concatenate([vae.pack(vae.encode(pil_to_array(im)[None])) for im in images]).astype(mx.float32)
    return embeds, txt_ids, x0, mx.random.normal(x0.shape, key=mx.random.key(noise_seed)), image_ids(*images[0].size)


def velocity_drift(pipe, loras: dict[str, Path], groups: dict[str, list[tuple[str, str, str]]], timesteps: list[float],
                   guidance: float, noise_seed: int = 1234) -> dict[str, dict[str, float]]:
    """The cheap proxy of `score`'s drift (tests/test_preservation.py): name -> group -> the relative
    change ||v_lora − v_base|| / ||v_base|| of the guided velocity v = v("") + guidance·(v(p) − v(""))
    that sampling follows, averaged over the group's prompts and `timesteps`, each prompt on
    x_t = (1 − t)·x0 + t·noise with x0 a drawing of what the base model makes of it (the trigger
    prompts: a star; the class prompts: the unrelated group's shape in the same colours)."""
    shapes = {"trigger": ["star"] * len(TRIGGER_PAIRS), "class": UNRELATED_SHAPES, "unrelated": UNRELATED_SHAPES}
    names = [g for g in GROUPS if g in groups]
    prompts = [p for g in names for p, _, _ in groups[g]] + [""]
    drawings = [toy_data.render(toy_data.Item(c, s, b, 32.0, 32.0, 19.0)) for g in names
                for (_, c, b), s in zip(groups[g], shapes[g])]
    embeds, txt_ids, x0, noise, ids = noised_inputs(pipe, prompts, drawings, noise_seed)
    n = len(drawings)

    def guided():
        out = []
        for t in timesteps:
            xt = ((1 - t) * x0 + t * noise).astype(pipe.transformer.dtype)
            # each prompt with its own x_t, and "" on every x_t (CFG's negative branch)
            xs = mx.concatenate([xt, xt])
            es = mx.concatenate([embeds[:n], mx.broadcast_to(embeds[n:], (n, *embeds.shape[1:]))])
            ts = mx.concatenate([txt_ids[:n], mx.broadcast_to(txt_ids[n:], (n, *txt_ids.shape[1:]))])
            v = pipe.transformer(xs, es, mx.full((2 * n,), t), ids, ts, None).astype(mx.float32)
            out.append(v[n:] + guidance * (v[:n] - v[n:]))
        v = mx.stack(out)  # [T, n, N, C]
        mx.eval(v)
        return v

    base, result = guided(), {}
    for name, lora in loras.items():
        pipe.load_lora(lora)
        v = guided()
        pipe.unload_loras()
        rel = np.asarray(mx.sqrt(mx.sum((v - base) ** 2, axis=(2, 3))) / mx.sqrt(mx.sum(base**2, axis=(2, 3))))
        start, result[name] = 0, {}
        for g in names:
            k = len(groups[g])
            result[name][g] = round(float(rel[:, start : start + k].mean()), 4)
            start += k
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per mode (the quickstart ships 300)")
    ap.add_argument("--seed", default="0,1", help="training.seed of every mode; comma-separated: each mode is trained "
                                                  "once per seed and scored over all of them")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="images per evaluation prompt and LoRA (noise seeds 0..n-1)")
    ap.add_argument("--text-length", type=int, default=TEXT_LENGTH,
                    help="prompts padded to this many tokens, training and rendering (512: the quickstart as shipped)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default: the config's validation.steps, 20)")
    ap.add_argument("--out", default=None, help="keep the runs and images here (default: a temporary folder)")
    args = ap.parse_args(argv)
    modes, train_seeds = args.modes.split(","), [int(x) for x in args.seed.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    t0 = time.perf_counter()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="preservation_eval_"))
    loras, caches, seconds = {}, None, {}
    for seed in train_seeds:
        # dop+prompts first: its caches hold every prompt the other modes need
        for mode in sorted(modes, key=lambda m: m != "dop+prompts"):
            t = time.perf_counter()
            run = f"{mode}@{seed}"
            loras[run] = train(mode, root / f"seed{seed}" / mode, args.steps, seed, caches_from=caches, text_length=args.text_length)
            seconds[f"train {run}"] = round(time.perf_counter() - t, 1)
            caches = caches or root / f"seed{seed}" / mode
            print(f"trained {run} in {seconds[f'train {run}']} s", file=sys.stderr, flush=True)

    from mflux2.pipeline import Flux2Pipeline

    cfg = config()
    groups = eval_prompts(cfg)
    prompts = [p for g in GROUPS for p, _, _ in groups[g]]
    t = time.perf_counter()
    pipe = Flux2Pipeline.from_pretrained(MODEL, max_sequence_length=args.text_length)
    images = render(pipe, {"base": None, **loras}, prompts, args.seeds, args.sample_steps or cfg.validation.steps,
                    cfg.validation.guidance)
    seconds["render"] = round(time.perf_counter() - t, 1)
    if args.out:
        np.savez_compressed(root / "images.npz", prompts=np.array(prompts), **images)
    result = {}
    for m in modes:  # each training seed scored alone, then averaged (every seed has as many images)
        runs = [score(images[f"{m}@{seed}"], images["base"], groups, args.seeds) for seed in train_seeds]
        result[m] = {k: round(float(np.mean([r[k] for r in runs])), 3) for k in runs[0]}
        result[m]["per_seed"] = {k: [r[k] for r in runs] for k in ("subject", "class", "unrelated")}
    result["settings"] = {"steps": args.steps, "train_seeds": train_seeds, "text_length": args.text_length,
                          "images_per_seed": {g: len(groups[g]) * args.seeds for g in GROUPS},
                          "preserve": PRESERVE, "multiplier": PRESERVE_MULTIPLIER,
                          "seconds": {**seconds, "total": round(time.perf_counter() - t0, 1)}}
    print(json.dumps(result))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
