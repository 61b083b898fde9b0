"""Issue 31: several datasets with repeats and loss weights, a regularisation set, masked loss and
shuffled captions — the config, the scan, the sampler, the masked step and the trainer (tiny model, CPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mflux2.training.config import ConfigError, ConfigWarning, config_from_dict

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def load(data: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return config_from_dict(data)


def test_dataset_section_is_a_one_item_list(tmp_path):
    cfg = load({"dataset": {"path": str(tmp_path), "trigger_word": "sks"}})
    assert cfg.datasets == [] and cfg.dataset_list == [cfg.dataset]
    assert cfg.dataset.name == tmp_path.name and cfg.dataset.repeats == 1 and cfg.dataset.loss_weight == 1.0
    assert "datasets" not in cfg.to_dict()  # --print-config of a one-dataset file keeps its shape


def test_datasets_take_ai_toolkit_spellings_and_the_dataset_section_as_defaults(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg = load({"dataset": {"trigger_word": "sks", "image_size": 256, "shuffle_tokens": True},
                "datasets": [{"folder_path": str(tmp_path / "a"), "num_repeats": 3, "loss_multiplier": 2},
                             {"path": str(tmp_path / "b"), "is_reg": True, "mask_min_value": 0.1, "alpha_mask": True,
                              "caption_dropout_rate": 0.2, "caption_ext": ".caption", "shuffle_tokens": False}]})
    a, b = cfg.datasets
    assert (a.path, a.repeats, a.loss_weight, a.name, a.image_size, a.shuffle_tokens) == (str(tmp_path / "a"), 3, 2.0, "a", 256, True)
    assert (b.is_regularization, b.mask_min, b.caption_dropout, b.caption_ext, b.shuffle_tokens) == (True, 0.1, 0.2, "caption", False)
    assert cfg.dataset_list == [a, b] and cfg.dataset.trigger_word == "sks"
    assert load(yaml.safe_load(cfg.dump_yaml())) == cfg
    assert load(yaml.safe_load(cfg.dump_yaml(annotate=True))) == cfg


def test_the_trigger_word_of_the_entries_is_the_runs(tmp_path):
    cfg = load({"datasets": [{"path": str(tmp_path), "trigger_word": "sks"}, {"path": "x/reg", "is_reg": True}],
                "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "dog"}})
    assert cfg.dataset.trigger_word == "sks" and cfg.loss.diff_output_preservation


@pytest.mark.parametrize("entries, match", [
    ([{"path": "a", "repeats": 0}], r"datasets\[0\]\.repeats: must be >= 1, got 0"),
    ([{"path": "a", "num_repeats": 0}], r"datasets\[0\]\.num_repeats: must be >= 1, got 0"),
    ([{"path": "a", "loss_weight": 0}], r"datasets\[0\]\.loss_weight: must be > 0, got 0"),
    ([{"path": "a"}, {"path": "a"}], r"datasets\[1\]\.path: 'a' is the same folder as datasets\[0\]\.path"),
    ([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}], r"datasets\[1\]\.name: 'x' is also datasets\[0\]'s name"),
    ([{"repeats": 2}], r"datasets\[0\]\.path: is required"),
    ([{"path": "a", "mask_path": "m", "alpha_mask": True}], r"datasets\[0\]\.alpha_mask: true and datasets\[0\]\.mask_path"),
    ([{"path": "a", "mask_missing": "ful"}], r"datasets\[0\]\.mask_missing: invalid value 'ful'.*did you mean 'full'"),
    ([{"path": "a", "caption_ext": "t t"}], r"datasets\[0\]\.caption_ext: must be a file extension"),
    ([{"path": "a", "repeatz": 2}], r"datasets\[0\]\.repeatz: unknown key 'repeatz' \(did you mean 'repeats'\?\)"),
    ([{"path": "a", "repeats": 2, "num_repeats": 3}], r"give either 'num_repeats' or 'repeats', not both"),
])
def test_bad_dataset_entries_are_one_line_errors(entries, match):
    with pytest.raises(ConfigError, match=match) as e:
        load({"datasets": entries})
    assert "\n" not in str(e.value)


def test_dataset_path_and_datasets_together_is_an_error():
    with pytest.raises(ConfigError, match=r"dataset\.path: give either dataset\.path .* or datasets"):
        load({"dataset": {"path": "a"}, "datasets": [{"path": "b"}]})


def test_a_reg_set_with_its_own_trigger_word_warns():
    with pytest.warns(ConfigWarning, match=r"datasets\[1\]\.trigger_word: is ignored: a regularisation set"):
        config_from_dict({"datasets": [{"path": "a", "trigger_word": "sks"}, {"path": "b", "is_reg": True, "trigger_word": "zz"}]})


_entry_values = {
    "path": st.sampled_from(["a", "b", "c"]), "repeats": st.integers(-1, 5), "loss_weight": st.floats(-0.5, 3),
    "is_reg": st.booleans(), "mask_path": st.sampled_from(["m", "", None]), "alpha_mask": st.booleans(),
    "mask_min": st.floats(-0.2, 1.2), "mask_missing": st.sampled_from(["error", "full", "x"]),
    "caption_ext": st.sampled_from(["txt", ".caption", "", "a b"]), "caption_dropout": st.floats(-0.1, 1.1),
    "shuffle_tokens": st.booleans(), "keep_tokens": st.integers(-1, 3), "shuffle_variants": st.integers(0, 70),
    "trigger_word": st.sampled_from(["sks", "zz", None]), "name": st.sampled_from(["n1", "n2", None]),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({}, optional=_entry_values), min_size=1, max_size=3),
       st.fixed_dictionaries({}, optional={"trigger_word": st.sampled_from(["sks", None]), "repeats": st.integers(1, 3),
                                           "shuffle_tokens": st.booleans()}))
def test_random_datasets_load_and_round_trip_or_raise_one_line(entries, shared):
    try:
        cfg = load({"dataset": shared, "datasets": entries})
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert load(yaml.safe_load(cfg.dump_yaml())) == cfg
    assert all(d.repeats >= 1 and d.loss_weight > 0 and d.path for d in cfg.datasets)
    assert len({d.name for d in cfg.datasets}) == len(cfg.datasets)
