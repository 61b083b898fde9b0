"""Configs written in the Swift trainer's style (tests/swift_configs/, see its README) run unchanged:
each loads, resolves to what flux-2-swift-mlx would train with the same file (LoRA rank, timestep
sampling, the model variant that trains and the one that renders validation images, DOP), warns only
about what it says, and trains 2 steps on the toy model."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open

from mflux2.training.config import ConfigWarning
from mflux2.training.config_loading import load_config
from mflux2.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "swift_configs"

# file -> (rank, timestep_sampling, training_variant, validation_variant, target_layers,
#          DOP (class, every n) or None, max_steps, warnings expected (key names))
EXPECTED = {
    "subject_klein4b.yaml": (32, "balanced", "klein-base-4b", "klein-4b", "all", ("cat", 1), 250, []),
    "subject_klein9b.yaml": (32, "balanced", "klein-base-9b", "klein-9b", "attention", ("cat", 4), 250, []),
    "subject_dev.yaml": (32, "balanced", "dev", "dev", "attention", ("cat", 8), 250, []),
    "style_tarot.yaml": (32, "balanced", "klein-base-4b", "klein-4b", "attention", None, 500, []),
    "lion.yaml": (32, "balanced", "klein-base-4b", "klein-4b", "all", ("cat", 1), 500, []),
    # evaluate-lora writes DOP on without a class word: the Swift trainer assumes "object"
    "evaluate_lora_written.yaml": (32, "balanced", "klein-base-4b", "klein-4b", "all", ("object", 1), 750,
                                   ["loss.diff_output_preservation"]),
    # the guide's short block: rank is the seed guide's 32, target layers Swift's real "all"
    "guide_subject_minimal.yaml": (32, "balanced", "klein-base-4b", "klein-4b", "all", ("cat", 1), 250, []),
    # klein-9b-kv is klein-9b; DOP without a trigger word is off; epochs 2 = 200 steps
    "swift_quirks.yaml": (16, "balanced", "klein-base-9b", "klein-9b", "all", None, 200,
                          ["model.name", "training.epochs", "training.lr_scheduler", "loss.diff_output_preservation",
                           "memory.cache_text_embeddings", "validation.width", "validation.height",
                           "validation.prompts"]),  # apply_trigger without a trigger word
}


def test_the_corpus_is_complete():
    assert sorted(p.name for p in CORPUS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_swift_config_resolves_to_what_swift_trains(name):
    rank, sampling, training, validation, targets, dop, max_steps, warned = EXPECTED[name]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cfg = load_config(CORPUS / name)
    msgs = [str(w.message) for w in rec if issubclass(w.category, ConfigWarning)]
    assert all("\n" not in m for m in msgs)
    assert sorted(m.split(": ")[1] for m in msgs) == sorted(warned), msgs  # once per key, only these
    assert (cfg.lora.rank, cfg.loss.timestep_sampling, cfg.lora.target_layers) == (rank, sampling, targets)
    assert (cfg.training_variant, cfg.validation_variant) == (training, validation)
    assert cfg.training.max_steps == max_steps
    if dop is None:
        assert not cfg.loss.diff_output_preservation
    else:
        assert cfg.loss.diff_output_preservation
        assert (cfg.loss.diff_output_preservation_class, cfg.loss.diff_output_preservation_every_n_steps) == dop
    if validation in ("klein-4b", "klein-9b"):  # the distilled model renders, as the Swift trainer: 4 steps, guidance 1
        assert (cfg.validation.steps, cfg.validation.guidance) == (4, 1.0)
    assert cfg.model.use_base
    labels = cfg.provenance_labels()
    assert labels["lora.rank"] == "from file" or labels["lora.rank"].startswith("mflux2 default: the seed guide")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_swift_config_trains_two_steps_on_the_toy_model(name, tmp_path, monkeypatch):
    """What the run trained, from what its steps were given and what it wrote: the timestep sampling,
    DOP on its steps with the class prompts, the LoRA's rank and targets. (The model variant is the
    toy's here; which variant a config trains is checked above, at config level.)"""
    from mflux2.training import data as data_mod
    from mflux2.training import step as step_mod

    rank, sampling, _, _, targets, dop, _, _ = EXPECTED[name]
    # model.name off, model.path on: the toy model stands in for the named one (variant switching is
    # the trainer's, checked above at config level); two images, small, and no validation images keep it quick.
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted((ROOT / "data" / "toy" / "star").glob("subject_0[01].*")):
        shutil.copy(f, data / f.name)
    overrides = {
        "model.name": None, "model.path": str(ROOT / "models" / "toy"),
        "dataset.path": str(data), "dataset.image_size": 64,
        "memory.bucketing.resolutions": [64], "training.max_steps": 2,
        "checkpoints.output": str(tmp_path / "out"), "checkpoints.save_every": 2,
        "validation.prompts": [], "validation.every_n_steps": 0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config(CORPUS / name, overrides)

    seen = {"sampling": set(), "dop": [], "dop_prompts": []}
    sample = step_mod.sample_timesteps
    monkeypatch.setattr(step_mod, "sample_timesteps", lambda mode, *a, **k: seen["sampling"].add(mode) or sample(mode, *a, **k))
    call = step_mod.TrainStep.__call__
    monkeypatch.setattr(step_mod.TrainStep, "__call__", lambda self, batch, key, dop=False: seen["dop"].append(
        (dop, batch.dop_embeds is not None)) or call(self, batch, key, dop=dop))
    kept = data_mod.preservation_prompts
    monkeypatch.setattr(data_mod, "preservation_prompts", lambda *a: seen["dop_prompts"].extend(kept(*a)) or kept(*a))

    Trainer(cfg, log=lambda *a: None).run()
    out = tmp_path / "out"
    assert (out / "checkpoint_000002" / "training_state.json").is_file()
    assert seen["sampling"] == {sampling}
    if dop is None:
        assert seen["dop"] == [(False, False)] * 2 and not seen["dop_prompts"]
    else:  # DOP on the steps 0, n, 2n, ... with the class word in place of the trigger
        word, every = dop
        assert seen["dop"] == [(True, True), (every == 1, every == 1)]
        assert seen["dop_prompts"] and all(word in p and cfg.dataset.trigger_word not in p for p in seen["dop_prompts"])
    with safe_open(str(out / "lora_final.safetensors"), "np") as f:
        meta, keys = f.metadata(), list(f.keys())
        a_rank = {f.get_tensor(k).shape[0] for k in keys if k.endswith("lora_A.weight")}
    assert (meta["rank"], meta["targets"], a_rank) == (str(rank), targets, {rank})
    mlp = [k for k in keys if "_mlp." in k]  # the double blocks' feed-forward layers: "all" only
    assert (len(mlp) > 0) == (targets == "all"), sorted(keys)[:8]
