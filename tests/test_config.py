"""Config loading: the Swift trainer's YAML runs unchanged, defaults, per-model table, overrides,
resume hash, and every error path (one line naming file, key path and value)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mflux2.training.config import (
    MODEL_DEFAULTS,
    SECTIONS,
    ConfigError,
    ConfigWarning,
    TrainConfig,
    config_hash,
    dump_yaml,
)
from mflux2.training.config_loading import apply_overrides, config_from_dict, load_config
from mflux2.training.data import names_trigger

ROOT = Path(__file__).resolve().parents[1]

# A config in the Swift trainer's style, exercising its quirks: `1e-4` (a string to YAML 1.1),
# `learning_curve_smoothing` (the Swift source's key), a camel-case weighting name it accepts,
# and keys it reads that we cannot honour.
SWIFT_STYLE = """\
model:
  name: klein-4b
  quantization: int8
lora:
  rank: 16
  target_layers: attention
dataset:
  path: ./examples/tarot-style/train
  trigger_word: rwaite
  caption_format: txt
training:
  batch_size: 1
  gradient_accumulation: 1
  max_steps: 1000
  warmup_steps: 50
  learning_rate: 1e-4
  weight_decay: 0.0001
  log_every_n_steps: 10
  eval_every_n_steps: 10
loss:
  timestep_sampling: balanced
  weighting: bellShaped
checkpoints:
  output: ./output/tarot-lora
  save_every: 250
  keep_last: 5
  learning_curve: true
  learning_curve_smoothing: 15
validation:
  every_n_steps: 250
  seed: 42
  steps: 4
  prompts:
    - prompt: "a wizard in a forest"
      is_512: true
      is_1024: false
      apply_trigger: true
    - "a castle at night"
  vlm_scoring:
    enabled: true
    scene_weight: 0.5
early_stop:
  enabled: true
  on_overfit: true
  max_gap: 0.3
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_quiet(path, overrides=None) -> TrainConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(path, overrides)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_quiet(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Loading what users have
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path)
    # a preset by name, or (the quickstart) the bundled model folder by path
    assert cfg.model.name in MODEL_DEFAULTS or (ROOT / cfg.model.path).is_dir()
    assert all(d.path for d in cfg.dataset_list) and cfg.checkpoints.output
    triggers = {d.trigger_word for d in cfg.dataset_list if d.trigger_word and not d.is_regularization}
    with_trigger = [p.apply_trigger or any(names_trigger(p.prompt, t) for t in triggers) for p in cfg.validation.prompts]
    assert any(with_trigger) and not all(with_trigger)  # DOP is judged by the pair


def test_shipped_configs_match_the_seed_guide():
    cat = load_config(ROOT / "configs/cat-toy.yaml")
    assert (cat.model.name, cat.dataset.path, cat.dataset.trigger_word) == ("klein-4b", "diffusers/cat_toy_example", "sks")
    assert cat.loss.diff_output_preservation and cat.loss.diff_output_preservation_class == "toy"
    tarot = load_config(ROOT / "configs/tarot.yaml")
    assert not tarot.loss.diff_output_preservation
    k9 = load_config(ROOT / "configs/klein-9b-subject.yaml")
    assert k9.model.name == "klein-9b" and k9.loss.diff_output_preservation_every_n_steps == 4
    dev = load_config(ROOT / "configs/dev-subject.yaml")
    assert (dev.model.name, dev.model.quantization, dev.lora.target_layers) == ("dev", "int8", "attention")
    assert dev.loss.diff_output_preservation_every_n_steps == 8


def test_swift_style_config_runs_unchanged(tmp_path):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cfg = load_config(write(tmp_path, SWIFT_STYLE))
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # "1e-4" is a string to PyYAML
    assert cfg.loss.weighting == "bell_shaped"
    assert cfg.checkpoints.learning_curve_smoothing_window == 15
    assert cfg.lora.alpha == 16.0  # absent alpha = rank, as in the Swift trainer
    assert [p.prompt for p in cfg.validation.prompts] == ["a wizard in a forest", "a castle at night"]
    assert cfg.validation.prompts[1].apply_trigger and cfg.validation.prompts[1].is_512  # string = defaults
    assert cfg.early_stop.on_overfit and cfg.early_stop.max_gap == pytest.approx(0.3)
    # validation.vlm_scoring is honoured (training/scoring.py), with the Swift defaults for the keys left out
    assert [str(w.message) for w in rec] == []
    vs = cfg.validation.vlm_scoring
    assert vs.enabled and vs.scene_weight == 0.5 and vs.max_reference_images == 3 and vs.degradation_threshold == 15.0


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("dataset: {path: d}\nmodel: {use_base: false}", "model.use_base"),
        ("dataset: {path: d}\nmemory: {cache_latents: false}", "memory.cache_latents"),
        ("dataset: {path: d}\nmemory: {cache_text_embeddings: false}", "memory.cache_text_embeddings"),
        ("dataset: {path: d}\nmemory: {cpu_offload: false}", "memory.cpu_offload"),
        ("dataset: {path: d}\ntraining: {lr_scheduler: cosine_with_restarts}", "training.lr_scheduler"),
        ("dataset: {path: d}\nmodel: {name: klein-9b-kv}", "model.name"),
        ("dataset: {path: d}\nvalidation: {width: 768, prompts: [x]}", "validation.width"),
        ("dataset: {path: d}\nmodel: {quantization: nf4}", "model.quantization"),
    ],
)
def test_keys_we_cannot_honour_warn_in_one_line(tmp_path, yaml_text, key):
    with pytest.warns(ConfigWarning) as rec:
        load_config(write(tmp_path, yaml_text))
    msgs = [str(w.message) for w in rec]
    assert any(key in m and "\n" not in m for m in msgs), msgs


def test_nf4_is_int4(tmp_path):
    cfg = load_quiet(write(tmp_path, "dataset: {path: d}\nmodel: {quantization: nf4}"))
    assert cfg.model.quantization == "int4"


def test_reference_image_is_one_path_or_a_list_read_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.png").write_bytes(b"")
    (tmp_path / "s.png").write_bytes(b"")
    cfg = load_quiet(write(tmp_path, "dataset: {path: d}\nvalidation: {prompts: [{prompt: x, reference_image: r.png},\n"
                                     "  {prompt: y, reference_image: [r.png, s.png]}, z]}"))
    assert [p.reference_image for p in cfg.validation.prompts] == [["r.png"], ["r.png", "s.png"], None]
    for text, key in (("[{prompt: x}, {prompt: y, reference_image: nope.png}]", "validation.prompts[1].reference_image:"),
                      ("[{prompt: y, reference_image: [r.png, no.png]}]", "validation.prompts[0].reference_image[1]:")):
        with pytest.raises(ConfigError) as e:
            load_quiet(write(tmp_path, f"dataset: {{path: d}}\nvalidation: {{prompts: {text}}}"))
        msg = str(e.value)
        assert key in msg and "no such file" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"reference_image: must not be empty"):
        load_quiet(write(tmp_path, "dataset: {path: d}\nvalidation: {prompts: [{prompt: y, reference_image: []}]}"))


def test_legacy_single_validation_prompt(tmp_path):
    cfg = load_quiet(write(tmp_path, "dataset: {path: d}\nvalidation: {prompt: a cat}"))
    (p,) = cfg.validation.prompts
    assert (p.prompt, p.is_512, p.is_1024, p.apply_trigger) == ("a cat", True, True, True)


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------


def test_defaults_follow_the_spec_then_the_swift_trainer(tmp_path):
    # the seed guide's defaults stand; where it is silent, what the Swift trainer really does
    cfg = load_quiet(write(tmp_path, "dataset: {path: d}", "my-run.yaml"))
    assert cfg.model.name == "klein-4b" and cfg.model.transformer_quantization == "auto"
    assert cfg.model.use_base and cfg.model.quantization == "int8"  # Swift: base weights, int8 text encoder
    assert (cfg.training_variant, cfg.validation_variant) == ("klein-base-4b", "klein-4b")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (32, 32.0, 0.0)  # the seed guide
    assert cfg.lora.target_layers == "all"  # Swift trains attention + FFN whatever target_layers says
    t = cfg.training
    assert (t.batch_size, t.gradient_accumulation, t.optimizer, t.learning_rate, t.weight_decay, t.caption_dropout) == (
        1, 1, "adamw", 1e-4, 1e-4, 0.0)
    assert (t.epochs, t.max_steps, t.warmup_steps, t.lr_scheduler, t.max_grad_norm) == (10, 1000, 0, "constant", 1.0)
    assert (cfg.loss.timestep_sampling, cfg.loss.weighting) == ("balanced", "uniform")
    assert (cfg.loss.logit_normal_mean, cfg.loss.logit_normal_std) == (0.0, 1.0)
    assert not cfg.loss.diff_output_preservation and cfg.loss.diff_output_preservation_multiplier == 1.0
    assert cfg.loss.diff_output_preservation_every_n_steps == 1
    m = cfg.memory
    assert (m.gradient_checkpointing, m.cache_latents, m.cache_text_embeddings, m.compile_training) == (False, True, True, True)
    assert m.bucketing.enabled and m.bucketing.resolutions == [512] and cfg.resolutions == [512]
    assert (cfg.checkpoints.output, cfg.checkpoints.save_every) == ("output/my-run", 125)
    assert cfg.checkpoints.learning_curve and cfg.checkpoints.learning_curve_smoothing_window == 20
    assert cfg.validation.every_n_steps == 125  # follows save_every: the images go in the checkpoints
    assert (cfg.validation.steps, cfg.validation.guidance) == (4, 1.0)  # the distilled klein, as Swift
    assert (cfg.ema.enabled, cfg.ema.decay) == (False, 0.99)
    assert not cfg.early_stop.enabled


@pytest.mark.parametrize("name", ["klein-4b", "klein-9b", "dev", "klein-base-4b", "klein-base-9b"])
def test_dop_every_n_defaults_to_the_seed_guides_1_for_every_model(tmp_path, name):
    text = f"model: {{name: {name}}}\ndataset: {{path: d, trigger_word: sks}}\nloss: {{diff_output_preservation: true, diff_output_preservation_class: cat}}"
    cfg = load_quiet(write(tmp_path, text))
    assert cfg.loss.diff_output_preservation_every_n_steps == 1


@pytest.mark.parametrize(
    "name, use_base, training, validation, repo",
    [
        ("klein-4b", None, "klein-base-4b", "klein-4b", "black-forest-labs/FLUX.2-klein-base-4B"),
        ("klein-9b", None, "klein-base-9b", "klein-9b", "black-forest-labs/FLUX.2-klein-base-9B"),
        ("klein-4b", False, "klein-4b", "klein-4b", "black-forest-labs/FLUX.2-klein-4B"),
        ("klein-9b", False, "klein-9b", "klein-9b", "black-forest-labs/FLUX.2-klein-9B"),
        ("klein-9b-kv", None, "klein-base-9b", "klein-9b", "black-forest-labs/FLUX.2-klein-base-9B"),
        ("dev", None, "dev", "dev", "black-forest-labs/FLUX.2-dev"),
        ("klein-base-4b", None, "klein-base-4b", "klein-base-4b", "black-forest-labs/FLUX.2-klein-base-4B"),
        ("klein-4b-base", None, "klein-base-4b", "klein-base-4b", "black-forest-labs/FLUX.2-klein-base-4B"),  # Swift's spelling
        ("klein-base-9b", None, "klein-base-9b", "klein-base-9b", "black-forest-labs/FLUX.2-klein-base-9B"),
    ],
)
def test_klein_names_train_the_base_weights_and_validate_with_the_distilled_model(tmp_path, name, use_base, training, validation, repo):
    model = f"{{name: {name}" + ("" if use_base is None else f", use_base: {str(use_base).lower()}") + "}"
    cfg = load_quiet(write(tmp_path, f"model: {model}\ndataset: {{path: d}}"))
    assert (cfg.training_variant, cfg.validation_variant, cfg.model_repo) == (training, validation, repo)
    assert cfg.validation_repo == (None if training == validation else MODEL_DEFAULTS[validation].repo)
    steps = MODEL_DEFAULTS[validation].validation_steps
    assert cfg.validation.steps == steps and cfg.validation.guidance == MODEL_DEFAULTS[validation].validation_guidance


def test_model_path_alone_has_no_variant_and_validation_path_is_ours(tmp_path):
    cfg = load_quiet(write(tmp_path, f"model: {{path: {ROOT / 'models/toy'}, validation_path: some/repo}}\ndataset: {{path: d}}"))
    assert (cfg.model.name, cfg.training_variant, cfg.validation_variant, cfg.model_repo) == (None, None, None, None)
    assert cfg.validation_repo == "some/repo"


def test_use_base_false_warns_what_swift_would_train(tmp_path):
    with pytest.warns(ConfigWarning) as rec:
        load_config(write(tmp_path, "model: {name: klein-9b, use_base: false}\ndataset: {path: d}"))
    (msg,) = [str(w.message) for w in rec]
    assert "model.use_base" in msg and "distilled klein-9b" in msg and "klein-base-9b" in msg
    with pytest.warns(ConfigWarning, match="no effect on dev"):
        load_config(write(tmp_path, "model: {name: dev, use_base: false}\ndataset: {path: d}"))
    with warnings.catch_warnings():  # use_base: true (Swift files carry it) is what happens anyway
        warnings.simplefilter("error")
        load_config(write(tmp_path, "model: {name: dev, use_base: true}\ndataset: {path: d}"))


def test_klein_9b_kv_is_klein_9b_with_one_line_saying_so(tmp_path):
    with pytest.warns(ConfigWarning) as rec:
        cfg = load_config(write(tmp_path, "model: {name: klein-9b-kv}\ndataset: {path: d}"))
    assert cfg.model.name == "klein-9b"
    (msg,) = [str(w.message) for w in rec]
    assert "KV-cached" in msg and "klein-base-9b" in msg and "\n" not in msg


def test_epochs_without_max_steps_is_epochs_times_100_as_swift(tmp_path):
    # TrainLoRACommand.swift:707: maxSteps = config.maxSteps ?? (config.epochs * 100)
    with pytest.warns(ConfigWarning, match=r"training\.epochs: 3 without max_steps trains 300 steps"):
        cfg = load_config(write(tmp_path, "dataset: {path: d}\ntraining: {epochs: 3}"))
    assert cfg.training.max_steps == 300
    assert load_quiet(write(tmp_path, "dataset: {path: d}\ntraining: {epochs: 3, max_steps: 7}")).training.max_steps == 7


def test_warnings_come_once_per_key(tmp_path):
    text = "dataset: {path: d, trigger_word: t}\nvalidation: {prompts: [{prompt: a, is_512: false}, {prompt: b, is_512: false}]}"
    with pytest.warns(ConfigWarning) as rec:
        load_config(write(tmp_path, text))
    assert sum("makes no image" in str(w.message) for w in rec) == 1


def test_print_config_says_where_each_value_came_from(tmp_path):
    text = "model: {name: klein-9b}\nlora: {rank: 8}\ndataset: {path: d, trigger_word: sks}\nloss: {diff_output_preservation: true}\ncheckpoints: {save_every: 50}"
    cfg = load_quiet(write(tmp_path, text), overrides={"training.max_steps": 20})
    out = cfg.dump_yaml(annotate=True)
    assert yaml.safe_load(out) == cfg.to_dict()  # still the resolved config, comments aside
    line = {l.split(":")[0].strip(): l for l in out.splitlines() if ":" in l}
    assert line["rank"].endswith("# from file") and line["max_steps"].endswith("# from override")
    assert line["alpha"].endswith("# Swift default")  # = rank, as the Swift trainer
    assert line["quantization"].endswith("# Swift default") and line["target_layers"].endswith("# Swift default")
    assert "# mflux2 default: the seed guide's balanced (Swift: uniform)" in line["timestep_sampling"]
    assert "# mflux2 default: the seed guide's 1e-4 (Swift: 0.01)" in line["weight_decay"]
    assert "# mflux2 default: the seed guide's 125" not in out  # save_every came from the file
    assert "every_n_steps: 50" in line["every_n_steps"] and "= checkpoints.save_every" in line["every_n_steps"]
    assert "Swift default: assumed" in line["diff_output_preservation_class"]
    labels = cfg.provenance_labels()
    assert set(labels) == {p for p in _leaves(cfg.to_dict())}
    assert all(l.startswith(("from file", "from override", "Swift default", "mflux2 default: ")) for l in labels.values())


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_model_repo_ids():
    assert MODEL_DEFAULTS["klein-4b"].repo == "black-forest-labs/FLUX.2-klein-4B"
    assert MODEL_DEFAULTS["klein-9b"].repo == "black-forest-labs/FLUX.2-klein-9B"
    assert MODEL_DEFAULTS["dev"].repo == "black-forest-labs/FLUX.2-dev"
    assert MODEL_DEFAULTS["klein-base-4b"].repo == "black-forest-labs/FLUX.2-klein-base-4B"


def test_model_path_alone_takes_architecture_from_folder(tmp_path):
    (tmp_path / "toy-model").mkdir()
    cfg = load_quiet(write(tmp_path, f"model: {{path: {tmp_path / 'toy-model'}}}\ndataset: {{path: d}}"))
    assert cfg.model.name is None and cfg.model.path == str(tmp_path / "toy-model")
    assert cfg.loss.diff_output_preservation_every_n_steps == 1 and cfg.validation.steps is None
    cfg.resolve_model_defaults("dev")  # the trainer does this once it has read the folder
    assert (cfg.validation.steps, cfg.validation.guidance) == (28, 4.0)
    both = load_quiet(write(tmp_path, f"model: {{name: klein-9b, path: {tmp_path / 'toy-model'}}}\ndataset: {{path: d}}"))
    assert both.model.name == "klein-9b" and both.validation.steps == 4


def test_lion_defaults_and_model_name_aliases(tmp_path):
    cfg = load_quiet(write(tmp_path, "model: {name: KLEIN-4B-base}\ndataset: {path: d}\ntraining: {optimizer: lion}"))
    assert cfg.model.name == "klein-base-4b"
    assert (cfg.training.learning_rate, cfg.training.weight_decay) == (3e-5, 0.1)


def test_gradient_checkpointing_bool_or_every_n_blocks(tmp_path):
    for value, every in (("true", 1), ("false", 0), ("2", 2), ("0", 0)):
        cfg = load_quiet(write(tmp_path, f"dataset: {{path: d}}\nmemory: {{gradient_checkpointing: {value}}}"))
        assert cfg.memory.checkpoint_every == every


def test_resolutions_sorted_deduplicated_and_bucketing_off(tmp_path):
    cfg = load_quiet(write(tmp_path, "dataset: {path: d, image_size: 768}\nmemory: {bucketing: {resolutions: [1024, 512, 1024]}}"))
    assert cfg.memory.bucketing.resolutions == [512, 1024]
    cfg = load_quiet(write(tmp_path, "dataset: {path: d, image_size: 768}\nmemory: {bucketing: {enabled: false}}"))
    assert cfg.resolutions == [768]
    # a Swift config that sets only image_size keeps its size (the Swift default has bucketing off)
    cfg = load_quiet(write(tmp_path, "dataset: {path: d, image_size: 768}"))
    assert cfg.memory.bucketing.enabled and cfg.memory.bucketing.resolutions == [768] == cfg.resolutions


def test_int_is_accepted_for_float_and_empty_value_keeps_default(tmp_path):
    cfg = load_quiet(write(tmp_path, "dataset: {path: d}\nlora: {alpha: 16, rank: }\nloss: {flux_shift: 3}"))
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float) and cfg.lora.rank == 32
    assert cfg.loss.flux_shift == 3.0


# ---------------------------------------------------------------------------------------------
# Round trips, overrides, resume hash
# ---------------------------------------------------------------------------------------------


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_quiet(write(tmp_path, SWIFT_STYLE))
    again = load_quiet(write(tmp_path, dump_yaml(cfg), "dumped.yaml"))
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert set(cfg.to_dict()) == set(SECTIONS)
    assert "raw" not in cfg.to_dict() and "source" not in cfg.to_dict()


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, SWIFT_STYLE)
    cfg = load_quiet(path, {"training.max_steps": 10, "checkpoints.output": str(tmp_path / "out")})
    assert cfg.training.max_steps == 10 and cfg.checkpoints.output == str(tmp_path / "out")
    cfg2 = apply_overrides(cfg, {"lora.rank": 8})
    assert cfg2.lora.rank == 8 and cfg2.lora.alpha == 8.0  # alpha re-derived from the raw file, not frozen at 16
    assert cfg2.training.max_steps == 10  # earlier overrides are kept
    assert apply_overrides(cfg, {"checkpoints.learning_curve_smoothing": 7}).checkpoints.learning_curve_smoothing_window == 7
    with pytest.raises(ConfigError, match=r"override 'training\.max_stepz'.*did you mean 'max_steps'"):
        apply_overrides(cfg, {"training.max_stepz": 3})
    with pytest.raises(ConfigError, match=r"cfg\.yaml \(override\): training\.max_steps: must be > 0, got 0"):
        apply_overrides(cfg, {"training.max_steps": 0})
    with pytest.raises(ConfigError, match="whole section"):
        apply_overrides(cfg, {"training": {"max_steps": 3}})
    with pytest.raises(ConfigError, match="belongs in dataset.trigger_word"):
        apply_overrides(cfg, {"training.trigger_word": "x"})


def test_config_hash_tracks_only_resume_breaking_fields(tmp_path):
    base = load_quiet(write(tmp_path, SWIFT_STYLE))
    h = config_hash(base)
    for safe in ({"training.max_steps": 5}, {"training.learning_rate": 2e-4}, {"checkpoints.output": "elsewhere"},
                 {"loss.weighting": "uniform"}, {"model.quantization": "bf16"}):
        assert config_hash(apply_overrides(base, safe)) == h, safe
    for breaking in ({"lora.rank": 8}, {"lora.alpha": 4.0}, {"lora.target_layers": "all"}, {"model.name": "klein-9b"}):
        assert config_hash(apply_overrides(base, breaking)) != h, breaking


# ---------------------------------------------------------------------------------------------
# The error matrix
# ---------------------------------------------------------------------------------------------

TYPOS = [
    ("modle: {name: dev}\ndataset: {path: d}", "modle", "model"),
    ("model: {nmae: dev}\ndataset: {path: d}", "model.nmae", "name"),
    ("lora: {rnak: 8}\ndataset: {path: d}", "lora.rnak", "rank"),
    ("dataset: {path: d, trigger_wrod: x}", "dataset.trigger_wrod", "trigger_word"),
    ("dataset: {path: d}\ntraining: {learnig_rate: 0.1}", "training.learnig_rate", "learning_rate"),
    ("dataset: {path: d}\nloss: {timestep_sampeling: content}", "loss.timestep_sampeling", "timestep_sampling"),
    ("dataset: {path: d}\nmemory: {bucketing: {resolution: [512]}}", "memory.bucketing.resolution", "resolutions"),
    ("dataset: {path: d}\ncheckpoints: {save_evry: 5}", "checkpoints.save_evry", "save_every"),
    ("dataset: {path: d}\nvalidation: {prompts: [{promt: x}]}", "validation.prompts[0].promt", "prompt"),
    ("dataset: {path: d}\nema: {decy: 0.9}", "ema.decy", "decay"),
    ("dataset: {path: d}\nearly_stop: {patiense: 3}", "early_stop.patiense", "patience"),
]


@pytest.mark.parametrize("text, keypath, suggestion", TYPOS, ids=[t[1] for t in TYPOS])
def test_misspelled_keys_at_every_level_suggest_the_nearest(tmp_path, text, keypath, suggestion):
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}:"), msg
    assert keypath in msg and f"did you mean '{suggestion}'" in msg, msg


def test_key_in_the_wrong_section_names_its_home(tmp_path):
    msg = error_of(tmp_path, "dataset: {path: d}\ntraining: {trigger_word: sks}")
    assert "training.trigger_word" in msg and "dataset.trigger_word" in msg


BAD_VALUES = [
    # wrong types
    ("lora: {rank: abc}", "lora.rank", "'abc'"),
    ("lora: {rank: 3.5}", "lora.rank", "3.5"),
    ("lora: {rank: true}", "lora.rank", "True"),  # bool is not an int
    ("training: {learning_rate: fast}", "training.learning_rate", "'fast'"),
    ("training: {learning_rate: true}", "training.learning_rate", "True"),
    ("memory: {cache_latents: 'yes'}", "memory.cache_latents", "'yes'"),
    ("memory: {bucketing: {resolutions: '512'}}", "memory.bucketing.resolutions", "'512'"),
    ("validation: {prompts: 5}", "validation.prompts", "5"),
    ("validation: {prompts: [{prompt: 5}]}", "validation.prompts[0].prompt", "5"),
    ("model: klein-4b", "model", "'klein-4b'"),
    ("dataset: {path: d, trigger_word: 123}", "dataset.trigger_word", "123"),
    ("loss: {logit_normal_mean: .nan}", "loss.logit_normal_mean", "nan"),
    # out of range
    ("lora: {rank: 0}", "lora.rank", "0"),
    ("lora: {rank: -4}", "lora.rank", "-4"),
    ("lora: {alpha: 0}", "lora.alpha", "0"),
    ("training: {learning_rate: 0}", "training.learning_rate", "0"),
    ("training: {learning_rate: -1e-4}", "training.learning_rate", "-0.0001"),
    ("training: {max_steps: 0}", "training.max_steps", "0"),
    ("training: {max_steps: -5}", "training.max_steps", "-5"),
    ("training: {batch_size: 0}", "training.batch_size", "0"),
    ("training: {caption_dropout: 1.5}", "training.caption_dropout", "1.5"),
    ("memory: {bucketing: {resolutions: [512, 500]}}", "memory.bucketing.resolutions[1]", "500"),
    ("memory: {bucketing: {resolutions: [8192]}}", "memory.bucketing.resolutions[0]", "8192"),
    ("memory: {bucketing: {resolutions: [32]}}", "memory.bucketing.resolutions[0]", "32"),
    ("memory: {bucketing: {resolutions: []}}", "memory.bucketing.resolutions", "empty"),
    ("memory: {gradient_checkpointing: -1}", "memory.gradient_checkpointing", "-1"),
    ("ema: {decay: 1.0}", "ema.decay", "1.0"),
    # enums
    ("training: {optimizer: sgd}", "training.optimizer", "'sgd'"),
    ("training: {lr_scheduler: cosine_restarts}", "training.lr_scheduler", "'cosine_restarts'"),
    ("model: {name: klein-5b}", "model.name", "'klein-5b'"),
    ("model: {transformer_quantization: fp8}", "model.transformer_quantization", "'fp8'"),
    ("lora: {target_layers: attn}", "lora.target_layers", "'attn'"),
    ("dataset: {path: d, caption_format: csv}", "dataset.caption_format", "'csv'"),
    ("loss: {diff_output_preservation_prompts: ['a cat', 5]}", "loss.diff_output_preservation_prompts[1]", "5"),
]


@pytest.mark.parametrize("text, keypath, shown", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_name_file_line_key_and_value(tmp_path, text, keypath, shown):
    line = 1 if text.startswith("dataset") else 2
    if line == 2:
        text = "dataset: {path: d}\n" + text
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}:{line}: "), msg  # the offending line
    assert f" {keypath}: " in msg and shown in msg, msg


def test_enum_typo_suggests_the_valid_value(tmp_path):
    assert "did you mean 'klein-4b'" in error_of(tmp_path, "dataset: {path: d}\nmodel: {name: klein-4c}")


@pytest.mark.parametrize("key, value", [("weighting", "gaussian"), ("timestep_sampling", "cosine_shifted")])
def test_unknown_sampling_or_weighting_name_trains_uniform_as_swift_does(tmp_path, key, value):
    # TrainingConfigYAML.swift parseTimestepSampling/parseLossWeighting: any other name -> uniform
    with pytest.warns(ConfigWarning) as rec:
        cfg = load_config(write(tmp_path, f"dataset: {{path: d}}\nloss: {{{key}: {value}}}"))
    assert getattr(cfg.loss, key) == "uniform"
    (msg,) = [str(w.message) for w in rec]
    assert f"loss.{key}" in msg and repr(value) in msg and "uniform" in msg and "cfg.yaml:2" in msg


@pytest.mark.parametrize("key, value, meant", [("timestep_sampling", "styel", "style"), ("timestep_sampling", "contnet", "content"),
                                               ("timestep_sampling", "logit-normel", "logit_normal"),
                                               ("weighting", "bell_shapd", "bell_shaped"), ("weighting", "snr_weigthed", "snr_weighted")])
def test_a_near_miss_sampling_or_weighting_name_is_refused_with_the_name_meant(tmp_path, key, value, meant):
    """One or two typing edits from a known name: a typo, which must not quietly train as uniform."""
    msg = error_of(tmp_path, f"dataset: {{path: d}}\nloss: {{{key}: {value}}}")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}:2: loss.{key}: invalid value {value!r}: did you mean {meant!r}?"), msg
    assert "\n" not in msg


def test_dop_without_trigger_is_turned_off_and_without_class_assumes_object(tmp_path):
    # TrainLoRACommand.swift:753-759: DOP needs a trigger word (else off); the class falls back to "object"
    with pytest.warns(ConfigWarning) as rec:
        cfg = load_config(write(tmp_path, "dataset: {path: d}\nloss: {diff_output_preservation: true, diff_output_preservation_class: cat}"))
    assert not cfg.loss.diff_output_preservation
    (msg,) = [str(w.message) for w in rec]
    assert "dataset.trigger_word is not set" in msg and "turned off" in msg and "\n" not in msg
    assert cfg.provenance_labels()["loss.diff_output_preservation"].startswith("from file (true), turned off")
    with pytest.warns(ConfigWarning) as rec:
        cfg = load_config(write(tmp_path, "dataset: {path: d, trigger_word: sks}\nloss: {diff_output_preservation: true}"))
    assert cfg.loss.diff_output_preservation and cfg.loss.diff_output_preservation_class == "object"
    (msg,) = [str(w.message) for w in rec]
    assert "diff_output_preservation_class is not set" in msg and "'object' is assumed" in msg


def test_more_preservation_prompts_are_checked(tmp_path):
    head = "dataset: {path: d, trigger_word: sks}\nloss:\n  diff_output_preservation: true\n  diff_output_preservation_class: cat\n"
    cfg = load_config(write(tmp_path, head + "  diff_output_preservation_prompts: ['', 'a dog on a sofa']"))
    assert cfg.loss.diff_output_preservation_prompts == ["", "a dog on a sofa"]  # "" is the empty prompt
    assert load_config(write(tmp_path, head)).loss.diff_output_preservation_prompts == []  # off by default
    one = load_config(write(tmp_path, head + "  diff_output_preservation_prompts: a dog"))  # one string: a one-item list
    assert one.loss.diff_output_preservation_prompts == ["a dog"]
    # the subject's own word would fight the main loss; a repeat would weight a prompt twice
    msg = error_of(tmp_path, head + "  diff_output_preservation_prompts: ['a dog', 'a SKS on a sofa']")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}:5: loss.diff_output_preservation_prompts[1]: 'a SKS on a sofa' names "
                          "the trigger word 'sks'"), msg
    msg = error_of(tmp_path, head + "  diff_output_preservation_prompts: ['a dog', '', 'a dog']")
    assert "diff_output_preservation_prompts: 'a dog' is given twice" in msg, msg
    # without DOP they have no pass to run in: said once, not silently dropped
    with pytest.warns(ConfigWarning) as rec:
        load_config(write(tmp_path, "dataset: {path: d, trigger_word: sks}\nloss: {diff_output_preservation_prompts: ['']}"))
    (msg,) = [str(w.message) for w in rec]
    assert "loss.diff_output_preservation_prompts: ignored: loss.diff_output_preservation is off" in msg


def test_structural_errors(tmp_path):
    assert "must be a mapping of sections" in error_of(tmp_path, "- a\n- b\n")
    assert "must be a mapping of sections" in error_of(tmp_path, "just a string\n")
    assert "dataset.path: is required" in error_of(tmp_path, "")  # empty file
    assert "dataset.path: is required" in error_of(tmp_path, "model: {name: dev}\n")
    msg = error_of(tmp_path, "dataset:\n  path: d\ntraining:\n  max_steps: 5\n  max_steps: 6\n")
    assert "cfg.yaml:5: training.max_steps: key given twice" in msg
    msg = error_of(tmp_path, f"model: {{path: {tmp_path / 'nope'}}}\ndataset: {{path: d}}\n")
    assert "model.path: no such file or folder" in msg and "nope" in msg


def test_a_relative_model_path_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "models" / "toy").mkdir(parents=True)
    monkeypatch.chdir(work)
    msg = error_of(tmp_path, "dataset: {path: d}\nmodel:\n  path: models/toyy\n")
    assert msg == (f"{tmp_path / 'cfg.yaml'}:3: model.path: no such file or folder: models/toyy (relative to the "
                   f"working folder: {work / 'models' / 'toyy'}); did you mean models/toy?")


def test_yaml_syntax_error_has_line_number(tmp_path):
    msg = error_of(tmp_path, "dataset:\n  path: d\ntraining:\n  max_steps: [1, 2\n  seed: 3\n")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}:") and "invalid YAML" in msg
    line = int(msg.split(":")[1])
    assert 4 <= line <= 6
    msg = error_of(tmp_path, "dataset:\n  path: d\n bad indent: [\n")
    assert "invalid YAML" in msg and ":3:" in msg


def test_missing_file_folder_and_binary(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match="not a UTF-8"):
        load_config(tmp_path / "bin.yaml")
    write(tmp_path, "dataset: {path: d}\ntraining: {max_steps: 2024-13-45}\n", "date.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "date.yaml")


def test_yaml_aliases_recursive_and_exponential(tmp_path):
    assert "validation.prompts[0]" in error_of(tmp_path, "dataset: {path: d}\nvalidation:\n  prompts: &p [*p]\n")
    laughs = "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]\n" for i in range(1, 12))
    assert "unknown section 'a0'" in error_of(tmp_path, laughs + "dataset: {path: d}\n")  # fast, no blow-up
    ok = load_quiet(write(tmp_path, "dataset: {path: d}\nmemory: {bucketing: {resolutions: &r [512, 768]}}\n"))
    assert ok.memory.bucketing.resolutions == [512, 768]


def test_validation_prompt_warnings(tmp_path):
    with pytest.warns(ConfigWarning, match="apply_trigger is true but dataset.trigger_word is not set"):
        load_config(write(tmp_path, "dataset: {path: d}\nvalidation: {prompts: [a cat]}"))
    with pytest.warns(ConfigWarning, match=r"validation.prompts\[0\].*makes no image"):
        load_config(write(tmp_path, "dataset: {path: d, trigger_word: t}\nvalidation: {prompts: [{prompt: a, is_512: false}]}"))


# ---------------------------------------------------------------------------------------------
# Property: random configs only ever raise ConfigError
# ---------------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["klein-4b", "dev", "bf16", "int8", "balanced", "bell_shaped", "1e-4",
                                           "adamw", "lion", "all", "txt", "jsonl", "sks", "cat", "512"]),
)
_values = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=3)), max_leaves=6)


def _section_keys(cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)] + list(getattr(cls, "IGNORED", {})) + list(getattr(cls, "KEY_ALIASES", {}))


@st.composite
def random_configs(draw):
    cfg = {}
    for name, cls in SECTIONS.items():
        if draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(_section_keys(cls) + ["bucketing", "typo_key"]), max_size=5, unique=True))
            cfg[name] = {k: draw(_values) for k in keys}
            if draw(st.integers(0, 9)) == 0:
                cfg[name] = draw(_values)  # a section that is not a mapping
    if draw(st.booleans()) and isinstance(cfg.get("dataset", {}), dict):
        cfg.setdefault("dataset", {})["path"] = "d"
    if draw(st.integers(0, 9)) == 0:
        cfg[draw(st.text(max_size=6))] = draw(_values)
    return cfg


def _typed_value(cls, name):
    """Mostly-valid values for a schema field (so the resolving code runs too), sometimes off by a bit."""
    import dataclasses
    import typing

    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    meta = f.metadata
    if "choices" in meta:
        return st.sampled_from(list(meta["choices"]) + list(meta.get("aliases", {})) + ["bogus"])
    text = str(hint)
    if "list[int]" in text:
        return st.lists(st.sampled_from([64, 512, 500, 768, 1024, 8192]), max_size=3)
    if "list[str]" in text:
        return st.lists(st.sampled_from(["", "a cat", "sks", "a sks dog", "a cat"]), max_size=3)
    if "ValidationPrompt" in text:
        return st.lists(st.one_of(st.text(max_size=5), st.fixed_dictionaries(
            {"prompt": st.text(max_size=5)}, optional={"apply_trigger": st.booleans(), "is_512": st.booleans(), "seed": st.integers(-1, 9)})), max_size=2)
    if "bool" in text and "int" in text:
        return st.one_of(st.booleans(), st.integers(-1, 4))
    if "bool" in text:
        return st.booleans()
    if "int" in text:
        return st.integers(-2, 300)
    if "float" in text:
        return st.one_of(st.floats(-0.5, 2.0), st.sampled_from(["1e-4", "3.0e-5"]))
    if name == "path" and cls.__name__ == "ModelConfig":
        return st.just(None)
    return st.text(min_size=0, max_size=6)


@st.composite
def typed_configs(draw):
    import dataclasses

    cfg: dict = {"dataset": {"path": "d"}}
    for sec, cls in SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(typing_hint(cls, f.name))]
        for n in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
            cfg.setdefault(sec, {})[n] = draw(_typed_value(cls, n))
    return cfg


def typing_hint(cls, name):
    import typing

    return typing.get_type_hints(cls)[name]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(typed_configs())
def test_typed_random_configs_load_or_raise_config_error(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
        assert config_from_dict(yaml.safe_load(cfg.dump_yaml())) == cfg
    assert cfg.training.learning_rate > 0 and cfg.lora.rank > 0 and cfg.lora.alpha > 0
    if cfg.loss.diff_output_preservation:
        assert cfg.dataset.trigger_word and cfg.loss.diff_output_preservation_class
        assert cfg.loss.diff_output_preservation_every_n_steps >= 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_configs(), st.dictionaries(st.sampled_from(["training.max_steps", "lora.rank", "checkpoints.output", "x.y",
                                                          "memory.bucketing.resolutions", "loss"]), _values, max_size=2))
def test_random_configs_raise_only_config_error(data, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            cfg = config_from_dict(data, overrides=overrides)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
    # whatever loads is fully resolved and survives a dump/reload
    assert cfg.dataset.path and cfg.lora.alpha > 0 and cfg.training.learning_rate > 0
    assert all(r % 16 == 0 for r in cfg.memory.bucketing.resolutions)
    assert math.isfinite(cfg.loss.logit_normal_mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        assert config_from_dict(yaml.safe_load(cfg.dump_yaml())) == cfg


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_random_yaml_text_raises_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "replace"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            load_config(path)
        except ConfigError as e:
            assert "\n" not in str(e)


def test_dump_yaml_round_trips_line_break_characters():
    """PyYAML writes U+0085 raw with allow_unicode and reads it back as a space (found by the
    property test above): such a config is dumped escaped."""
    for path in ("0\x85", "a\u2028b", "café"):
        cfg = config_from_dict({"dataset": {"path": path}})
        assert config_from_dict(yaml.safe_load(cfg.dump_yaml())).dataset.path == path
    assert "café" in config_from_dict({"dataset": {"path": "café"}}).dump_yaml()  # readable where it can be


def test_cli_print_config_marks_every_value(tmp_path, capsys):
    from mflux2.training.cli import main

    path = write(tmp_path, "model: {name: klein-4b}\ndataset: {path: d}\nlora: {rank: 8}")
    assert main([str(path), "--print-config", "--max-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["lora"]["rank"] == 8
    values = [l for l in out.splitlines() if not l.rstrip().endswith(":")]
    assert values and all(" # " in l for l in values)
    assert "rank: 8" in out and "# from file" in out and "# from override" in out
    assert "# Swift default" in out and "# mflux2 default: the seed guide's 32" not in out


def test_config_hash_with_the_model_identity_ignores_where_the_model_lies(tmp_path):
    """With the model's identity (architecture + weights fingerprint), model.path and model.name no
    longer count: a moved folder resumes; another model (identity) or LoRA shape does not."""
    base = load_quiet(write(tmp_path, SWIFT_STYLE))
    ident = {"model.config": "c1", "model.weights": "w1"}
    h = config_hash(base, ident)
    assert h != config_hash(base)  # the form written before the identity was recorded stays as it was
    (tmp_path / "moved").mkdir()
    assert config_hash(apply_overrides(base, {"model.path": str(tmp_path / "moved")}), ident) == h
    assert config_hash(base, {**ident, "model.weights": "w2"}) != h
    assert config_hash(apply_overrides(base, {"lora.rank": 8}), ident) != h
