"""A shortened quickstart (configs/quickstart.yaml on the shipped toy model) shows that DOP works.

The real Trainer runs the quickstart config twice with the same seed and data — with DOP (as shipped)
and without it — for 150 steps instead of 300. Then the transformer's velocity prediction is
compared, base model against base + LoRA, on fixed latents, noise and timesteps:

    relative change = ||v_lora - v_base|| / ||v_base||, averaged over prompts and timesteps

for the no-trigger class prompts ("a red shape on a blue background": what DOP preserves) and the
trigger prompts ("a red sks on a blue background": what the LoRA learns). With DOP the class prompts
move least and the trigger prompts clearly more; without DOP the class prompts move twice as much
and as much as the trigger prompts.
Figures measured on several seeds and the full 300-step run: docs/toy-model.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mflux2.images import pil_to_array
from mflux2.models.vae import image_ids
from mflux2.pipeline import Flux2Pipeline
from mflux2.training.config_loading import load_config
from mflux2.training.timesteps import sample_timesteps
from mflux2.training.trainer import Trainer
from tests.toy_shapes import toy_data

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
MODEL = ROOT / "models" / "toy"

# The shortened run: the quickstart's first 150 of 300 steps (its learning-rate schedule compressed
# into them). Shorter runs leave the LoRA moving every prompt alike (docs/toy-model.md).
STEPS, LEARNING_RATE, SEED = 150, None, 0  # None: the config's own rate
# The clean images x0 the predictions are compared on: the base model's own shapes in four colour
# pairs (two of them occur in the subject's captions: red/blue, green/white), and the first four
# subject images (stars: the distribution DOP regularises), each with its caption's colours.
PAIRS = [("red", "blue"), ("yellow", "purple"), ("green", "white"), ("white", "red")]
BASE_SHAPES = ["circle", "square", "triangle", "circle"]
SUBJECT_IMAGES = 4

# Bounds. Measured at 150 steps with seeds 0 and 1 (docs/toy-model.md): DOP class change 0.272 / 0.285,
# DOP trigger / class 1.96 / 1.52 (without DOP 1.02 / 1.01), no-DOP / DOP class change 2.31 / 2.16.
# After the full 300 steps trigger / class is 2.4 on the base shapes and 3.0 on the subject images.
MAX_CLASS_CHANGE_WITH_DOP = 0.35
MIN_TRIGGER_OVER_CLASS = 1.35
MIN_NO_DOP_OVER_DOP = 1.9


def quickstart_config(overrides: dict | None = None):
    """configs/quickstart.yaml with its relative model and data paths made absolute (any working dir)."""
    return load_config(CONFIG, {"model.path": str(MODEL), "dataset.path": str(ROOT / "data" / "toy" / "star"),
                                **(overrides or {})})


def train(output: Path, dop: bool, seed: int = SEED, steps: int = STEPS, lr: float | None = LEARNING_RATE,
          caches_from: Path | None = None) -> Path:
    """The quickstart config through the real Trainer, shortened; returns lora_final.safetensors.
    `caches_from`: an earlier run's output whose latent/text caches (same model, same data) are reused."""
    if caches_from is not None:
        for name in (".latent_cache", ".text_cache"):
            shutil.copytree(caches_from / name, output / name)
    cfg = quickstart_config({
        "training.max_steps": steps, "training.seed": seed, **({"training.learning_rate": lr} if lr else {}),
        "loss.diff_output_preservation": dop,
        "checkpoints.output": str(output), "checkpoints.save_every": 0, "validation.prompts": [],
    })
    trainer = Trainer(cfg, resume=False, log=lambda *a: None)
    lora = trainer.run()
    assert trainer.result == {"reason": "finished", "step": steps, "lora": lora}
    return lora


def relative_changes(loras: dict[str, Path], extra_words: dict[str, str] | None = None,
                     noise_seed: int = 1234) -> dict[str, dict[str, float]]:
    """{lora name: {"class": c, "trigger": c, ..., "class@base": c, "class@subject": c, ...}}: mean
    relative velocity change against the base model over four timesteps and the eight x0 (four base
    shapes, four subject images; the "@" entries split them), every prompt kind on the same x_t.
    `extra_words`: more prompt kinds to measure, e.g. {"circle": "circle"} (docs/toy-model.md)."""
    cfg = quickstart_config()
    words = {"class": cfg.loss.diff_output_preservation_class, "trigger": cfg.dataset.trigger_word, **(extra_words or {})}
    images = [pil_to_array(toy_data.render(toy_data.Item(c, s, b, 32.0, 32.0, 19.0))) for (c, b), s in zip(PAIRS, BASE_SHAPES)]
    pairs = list(PAIRS)
    for png in sorted(Path(cfg.dataset.path).glob("*.png"))[:SUBJECT_IMAGES]:
        colour, _, background = toy_data.parse_caption(png.with_suffix(".txt").read_text())
        images.append(pil_to_array(Image.open(png).convert("RGB")))
        pairs.append((colour, background))
    n = len(pairs)
    prompts = [toy_data.caption(c, w, b) for w in words.values() for c, b in pairs]

    pipe = Flux2Pipeline.from_pretrained(MODEL)
    embeds, txt_ids = pipe.encode_prompt(prompts)
    pipe.release("text_encoder")
    x0 = mx.concatenate([pipe.vae.pack(pipe.vae.encode(mx.array(im)[None])) for im in images]).astype(mx.float32)
    noise = mx.random.normal(x0.shape, key=mx.random.key(noise_seed))
    # prompt i of every kind sees the same x0, noise and t
    x0, noise = mx.concatenate([x0] * len(words)), mx.concatenate([noise] * len(words))
    # The 20/40/60/80 % quantiles of the timesteps the config trains on (style: high noise favoured)
    draws = np.asarray(sample_timesteps(cfg.loss.timestep_sampling, mx.random.key(noise_seed), 4096))
    timesteps = np.quantile(draws, [0.2, 0.4, 0.6, 0.8]).tolist()
    ids = image_ids(64, 64)

    def velocities():
        out = []
        for t in timesteps:
            xt = (1 - t) * x0 + t * noise
            v = pipe.transformer(xt.astype(mx.bfloat16), embeds, mx.full((len(prompts),), t), ids, txt_ids, None)
            out.append(v.astype(mx.float32))
        v = mx.stack(out)  # [T, P, N, C]
        mx.eval(v)
        return v

    base = velocities()
    results = {}
    for name, path in loras.items():
        pipe.load_lora(path)
        v = velocities()
        pipe.unload_loras()
        rel = np.asarray(mx.sqrt(mx.sum((v - base) ** 2, axis=(2, 3))) / mx.sqrt(mx.sum(base**2, axis=(2, 3))))  # [T, P]
        results[name] = {w: float(rel[:, i * n : (i + 1) * n].mean()) for i, w in enumerate(words)}
        for i, w in enumerate(words):
            results[name][f"{w}@base"] = float(rel[:, i * n : i * n + len(PAIRS)].mean())
            results[name][f"{w}@subject"] = float(rel[:, i * n + len(PAIRS) : (i + 1) * n].mean())
    return results


@pytest.fixture(scope="module")
def changes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    with_dop = train(tmp / "dop", dop=True)
    without = train(tmp / "no_dop", dop=False, caches_from=tmp / "dop")
    result = relative_changes({"dop": with_dop, "no_dop": without})
    print(f"\nrelative velocity change after {STEPS} steps (seed {SEED}): {result}")
    return result


def test_dop_keeps_the_class_prompts_and_moves_the_trigger_prompts(changes):
    dop = changes["dop"]
    assert 0 < dop["class"] < MAX_CLASS_CHANGE_WITH_DOP, dop
    assert dop["trigger"] > MIN_TRIGGER_OVER_CLASS * dop["class"], dop


def test_without_dop_the_class_prompts_drift_more(changes):
    dop, no_dop = changes["dop"], changes["no_dop"]
    assert no_dop["class"] > MIN_NO_DOP_OVER_DOP * dop["class"], changes
