"""The shipped toy model (models/toy, docs/toy-model.md), its data generator and its scorer.

- scripts/make_toy_data.py is deterministic from its seed and writes what its captions say;
- tests/toy_shapes.py classifies ground-truth images exactly (so its scores of generated images mean
  something);
- models/toy loads through the real loaders (diffusers layout: model_index.json, transformer/, vae/ with
  float32 batch-norm statistics, a 28-layer Qwen3 text_encoder/, tokenizer/) and its generations
  follow held-out prompts — colour, shape and background as the classifier reads them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from toy_shapes import classify, score, toy_data

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "models" / "toy"
SCRIPT = ROOT / "scripts" / "make_toy_data.py"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------
# Data


def test_make_toy_data_is_deterministic_and_captions_match(tmp_path):
    a = toy_data.make_dataset(tmp_path / "a", seed=3, count=12)
    toy_data.make_dataset(tmp_path / "b", seed=3, count=12)
    toy_data.make_dataset(tmp_path / "c", seed=4, count=12)
    assert len(a) == 12 and len(list((tmp_path / "a").glob("*.txt"))) == 12
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    for png in a:  # every caption names what is drawn, and no held-out combination is in "train"
        combo = toy_data.parse_caption(png.with_suffix(".txt").read_text())
        assert not toy_data.is_held_out(combo)
        assert classify(Image.open(png)).labels == combo


def test_make_toy_data_cli_subject_mode(tmp_path):
    out = tmp_path / "star"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--seed", "1", "--count", "5", "--subject", "star",
                        "--trigger", "sks"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    captions = [p.read_text().strip() for p in sorted(out.glob("*.txt"))]
    assert len(captions) == 5 and all(" sks on a " in c for c in captions)
    for png in sorted(out.glob("*.png")):
        assert classify(Image.open(png)).shape == "star"
    bad = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--subject", "star"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--trigger" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_held_out_split_is_a_tenth_and_covers_every_word():
    held, train = toy_data.combos_for("heldout"), toy_data.combos_for("train")
    assert len(held) == 9 and len(train) == 81 and not set(held) & set(train)
    for i, words in enumerate((toy_data.COLOURS, toy_data.SHAPES, toy_data.COLOURS)):
        assert {c[i] for c in train} == set(words)  # every word is still seen in training


# ----------------------------------------------------------------------------------------------
# Classifier


def test_classifier_is_exact_on_ground_truth():
    items = toy_data.sample_items(7, 240, 64, toy_data.SHAPES + toy_data.SUBJECTS, "all")
    result = score([toy_data.render(it) for it in items], [it.combo for it in items])
    assert result["all"] == 1.0, [(it.combo, p) for it, p in zip(items, result["predictions"]) if p != it.combo][:3]
    assert {p[1] for p in result["predictions"]} == {"circle", "square", "triangle", "star"}


def test_classifier_reports_no_shape_on_a_plain_image():
    plain = np.full((64, 64, 3), toy_data.PALETTE["blue"], np.uint8)
    p = classify(plain)
    assert (p.shape, p.background) == ("none", "blue")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert classify(noise).shape in ("none", "circle", "square", "triangle", "star")  # runs on anything


# ----------------------------------------------------------------------------------------------
# The shipped model


def test_toy_model_folder_is_small_and_in_diffusers_layout():
    files = {p.relative_to(TOY).as_posix(): p.stat().st_size for p in TOY.rglob("*") if p.is_file()}
    for need in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                 "scheduler/scheduler_config.json"):
        assert need in files, f"models/toy lacks {need}"
    assert sum(files.values()) < 5_000_000, f"models/toy is {sum(files.values()) / 1e6:.1f} MB"
    index = json.loads((TOY / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False


def test_the_toy_model_folder_names_its_own_generation_defaults(tmp_path):
    """models/toy/mflux2_sampling.json: 64², 20 steps, CFG 2.0 when the caller gives none (klein-base's
    1024² and 50 steps take about half an hour an image on 2 CPU cores); what the caller gives wins."""
    from PIL import Image

    from mflux2.cli import generate_main
    from mflux2.hub import ModelLoadError
    from mflux2.model_files import SAMPLING_FILE, read_sampling
    from mflux2.pipeline import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(TOY)
    assert pipe.source.sampling == {"width": 64, "height": 64, "steps": 20, "guidance": 2.0}
    assert pipe.sampling_settings(None, None) == (20, 2.0, True) and pipe.sampling_settings(3, 1.5) == (3, 1.5, True)
    latents = pipe.generate("a red sks", num_inference_steps=1, progress=False, output_type="latent")
    assert latents[0].shape == (16, 128)  # 64² in 16-pixel tokens
    out = tmp_path / "toy.png"
    assert generate_main(["--model", str(TOY), "--prompt", "a red circle on a blue background", "--steps", "1",
                          "--output", str(out), "--quiet"]) == 0
    with Image.open(out) as im:
        meta = json.loads(im.text["parameters"])
        assert im.size == (64, 64) and (meta["steps"], meta["guidance"], meta["cfg"]) == (1, 2.0, True)
    (tmp_path / SAMPLING_FILE).write_text('{"width": 60, "steps": 20}')
    with pytest.raises(ModelLoadError, match=r"mflux2_sampling.json: width: 60 is not a positive multiple of 16"):
        read_sampling(tmp_path)
    (tmp_path / SAMPLING_FILE).write_text('{"size": 64}')
    with pytest.raises(ModelLoadError, match=r"mflux2_sampling.json: unknown key 'size'"):
        read_sampling(tmp_path)


def test_toy_model_loads_through_the_component_loaders():
    from mflux2.models.text_encoder import load_text_encoder
    from mflux2.models.transformer import load_transformer
    from mflux2.models.vae import load_vae

    tf = load_transformer(TOY)
    assert (tf.config.num_layers, tf.config.num_single_layers, tf.config.hidden_size) == (2, 2, 64)
    assert tf.img_in.weight.dtype == mx.bfloat16
    vae = load_vae(TOY)
    assert vae.config.latent_channels == 32 and len(vae.config.block_out_channels) == 4
    assert vae.bn.running_var.dtype == mx.float32 and float(mx.std(vae.bn.running_var)) > 0  # real statistics
    te = load_text_encoder(TOY, "klein-base-4b")  # the real default taps (9, 18, 27)
    assert te.num_layers == 28 and te.joint_attention_dim == tf.config.joint_attention_dim
    ids, _ = te.tokenize(["a red sks on a blue background"])
    words = te.tokenizer.convert_ids_to_tokens(ids[0, :12].tolist())
    assert "Ġsks" in words and "Ġbackground" in words  # the trigger and the toy words are single tokens


# Held-out prompts (never trained on) and seeds, scored together. Measured on this model: see
# docs/toy-model.md; the bound leaves room for float differences between machines.
PROMPTS = [("red", "circle", "blue"), ("green", "square", "red"), ("purple", "triangle", "green")]
MIN_ATTRIBUTE_ACCURACY = 0.75  # over the 9 attributes (3 images x colour/shape/background)


def test_toy_model_follows_held_out_prompts():
    from mflux2.pipeline import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(TOY)
    assert pipe.family == "klein-base" and pipe.variant is None
    images = []
    for i, combo in enumerate(PROMPTS):
        images += pipe.generate(toy_data.caption(*combo), width=64, height=64, seed=100 + i, num_inference_steps=20,
                                guidance_scale=4.0, progress=False)  # (as measured: klein-base's guidance)
    assert images[0].size == (64, 64)
    result = score(images, PROMPTS)
    attributes = (result["colour"] + result["shape"] + result["background"]) / 3
    assert attributes >= MIN_ATTRIBUTE_ACCURACY, result
    # the prompt matters: another prompt from the same noise gives another image
    other = pipe.generate(toy_data.caption("yellow", "square", "purple"), width=64, height=64, seed=100, num_inference_steps=20,
                          guidance_scale=4.0, progress=False)[0]
    assert np.abs(np.asarray(other, np.float32) - np.asarray(images[0], np.float32)).mean() > 20
