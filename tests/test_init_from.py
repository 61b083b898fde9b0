"""lora.init_from: a new run starts from an existing adapter (tiny FLUX.2 model, CPU)."""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mflux2 import lora as lora_mod
from mflux2.lora_formats import DoRAWeights, LoRAError, LoRAWeights, read_lora
from mflux2.models.transformer import load_transformer
from mflux2.training import init_from
from mflux2.training.config_loading import load_config
from mflux2.training.memory import _source_config
from mflux2.training.preflight import preflight
from mflux2.training.trainer import Trainer
from tests.tiny_flux2 import build_tiny_klein, make_images
from test_hub import add_to_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_klein(root / "model"), make_images(root / "data", n=3, size=64)


def make_lora(model_dir, path, rank=4, targets="attention", alpha=8.0, seed=3, **knobs):
    """An adapter (`type=` in knobs, default LoRA) for the tiny model with every parameter random and
    non-zero (a fresh one's B = 0 would prove nothing; DoRA's magnitude off ‖W‖). The default bfl
    layout writes DoRA in ComfyUI's form (dora_scale relative to the base weights)."""
    model = load_transformer(model_dir, dtype=mx.float32)
    lora_mod.apply_lora(model, rank=rank, alpha=alpha, targets=targets, **knobs)
    g = np.random.default_rng(seed)
    for _, layer in lora_mod.lora_layers(model):
        for k in layer.param_names():
            noise = mx.array(g.standard_normal(layer[k].shape).astype(np.float32))
            layer[k] = layer[k] * (1 + 0.1 * noise) if k == "magnitude" else noise * 0.3
    return lora_mod.save_lora(path, model, metadata={"trigger_word": "old"})


def write_config(folder, tiny, steps=2, **lora):
    model, data = tiny
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": {"path": str(model), "quantization": "bf16", "transformer_quantization": "bf16"},
        "lora": {"rank": 4, "alpha": 2.0, "target_layers": "attention", **lora},  # alpha 2 != the file's 8: B is rescaled
        "dataset": {"path": str(data), "trigger_word": "sks"},
        "training": {"max_steps": steps, "learning_rate": 1e-3, "log_every_n_steps": 1, "seed": 7},
        "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "thing"},
        "memory": {"bucketing": {"resolutions": [64]}, "compile_training": False},
        "checkpoints": {"output": str(folder / "out"), "save_every": 1},
        "validation": {"prompts": []},
    }
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def started(tiny, tmp_path_factory):
    """An uninterrupted 2-step run started from a LoRA file."""
    root = tmp_path_factory.mktemp("started")
    lora = make_lora(tiny[0], root / "init.safetensors")
    cfg = write_config(root / "a", tiny, init_from=str(lora))
    logs = []
    Trainer(load_config(cfg), log=logs.append).run()
    return lora, root / "a" / "out", logs


def _load_the_file_instead(monkeypatch, lora):
    """Runs from now on put `lora` in with load_lora(trainable=True) in place of a fresh adapter: the
    reference an init_from run must equal."""
    original = Trainer._load_transformer

    def with_file_loaded(self):
        model = original(self)
        lora_mod.remove_lora(model)
        lora_mod.load_lora(model, lora, trainable=True)
        return model

    monkeypatch.setattr(Trainer, "_load_transformer", with_file_loaded)


def test_a_run_starts_at_step_0_from_the_files_weights(tiny, started, tmp_path, monkeypatch):
    lora, out, logs = started
    a = rows(out)
    assert [r["step"] for r in a] == [1, 2]  # a fresh step count
    assert a[0]["dop_loss"] > 0  # the preservation term is 0 at step 0 for a fresh LoRA (B = 0)
    assert any("lora.init_from: starting from" in line for line in logs)
    meta = mx.load(str(out / "lora_final.safetensors"), return_metadata=True)[1]
    assert meta["init_from"] == str(lora) and meta["training_steps"] == "2"

    # the same run, the file put in by load_lora(trainable=True) instead: the first step's loss is the same
    _load_the_file_instead(monkeypatch, lora)
    Trainer(load_config(write_config(tmp_path / "b", tiny)), log=lambda *_: None).run()
    b = rows(tmp_path / "b" / "out")
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)
    assert a[0]["dop_loss"] == pytest.approx(b[0]["dop_loss"], rel=1e-5)


# each type with knobs that make the configured scale matter (alpha 2 vs the file's 8): a factored LoKr W2
TYPES = {"dora": {"type": "dora"}, "lokr": {"type": "lokr", "factor": 2}, "loha": {"type": "loha"}}


@pytest.mark.parametrize("kind", list(TYPES))
def test_every_type_starts_from_the_files_adapter(tiny, tmp_path, monkeypatch, kind):
    """The first step's loss (and DOP's prior-preservation loss, which is 0 for a fresh adapter)
    equals that of the same run with the file loaded trainable by load_lora: every parameter of
    every layer (DoRA's magnitude, read from ComfyUI's dora_scale against the model's own
    weights; LoKr's halves; LoHa's four) comes from the file, the single blocks' ranges included."""
    knobs = TYPES[kind]
    lora = make_lora(tiny[0], tmp_path / f"{kind}.safetensors", **knobs)
    lines = []  # the dry run reads and checks it as the run does
    assert preflight(load_config(write_config(tmp_path / "a", tiny, steps=1, init_from=str(lora), **knobs)), out=lines.append,
                     err=lines.append) == 0
    assert any(f"lora.init_from: {lora} (" in line and f"{kind} layers" in line and "matches the lora: section" in line for line in lines)
    logs = []
    Trainer(load_config(write_config(tmp_path / "a", tiny, steps=1, init_from=str(lora), **knobs)), log=logs.append).run()
    a = rows(tmp_path / "a" / "out")
    assert any(f"lora.init_from: starting from {lora}" in line and kind in line for line in logs)
    _load_the_file_instead(monkeypatch, lora)
    Trainer(load_config(write_config(tmp_path / "b", tiny, steps=1, **knobs)), log=lambda *_: None).run()
    b = rows(tmp_path / "b" / "out")
    assert a[0]["dop_loss"] > 0
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)
    assert a[0]["dop_loss"] == pytest.approx(b[0]["dop_loss"], rel=1e-5)


def test_resume_wins_over_init_from(tiny, started, tmp_path):
    lora, uninterrupted, _ = started
    cfg = write_config(tmp_path, tiny, init_from=str(lora))

    def stop_at_1(trainer, step):
        if step == 1:
            (trainer.output / ".stop").write_text("")

    first = Trainer(load_config(cfg), log=lambda *_: None, on_step=stop_at_1)
    first.run()
    assert first.result["step"] == 1
    logs = []
    second = Trainer(load_config(cfg), log=logs.append)
    second.run()
    assert second.result["step"] == 2
    assert any("lora.init_from" in line and "ignored" in line and "checkpoint_000001" in line for line in logs)
    # the resumed run carries on from the checkpoint: its LoRA equals the uninterrupted run's
    want, got = mx.load(str(uninterrupted / "lora_final.safetensors")), mx.load(str(tmp_path / "out" / "lora_final.safetensors"))
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    # and the dry run says so
    lines = []
    assert preflight(load_config(cfg), out=lines.append, err=lines.append) == 0
    assert any("lora.init_from" in line and "ignored" in line for line in lines)


MISMATCHES = {  # file knobs, lora: section knobs, the message
    "rank": ({"rank": 2}, {}, "layer double_blocks.0.img_attn.qkv has rank 2, lora.rank is 4"),
    "targets": ({"targets": "all"}, {}, "layer double_blocks.0.img_mlp.0 is in the file but not in lora.target_layers 'attention'"),
    "type": ({"type": "loha"}, {"type": "dora"}, "layer double_blocks.0.img_attn.qkv is a loha adapter, lora.type is dora"),
    "lokr shape": ({"type": "lokr", "factor": 2}, {"type": "lokr", "factor": 4, "decompose_both": True},
                   "layer double_blocks.0.img_attn.qkv: lokr_w1 is (2, 2) in the file, the lora: section (lora.type lokr, rank 4, "
                   "factor 4, decompose_both True) gives (4, 4)"),
    "lokr halves": ({"type": "lokr", "rank": 8}, {"type": "lokr"},
                    "layer double_blocks.0.img_attn.qkv has lokr_w1, lokr_w2 in the file, the lora: section (lora.type lokr, rank 4, "
                    "factor -1, decompose_both False) gives lokr_w1, lokr_w2_a, lokr_w2_b"),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_a_mismatch_stops_the_run_and_the_dry_run(tiny, tmp_path, kind):
    file_knobs, cfg_knobs, want = MISMATCHES[kind]
    bad = make_lora(tiny[0], tmp_path / "bad.safetensors", **file_knobs)
    cfg = write_config(tmp_path, tiny, init_from=str(bad), **cfg_knobs)
    lines, errs = [], []
    assert preflight(load_config(cfg), out=lines.append, err=errs.append) == 1
    assert any(want in line for line in lines + errs)
    with pytest.raises(LoRAError) as e:
        Trainer(load_config(cfg), log=lambda *_: None).run()
    assert want in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / ".latent_cache").exists() or not any((tmp_path / "out" / ".latent_cache").iterdir())


def test_check_names_the_first_mismatching_layer(tiny, tmp_path):
    from mflux2.model_files import resolve_source

    cfg = load_config(write_config(tmp_path, tiny, init_from="x"))
    expected = init_from.expected_layers(_source_config(resolve_source(tiny[0])), "attention")
    good, _ = read_lora(make_lora(tiny[0], tmp_path / "good.safetensors"))
    init_from.check(good, expected, cfg.lora, "x")  # passes
    first = "double_blocks.0.img_attn.qkv"
    w = good[first]
    cases = {
        "is a dora adapter, lora.type is lora": {**good, first: DoRAWeights(w.A, w.B, w.alpha, magnitude=mx.ones(w.shape[0]))},
        f"shape mismatch for {first}: file (48, 24)": {**good, first: LoRAWeights(w.A[:, :24], w.B[:48], w.alpha)},
        f"layer {first} is in lora.target_layers 'attention' but not in the file": {k: v for k, v in good.items() if k != first},
    }
    outside = good["single_blocks.0.linear2"]
    a = mx.array(outside.A)
    a[:, -1] = 1.0  # a change to linear2's MLP columns, outside 'attention'
    cases["single_blocks.0.linear2 changes weights outside"] = {**good, "single_blocks.0.linear2": LoRAWeights(a, outside.B, outside.alpha)}
    for msg, weights in cases.items():
        with pytest.raises(LoRAError, match="^lora.init_from x: .*" + msg.replace("(", r"\(").replace(")", r"\)")):
            init_from.check(weights, expected, cfg.lora, "x")


@pytest.mark.parametrize("kind", ["lokr", "loha", "dora"])
def test_check_other_types_outside_the_attention_range(tiny, tmp_path, kind):
    """A file whose single-block linear2 adapter reaches the MLP columns (outside 'attention') is
    refused for every type, naming the parameter; the file as written passes."""
    from mflux2.model_files import resolve_source

    knobs = TYPES[kind]
    cfg = load_config(write_config(tmp_path, tiny, init_from="x", **knobs))
    source = resolve_source(tiny[0])
    expected = init_from.expected_layers(_source_config(source), "attention")
    good = init_from.read(make_lora(tiny[0], tmp_path / "good.safetensors", **knobs), source, "x")
    init_from.check(good, expected, cfg.lora, "x")  # passes
    name = "single_blocks.0.linear2"
    w = good[name]
    field, param = {"lokr": ("w1", "lokr_w1"), "loha": ("w1_b", "hada_w1_b"), "dora": ("A", "lora_A")}[kind]
    x = mx.array(getattr(w, field))
    x[:, -1] = 1.0  # the last input column (of W1: a block of them): the MLP's
    bad = {**good, name: replace(w, **{field: x})}
    with pytest.raises(LoRAError, match=f"^lora.init_from x: {name} changes weights outside .*attention.*\\({param}\\)"):
        init_from.check(bad, expected, cfg.lora, "x")


def test_resolve_files_folders_and_the_hub(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    lora = make_lora(tiny[0], tmp_path / "run" / "lora_final.safetensors")
    assert init_from.resolve(str(lora)) == lora
    assert init_from.resolve(str(tmp_path / "run")) == lora  # an mflux2 output folder
    (tmp_path / "two").mkdir()
    for n in ("a", "b"):
        (tmp_path / "two" / f"{n}.safetensors").write_bytes(lora.read_bytes())
    with pytest.raises(LoRAError, match="several .safetensors files"):
        init_from.resolve(str(tmp_path / "two"))
    with pytest.raises(LoRAError, match="^lora.init_from .*typo.safetensors: no such file or folder"):
        init_from.resolve(str(tmp_path / "run" / "typo.safetensors"))

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = add_to_cache(cache, "someone/tiny-lora", {"tiny_lora.safetensors": lora.read_bytes(), "README.md": b"hi"})
    assert init_from.resolve("someone/tiny-lora") == snapshot / "tiny_lora.safetensors"
    assert init_from.resolve("someone/tiny-lora/tiny_lora.safetensors") == snapshot / "tiny_lora.safetensors"
    assert init_from.resolve("someone/tiny-lora", local_only=True) == snapshot / "tiny_lora.safetensors"
    assert init_from.resolve("someone/other", local_only=True) is None
    with pytest.raises(LoRAError, match=r"^lora.init_from someone/other: someone/other is not in the Hugging Face cache .*offline mode is on"):
        init_from.resolve("someone/other")
    # the dry run checks a cached hub adapter, and refuses one it cannot get offline
    lines = []
    assert preflight(load_config(write_config(tmp_path / "c", tiny, init_from="someone/tiny-lora")), out=lines.append,
                     err=lines.append) == 0
    assert any("lora.init_from: " in line and "matches the lora: section" in line for line in lines)
    lines = []
    assert preflight(load_config(write_config(tmp_path / "d", tiny, init_from="someone/other")), out=lines.append,
                     err=lines.append) == 1
    assert any("someone/other is not in the Hugging Face cache" in line for line in lines)
