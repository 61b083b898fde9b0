"""Score an edit LoRA of the toy model (configs/quickstart-edit.yaml) on held-out pairs.

    python scripts/score_toy_edit.py --lora output/quickstart-edit/lora_final.safetensors

The edits (scripts/make_toy_data.py --edit): given a reference image "a red circle on a blue
background" and the caption "sks, copy the image", draw a red circle on a blue background (`copy`);
with "sks, cycle the colours", a green circle on a yellow background (`cycle`: each colour to the
palette's next); with "sks, swap the colours", a blue circle on a red background (`swap`). No caption
names a colour: only the reference can. The held-out references are the 9 held-out (colour, shape,
background) combinations of the toy model, which neither the toy model nor the edit LoRA saw in
training (nor their edited images), each at `--seeds` noise seeds. Three settings, the same
references and noise:

- `lora+ref`: the base model + the LoRA, with the reference image (what the LoRA was trained for);
- `base+ref`: the base model with the reference (it never saw reference tokens);
- `lora-ref`: the LoRA without the reference (the caption names no colour: only chance is left).

An image is an edit success when tests/toy_shapes.py reads the edited combination: the reference's
shape with the edited shape and background colours ("colours" asks only for the two colours; chance
is 1/30).

Generation goes through mflux2's own sampling with references (`mflux2.sampling.denoise(refs=...)`,
references encoded by `Flux2Pipeline.encode_references`, as `mflux2-generate --image`), batched over
all images; the transformer runs in PyTorch by default (diffusers' `Flux2Transformer2DModel` with the
LoRA loaded by diffusers: about 10x faster than MLX's CPU build here), or in MLX (`--backend mlx`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_toy_data as toy  # noqa: E402

SIZE, STEPS, GUIDANCE = 64, 20, 2.0  # the toy model's sampling settings (docs/toy-model.md)
SETTINGS = ("lora+ref", "base+ref", "lora-ref")


def heldout_pairs(seeds) -> list[tuple[toy.Item, int]]:
    """(reference item, noise seed) for every held-out combination at its canonical place and size."""
    items = [toy.Item(c, s, b, SIZE / 2, SIZE / 2, 0.3 * SIZE) for c, s, b in toy.edit_combos("heldout")]
    return [(item, seed) for item in items for seed in seeds]


class TorchTransformer:
    """The toy transformer in diffusers (float32, one thread: ~10x MLX's CPU build here), with the
    LoRA loaded by diffusers itself (it reads mflux2's LoRA files: tests/test_lora.py), called as
    mflux2.sampling.denoise calls mflux2's transformer."""

    dtype = mx.float32

    def __init__(self, model_dir, lora=None):
        import diffusers
        import torch

        torch.set_num_threads(1)
        tf = diffusers.Flux2Transformer2DModel.from_pretrained(Path(model_dir) / "transformer").float().eval()
        if lora is not None:
            pipe = diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                                text_encoder=None, tokenizer=None, transformer=tf)
            pipe.load_lora_weights(str(lora))
        self.model, self.torch = tf, torch

    def __call__(self, x, e, t, img_ids, txt_ids, guidance=None):
        T = lambda a: self.torch.from_numpy(np.array(a.astype(mx.float32)))  # noqa: E731
        with self.torch.no_grad():
            v = self.model(hidden_states=T(x), encoder_hidden_states=T(e), timestep=T(t), img_ids=T(img_ids),
                           txt_ids=T(txt_ids), guidance=None, return_dict=False)[0]
        return mx.array(v.numpy())


def generate(pipe, model, pairs, caption: str, with_refs: bool, steps: int = STEPS, guidance: float = GUIDANCE):
    """One image per (reference item, seed) of `pairs`, as PIL images: mflux2's sampling (real CFG
    against the empty prompt) with `model` (mflux2's transformer or TorchTransformer), the references
    encoded as `mflux2-generate --image` encodes them."""
    from mflux2 import sampling
    from mflux2.models.vae import image_ids

    b = len(pairs)
    embeds, txt_ids = pipe.encode_prompt([caption, ""])
    x = mx.concatenate([sampling.initial_noise(seed, 1, SIZE, SIZE) for _, seed in pairs])
    refs = ref_ids = None
    if with_refs:
        encoded = [pipe.encode_references(toy.render(item, SIZE)) for item, _ in pairs]
        refs, ref_ids = mx.concatenate([r for r, _ in encoded]), encoded[0][1]
    sigmas = sampling.get_sigmas(steps, sampling.image_seq_len(SIZE, SIZE))
    rep = lambda e: mx.broadcast_to(e, (b, *e.shape[1:]))  # noqa: E731
    latents = sampling.denoise(model, x, rep(embeds[:1]), txt_ids[0], image_ids(SIZE, SIZE), sigmas,
                               neg_embeds=rep(embeds[1:]), neg_txt_ids=txt_ids[1], cfg_scale=guidance,
                               refs=refs, ref_ids=ref_ids)
    return pipe.decode(latents, SIZE, SIZE)


def score(images, pairs, edit: str = "copy") -> dict:
    """Edit success of images against their references (see the module docstring)."""
    from tests import toy_shapes

    preds = [toy_shapes.classify(im).labels for im in images]  # (colour, shape, background)
    want = [toy.edited(item, edit).combo for item, _ in pairs]
    colours = np.mean([p[0] == w[0] and p[2] == w[2] for p, w in zip(preds, want)])
    shape = np.mean([p[1] == w[1] for p, w in zip(preds, want)])
    every = np.mean([p == w for p, w in zip(preds, want)])
    return {"colours": float(colours), "shape": float(shape), "success": float(every), "n": len(preds),
            "predictions": preds, "wanted": want}


def evaluate(model_dir: str | Path, lora: str | Path, seeds=(0, 1, 2, 3), settings=SETTINGS, edit: str = "copy",
             trigger: str = "sks", steps: int = STEPS, guidance: float = GUIDANCE, backend: str = "torch") -> dict:
    """{setting: score} for the held-out references (settings: a subset of SETTINGS). `backend`: the
    transformer in PyTorch (fast on a CPU) or mflux2's MLX one; text encoder and VAE are mflux2's."""
    from mflux2.pipeline import Flux2Pipeline

    pairs = heldout_pairs(seeds)
    caption = toy.EDIT_CAPTION[edit].format(trigger=trigger)
    pipe = Flux2Pipeline.from_pretrained(model_dir, dtype=mx.float32)
    models = {}
    out = {}
    for setting in settings:
        use_lora = setting.startswith("lora")
        if use_lora not in models:
            if backend == "torch":
                models[use_lora] = TorchTransformer(model_dir, lora if use_lora else None)
            else:
                pipe.unload_loras()
                if use_lora:
                    pipe.load_lora(lora)
                models[use_lora] = pipe.transformer
        images = generate(pipe, models[use_lora], pairs, caption, with_refs=setting.endswith("+ref"), steps=steps,
                          guidance=guidance)
        out[setting] = score(images, pairs, edit)
        out[setting]["images"] = images
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", required=True, help="the edit LoRA (e.g. output/quickstart-edit/lora_final.safetensors)")
    ap.add_argument("--model", default=str(ROOT / "models" / "toy"))
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds per held-out reference")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--edit", default="copy", choices=toy.EDITS, help="the edit the LoRA was trained for")
    ap.add_argument("--backend", default="torch", choices=("torch", "mlx"),
                    help="the transformer's framework for sampling (torch: ~10x faster on a CPU; mlx: mflux2's own)")
    ap.add_argument("--grid", help="write a PNG: per held-out reference, the reference then one image per setting")
    a = ap.parse_args(argv)
    result = evaluate(a.model, a.lora, seeds=tuple(range(a.seeds)), edit=a.edit, steps=a.steps, backend=a.backend)
    for setting, r in result.items():
        print(json.dumps({"setting": setting, **{k: r[k] for k in ("success", "colours", "shape", "n")}}))
    if a.grid:  # a row of references, then a row per setting (each reference's first seed)
        from train_toy_model import labelled_grid

        pairs = heldout_pairs(range(a.seeds))
        firsts = range(0, len(pairs), a.seeds)
        rows = [[toy.render(pairs[i][0], SIZE) for i in firsts]] + [[result[s]["images"][i] for i in firsts] for s in SETTINGS]
        labels = ["reference (held out)", "LoRA + reference", "base model + reference", "LoRA, no reference"]
        labelled_grid([im for row in rows for im in row], [lab for lab in labels for _ in firsts], len(firsts)).save(a.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
