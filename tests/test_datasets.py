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

from mflux2.training.config import ConfigError, ConfigWarning
from mflux2.training.config_loading import config_from_dict

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


# ---------------------------------------------------------------------------------------------
# Scan: several datasets, regularisation, captions
# ---------------------------------------------------------------------------------------------

from PIL import Image  # noqa: E402

from mflux2.training import data as data_mod  # noqa: E402
from mflux2.training.data import DataError, DataWarning  # noqa: E402


def images(folder: Path, n: int, size=(64, 64), captions: list[str] | None = None, ext="txt", seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        if captions is not None:
            (folder / f"im{i}.{ext}").write_text(captions[i % len(captions)])
    return folder


def cfg_of(tmp_path, datasets, **sections):
    return load({"dataset": {"trigger_word": "sks"}, "datasets": datasets, "memory": {"bucketing": {"resolutions": [64]}},
                 "checkpoints": {"output": str(tmp_path / "out")}, **sections})


def test_scan_datasets_carries_each_datasets_settings(tmp_path):
    a = images(tmp_path / "a", 2, captions=["a red car"])
    r = images(tmp_path / "reg", 2, captions=["a photo of a dog"], ext="caption")
    cfg = cfg_of(tmp_path, [{"path": str(a), "repeats": 3, "loss_weight": 2.0},
                            {"path": str(r), "is_reg": True, "caption_ext": "caption", "caption_dropout": 0.5}],
                 loss={"diff_output_preservation": True, "diff_output_preservation_class": "car"})
    samples = data_mod.scan_datasets(cfg)
    assert [s.label for s in samples] == ["a/im0", "a/im1", "reg/im0", "reg/im1"]
    sa, sr = samples[0], samples[2]
    assert (sa.caption, sa.dop_caption, sa.repeats, sa.loss_weight, sa.is_reg) == ("sks, a red car", "car, a red car", 3, 2.0, False)
    # the reg set: its own caption (no trigger word), and DOP holds it to the base model as written
    assert (sr.caption, sr.dop_caption, sr.is_reg, sr.caption_dropout) == ("a photo of a dog", "a photo of a dog", True, 0.5)


def test_a_reg_set_whose_captions_name_the_trigger_warns(tmp_path):
    a = images(tmp_path / "a", 1, captions=["x"])
    r = images(tmp_path / "reg", 2, captions=["a photo of sks dog", "a dog"])
    cfg = cfg_of(tmp_path, [{"path": str(a)}, {"path": str(r), "is_reg": True}])
    with pytest.warns(DataWarning, match=r"datasets\[1\]\.path: 1 caption\(s\) of this regularisation set name the trigger word 'sks'.*im0"):
        data_mod.scan_datasets(cfg)


def test_shuffled_captions_keep_the_leading_tags_and_the_trigger_first(tmp_path):
    a = images(tmp_path / "a", 2, captions=["portrait, red hat, smiling, outdoors, blue sky"])
    cfg = cfg_of(tmp_path, [{"path": str(a), "shuffle_tokens": True, "keep_tokens": 1, "shuffle_variants": 5}],
                 loss={"diff_output_preservation": True, "diff_output_preservation_class": "man"})
    s0, s1 = data_mod.scan_datasets(cfg)
    assert s0.caption == "sks, portrait, red hat, smiling, outdoors, blue sky"  # as written: validation loss, fingerprint
    assert len(s0.variants) == 5 == len(set(s0.variants)) and s0.variants != s1.variants  # per file
    for v, d in zip(s0.variants, s0.dop_variants):
        tags = data_mod.split_tags(v)
        assert tags[:2] == ["sks", "portrait"] and sorted(tags[2:]) == ["blue sky", "outdoors", "red hat", "smiling"]
        assert d == "man, " + v[len("sks, "):]
    assert s0.with_variant(3).caption == s0.variants[3] and s0.with_variant(3).dop_caption == s0.dop_variants[3]
    again = data_mod.scan_datasets(cfg)[0]
    assert again.variants == s0.variants  # a function of the config: the text cache's entries are stable
    prompts = data_mod.prompts_to_embed(cfg, [s0, s1], [], [])
    assert set(s0.variants) | set(s0.dop_variants) | {s0.caption, s0.dop_caption} <= set(prompts)
    # two tags and keep 1: nothing to shuffle
    assert data_mod.shuffled_captions("a, b", 1, 4, 0) == ["a, b"]
    assert sorted(data_mod.shuffled_captions("a, b, c", 0, 64, 0)) == sorted(
        ", ".join(p) for p in __import__("itertools").permutations("abc"))


# ---------------------------------------------------------------------------------------------
# Repeats: the epoch
# ---------------------------------------------------------------------------------------------


def test_repeats_make_one_image_drawn_as_often_as_three_exactly(tmp_path):
    """Toy demonstration (issue 31 §8): dataset A (1 image, repeats 3) and B (3 images, repeats 1) are
    drawn equally often in every epoch, exactly."""
    a = images(tmp_path / "a", 1, captions=["a"])
    b = images(tmp_path / "b", 3, captions=["b"], seed=1)
    cfg = cfg_of(tmp_path, [{"path": str(a), "repeats": 3}, {"path": str(b)}])
    samples = data_mod.scan_datasets(cfg)
    sampler = data_mod.BatchSampler(samples, 1, seed=5)
    assert sampler.batches_per_epoch == 6
    orders = []
    for epoch in range(4):
        drawn = [samples[next(sampler)[0]].dataset for _ in range(6)]
        assert drawn.count("a") == drawn.count("b") == 3, drawn
        orders.append(drawn)
    assert len({tuple(o) for o in orders}) > 1  # shuffled per epoch
    # without repeats the fingerprint (the resume check) is what it always was
    plain = data_mod.BatchSampler([s.bucket for s in samples], 1, seed=5)
    assert plain.state_dict()["buckets"] != sampler.state_dict()["buckets"]
    assert data_mod.BatchSampler([dataclasses_replace(s, repeats=1) for s in samples], 1, 5).state_dict()["buckets"] == \
        plain.state_dict()["buckets"]


def dataclasses_replace(s, **kw):
    import dataclasses

    return dataclasses.replace(s, **kw)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def coordinate_image(w, h):
    """R codes x, G codes y (a steep ramp: a one-pixel shift changes values by ~4)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // (w - 1)), (y * 255 // (h - 1)), np.full_like(x, 128)], -1).astype(np.uint8)


def test_a_reg_set_is_drawn_beside_every_subject_batch_in_its_bucket_and_resumes(tmp_path):
    """data.PairedSampler: the subject's epochs are those of a BatchSampler over the subject alone (the reg
    set takes none of its steps), each batch comes with a reg batch of its bucket, the reg set cycles
    on its own, and the state round-trips (a resumed sampler draws what an uninterrupted one does)."""
    def sample(i, bucket, reg):
        return data_mod.Sample(path=tmp_path / f"{'r' if reg else 's'}{i}.png", content_hash=str(i), caption="c", dop_caption="c",
                               size=bucket, bucket=bucket, dataset="reg" if reg else "subj", is_reg=reg)

    samples = [sample(i, (64, 64), False) for i in range(3)] + [sample(i, (64, 64), True) for i in range(3, 8)] \
        + [sample(8, (96, 64), False), sample(9, (96, 64), True)]
    paired = data_mod.PairedSampler(samples, 2, seed=5)
    alone = data_mod.BatchSampler([s for s in samples if not s.is_reg], 2, seed=5)
    subj_idx = [i for i, s in enumerate(samples) if not s.is_reg]
    drawn = [next(paired) for _ in range(12)]
    assert [subj for subj, _ in drawn] == [[subj_idx[j] for j in next(alone)] for _ in range(12)]
    for subj, reg in drawn:
        assert len(reg) == 2 and all(samples[i].is_reg and samples[i].bucket == samples[subj[0]].bucket for i in reg)
    square = [i for _, reg in drawn if samples[reg[0]].bucket == (64, 64) for i in reg]
    assert set(square) == {3, 4, 5, 6, 7}
    state = json.loads(json.dumps(paired.state_dict()))
    again = data_mod.PairedSampler(samples, 2, seed=5)
    again.load_state_dict(state)
    assert [next(again) for _ in range(9)] == [next(paired) for _ in range(9)]
    with pytest.raises(data_mod.DataError, match="no regularisation-set state"):
        again.load_state_dict(data_mod.BatchSampler(samples, 2, seed=5).state_dict())
    with pytest.raises(data_mod.DataError, match=r"no image in bucket\(s\) 96x64 that the subject trains at"):
        data_mod.PairedSampler(samples[:-1], 2, seed=5)


@pytest.mark.parametrize("mask_scale", [1, 2])
def test_masks_are_cropped_and_resized_exactly_like_their_image(tmp_path, mask_scale):
    """Coordinate-coded: the mask is the image's own R channel (x coordinate); after the bucket's resize
    and crop each mask pixel still holds its image pixel's x code — at the image's size exactly, from a
    mask at twice the size within LANCZOS' rounding."""
    w, h = 70, 100  # a portrait image, cropped and resized into a 64-px bucket
    img = coordinate_image(w, h)
    folder, masks = tmp_path / "a", tmp_path / "m"
    folder.mkdir(), masks.mkdir()
    Image.fromarray(img).save(folder / "im0.png")
    big = Image.fromarray(img[..., 0]).resize((w * mask_scale, h * mask_scale), Image.Resampling.BICUBIC) if mask_scale > 1 \
        else Image.fromarray(img[..., 0])
    big.save(masks / "im0.png")
    cfg = cfg_of(tmp_path, [{"path": str(folder), "mask_path": str(masks)}])
    (s,) = data_mod.scan_datasets(cfg)
    assert s.mask is not None and s.bucket != (w, h)
    image = data_mod.load_image_for_bucket(s.path, s.bucket)  # [-1, 1]
    grey = data_mod.load_mask_for_bucket(s.mask, s.size, s.bucket)
    assert grey.shape == image.shape[:2]
    err = np.abs(grey * 255 - (image[..., 0] + 1) * 127.5)
    assert err.max() <= (0.51 if mask_scale == 1 else 3.0), err.max()
    # and a crop shifted by one pixel is caught: the x code changes by ~3.7 per pixel
    assert np.abs(grey[:, 1:] * 255 - (image[:, :-1, 0] + 1) * 127.5).mean() > 3.0


def test_mask_weights_are_the_area_mean_per_token_normalised_to_mean_one():
    g = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    w = data_mod.mask_weights(g, 0.25)
    expect = 0.25 + 0.75 * g.reshape(2, 16, 3, 16).mean(axis=(1, 3)).reshape(-1)
    np.testing.assert_allclose(w, expect / expect.mean(), rtol=1e-6)
    assert w.shape == (6,) and w.mean() == pytest.approx(1.0)
    half = np.zeros((32, 32), np.float32)
    half[:, :16] = 1
    np.testing.assert_allclose(data_mod.mask_weights(half, 0.0), [2, 0, 2, 0])  # half masked: the rest counts double
    with pytest.raises(DataError, match="black over the whole crop"):
        data_mod.mask_weights(np.zeros((16, 16)), 0.0, "m.png")


def test_alpha_masks_and_missing_masks(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "im0.png")
    Image.fromarray(rgba[..., :3]).save(folder / "im1.png")  # no alpha
    cfg = cfg_of(tmp_path, [{"path": str(folder), "alpha_mask": True}])
    with pytest.raises(DataError, match=r"im1\.png: no alpha channel \(datasets\[0\]\.alpha_mask\).*mask_missing: full"):
        data_mod.scan_datasets(cfg)
    cfg = cfg_of(tmp_path, [{"path": str(folder), "alpha_mask": True, "mask_missing": "full"}])
    with pytest.warns(DataWarning, match=r"1 of 2 image\(s\) have no mask and train unmasked.*im1\.png"):
        s0, s1 = data_mod.scan_datasets(cfg)
    assert s0.mask.alpha and s1.mask is None
    grey = data_mod.load_mask_for_bucket(s0.mask, s0.size, s0.bucket)
    np.testing.assert_allclose(data_mod.mask_weights(grey, 0.0), np.tile([0, 0, 2, 2], 4), atol=1e-6)  # right half opaque


@pytest.mark.parametrize("what, make, match", [
    ("missing", lambda m: None, r"im0\.png: no mask of its file stem in .*mask_missing: full"),
    ("black", lambda m: Image.new("L", (64, 64), 0).save(m / "im0.png"), r"m/im0\.png: the mask is all black"),
    ("aspect", lambda m: Image.new("L", (64, 32), 255).save(m / "im0.png"),
     r"m/im0\.png: the mask is 64x32 but its image is 64x64: another aspect ratio"),
])
def test_bad_masks_are_one_line_errors_naming_the_file(tmp_path, what, make, match):
    folder = images(tmp_path / "a", 1, captions=["x"])
    m = tmp_path / "m"
    m.mkdir()
    make(m)
    cfg = cfg_of(tmp_path, [{"path": str(folder), "mask_path": str(m)}])
    with pytest.raises(DataError, match=match) as e:
        data_mod.scan_datasets(cfg)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The masked, weighted step: parity with a hand-written reference
# ---------------------------------------------------------------------------------------------

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

import mflux2.training.step as S  # noqa: E402
from mflux2.training.step import TrainStep  # noqa: E402
from mflux2.lora import lora_disabled  # noqa: E402
from mflux2.training.timesteps import loss_weight  # noqa: E402
from tests.test_step import flat, tiny_batch, tiny_model  # noqa: E402


def weighted_batch(edit: bool, seed=3):
    batch = tiny_batch(b=2, n=16)
    g = np.random.default_rng(seed)
    raw = g.random((2, 16)).astype(np.float32) * (g.random((2, 16)) > 0.3)  # random masks with black tokens
    batch.token_weights = mx.array(raw / raw.mean(axis=1, keepdims=True))
    batch.sample_weights = mx.array([0.5, 2.0], mx.float32)
    if edit:
        batch.refs = mx.random.normal((2, 8, 16), key=mx.random.key(seed))
        batch.ref_ids = mx.concatenate([mx.zeros((8, 1)) + 10, mx.random.randint(0, 4, (8, 3), key=mx.random.key(1)).astype(mx.float32)], axis=1)
    return batch, mx.array(raw)


def reference_loss(model, batch, raw, key, dop, weighting="bell_shaped"):
    """The loss written out: per sample Σ_n raw_n·mean_c (v̂ - v)² / Σ_n raw_n, × w(t) × the sample's
    weight, averaged; with DOP plus the unmasked, unweighted preservation term on the class prompt."""
    xt, target, t = S.noisy_inputs(batch.latents, key, S.StepConfig(weighting=weighting))
    n = xt.shape[1]

    def forward(prompts):
        x, ids = xt, batch.img_ids
        if batch.refs is not None:
            x, ids = mx.concatenate([xt, batch.refs], axis=1), mx.concatenate([batch.img_ids, batch.ref_ids])
        return model(x, prompts, t, ids, batch.txt_ids, None)[:, :n]

    err = mx.mean(mx.square(forward(batch.prompt_embeds) - target), axis=2)
    per = mx.sum(err * raw, axis=1) / mx.sum(raw, axis=1)
    main = mx.mean(per * loss_weight(weighting, t) * batch.sample_weights)
    if not dop:
        return main
    with lora_disabled(model):
        prior = mx.stop_gradient(forward(batch.dop_embeds))
    return main + mx.mean(mx.square(forward(batch.dop_embeds) - prior))


def assert_close(a, b, rtol=1e-4):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys() and fa
    for k in fa:
        scale = np.abs(fa[k]).max()
        assert scale > 0, k
        assert np.abs(fb[k] - fa[k]).max() <= rtol * scale, (k, np.abs(fb[k] - fa[k]).max() / scale)


@pytest.mark.parametrize("dop,edit", [(False, False), (True, False), (False, True), (True, True)])
def test_masked_weighted_loss_and_gradients_equal_the_reference(dop, edit):
    model = tiny_model()
    batch, raw = weighted_batch(edit)
    key = mx.random.key(11)
    step = TrainStep(model, optim.AdamW(1e-4), S.StepConfig(weighting="bell_shaped", memory_limit=None))
    l_ref, g_ref = nn.value_and_grad(model, lambda m: reference_loss(m, batch, raw, key, dop))(model)
    (l0, _), g0 = step._grad_fn(dop)(model, batch, key)  # one graph
    assert float(l0) == pytest.approx(float(l_ref), rel=1e-5)
    assert_close(g_ref, g0)
    # compiled, as the trainer runs it (flat gradients)
    (l1, *_), gflat, _ = step._fn("grad", dop)(vars(batch), key)
    assert float(l1) == pytest.approx(float(l_ref), rel=1e-5)
    ref_flat = step.params.flatten(g_ref)
    for name in ref_flat:
        d = np.abs(np.array(gflat[name]) - np.array(ref_flat[name])).max()
        assert d <= 1e-4 * np.abs(np.array(ref_flat[name])).max(), name
    # gradient checkpointing (the block-by-block backward)
    model.set_gradient_checkpointing(2)
    (l2, *_), g2 = step._blockwise_grads(step._blockwise(), batch, key, dop)
    assert float(l2) == pytest.approx(float(l_ref), rel=1e-5)
    assert_close(g_ref, g2)
    # the weights matter: without them the gradients differ
    plain = S.Batch(**{**vars(batch), "token_weights": None, "sample_weights": None})
    (_, _), g3 = step._grad_fn(dop)(model, plain, key)
    f0, f3 = flat(g0), flat(g3)
    assert all(not np.allclose(f3[k], f0[k], rtol=1e-3) for k in f0)


def test_weighted_accumulation_updates_like_the_mean_of_the_micro_batches():
    key1, key2 = mx.random.key(1), mx.random.key(2)
    b1, raw1 = weighted_batch(False, seed=3)
    b2, raw2 = weighted_batch(False, seed=4)
    model = tiny_model()
    ref = lambda m: (reference_loss(m, b1, raw1, key1, False, "uniform") + reference_loss(m, b2, raw2, key2, False, "uniform")) / 2  # noqa: E731
    _, g_ref = nn.value_and_grad(model, ref)(model)
    step = TrainStep(model, optim.SGD(1e4), S.StepConfig(memory_limit=None, max_grad_norm=None), grad_accumulation=2)
    before = flat(model.trainable_parameters())
    step(b1, key1)
    out = step(b2, key2)
    mx.eval(out["loss"], step.state_arrays())
    assert out["applied"]
    after = flat(model.trainable_parameters())
    for k, g in flat(g_ref).items():
        np.testing.assert_allclose((before[k] - after[k]) / 1e4, g, rtol=1e-4, atol=1e-4 * np.abs(g).max())


def test_an_all_ones_mask_and_unit_weights_are_the_unmasked_step():
    model = tiny_model()
    batch = tiny_batch()
    key = mx.random.key(2)
    step = TrainStep(model, optim.AdamW(1e-4), S.StepConfig(memory_limit=None))
    (l0, _), g0 = step._grad_fn(True)(model, batch, key)
    ones = S.Batch(**{**vars(batch), "token_weights": mx.ones((2, 16)), "sample_weights": mx.ones((2,))})
    (l1, _), g1 = step._grad_fn(True)(model, ones, key)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    assert_close(g0, g1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The trainer: two datasets, a reg set, masks, weights and shuffled captions (tiny model)
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402

from mflux2.training.config_loading import load_config  # noqa: E402
from mflux2.training.trainer import Trainer  # noqa: E402
from tests.test_trainer import tiny  # noqa: E402,F401  (fixture)


def datasets_config(tmp_path: Path, tiny, out="out", **sections) -> Path:
    model, _ = tiny
    root = tmp_path / "data"
    if not root.exists():
        a = images(root / "subject", 2, captions=["a red hat, smiling, outdoors, blue sky"])
        m = root / "masks"
        m.mkdir()
        for i in range(2):
            g = np.zeros((64, 64), np.uint8)
            g[8:40, 16 + 8 * i : 48] = 255
            Image.fromarray(g).save(m / f"im{i}.png")
        images(root / "reg", 2, captions=["a photo of a thing"], seed=3)
    cfg = {
        "model": {"path": str(model), "quantization": "bf16", "transformer_quantization": "bf16"},
        "lora": {"rank": 4, "target_layers": "attention"},
        "dataset": {"trigger_word": "sks"},
        "datasets": [{"path": str(root / "subject"), "repeats": 2, "loss_weight": 2.0, "mask_path": str(root / "masks"),
                      "shuffle_tokens": True, "shuffle_variants": 3},
                     {"path": str(root / "reg"), "is_reg": True}],
        "training": {"max_steps": 6, "learning_rate": 1e-3, "log_every_n_steps": 1, "seed": 7},
        "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "thing",
                 "diff_output_preservation_every_n_steps": 2},
        "memory": {"bucketing": {"resolutions": [64]}},
        "checkpoints": {"output": str(tmp_path / out), "save_every": 3},
        "validation": {"prompts": []},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def drawn_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "samples" in r]


def test_a_run_with_datasets_masks_weights_and_shuffled_captions(tiny, tmp_path):
    t = Trainer(load_config(datasets_config(tmp_path, tiny)), log=lambda *a: None)
    t.run()
    out = tmp_path / "out"
    rows = drawn_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    labels = [label for r in rows for label in r["samples"]]
    assert set(labels) == {"subject/im0", "subject/im1", "reg/im0", "reg/im1"}
    # every step: one subject sample (the epoch: 2 images × 2 repeats), then one of the reg set beside it
    assert [r["samples"][0].split("/")[0] for r in rows] == ["subject"] * 6
    assert [r["samples"][1].split("/")[0] for r in rows] == ["reg"] * 6 and all(len(r["samples"]) == 2 for r in rows)
    assert labels.count("reg/im0") == labels.count("reg/im1") == 3  # the reg set cycles on its own
    assert t.paired
    assert t.has_masks and t.has_loss_weights
    # the text cache holds the variants (the text encoder ran once per distinct prompt)
    s0 = next(s for s in t.samples if s.variants)
    assert all(t.txt_cache.get(t.txt_cache.key(v)) is not None for v in (*s0.variants, *s0.dop_variants))
    report = (out / "report.html").read_text()
    assert "dataset subject" in report and "6 samples drawn, mean loss" in report and "dataset reg" in report


def test_each_step_weighs_its_own_samples_tokens_by_their_cached_masks_and_zero_weight_drops_a_token(tiny, tmp_path):
    """The trainer's batches, as a run draws them: each sample's token weights are its own mask read like
    its image and pooled as docs/training.md says (mean 1, area per 16x16 token), its latents those of its
    image, a reg sample unmasked; the loss's gradient on a token of weight 0 is exactly 0 (its target
    cannot reach the LoRA), and on the others it is not. Sample weights: 2 x loss_weight (subject +
    loss_weight x reg, diffusers' prior_loss_weight)."""
    t = Trainer(load_config(datasets_config(tmp_path, tiny, training={"max_steps": 4})), log=lambda *a: None)
    seen = []
    draw = t._draw

    def recording(step, when):
        batch, is_dop, drawn = draw(step, when)
        seen.append((batch, drawn))
        return batch, is_dop, drawn

    t._draw = recording
    t.run()
    by_label = {s.label: s for s in t.samples}
    zero_tokens = 0
    for batch, drawn in seen:
        for j, label in enumerate(drawn):
            s = by_label[label]
            np.testing.assert_array_equal(np.array(batch.latents[j]), np.array(t._latents(s)))
            w = np.array(batch.token_weights[j])
            if s.is_reg:
                assert (w == 1).all() and float(batch.sample_weights[j]) == 2.0
                continue
            grey = data_mod.load_mask_for_bucket(s.mask, s.size, s.bucket)
            np.testing.assert_allclose(w, data_mod.mask_weights(grey, s.mask.minimum), rtol=1e-6)
            cover = grey.reshape(4, 16, 4, 16).mean(axis=(1, 3)).reshape(-1)
            np.testing.assert_allclose(w, cover / cover.mean(), rtol=1e-5)  # area per token, mean 1
            assert float(batch.sample_weights[j]) == 4.0
        pred = mx.random.normal(batch.latents.shape, key=mx.random.key(0))
        t_ = mx.full((batch.latents.shape[0],), 0.5)
        g = np.array(mx.grad(lambda p: S.main_loss(p, batch.latents, t_, "uniform", batch.token_weights, batch.sample_weights))(pred))
        zero = np.array(batch.token_weights) == 0
        assert (g[zero] == 0).all() and (np.abs(g[~zero]).sum(axis=-1) > 0).all()
        zero_tokens += int(zero.sum())
    assert len(seen) == 4 and zero_tokens > 0


# ---------------------------------------------------------------------------------------------
# The dry run
# ---------------------------------------------------------------------------------------------


def test_the_dry_run_lists_each_dataset_and_warns_about_an_imbalance(tiny, tmp_path, capsys):
    from mflux2.training.cli import main

    path = datasets_config(tmp_path, tiny)
    data = yaml.safe_load(path.read_text())
    data["datasets"][0]["repeats"] = 20
    path.write_text(yaml.safe_dump(data))
    main([str(path), "--dry-run"])
    out = capsys.readouterr().out
    # the reg set is not in the epoch: it is drawn beside every step's subject samples
    assert "datasets (an epoch = 40 samples; each step pairs its subject samples with as many regularisation samples):" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("subject:"))
    assert "2 image(s) × repeats 20 = 40 (100% of an epoch)" in line and "loss weight 2" in line
    assert "captions 2/2 (.txt)" in line and "masks 2 found, 0 missing" in line and "variants of 2 captions" in line
    reg = next(l for l in out.splitlines() if l.strip().startswith("reg:"))
    assert "2 image(s) beside the subject: 1 with every step's 1 subject sample(s), all of them every 2 steps" in reg
    assert "regularisation set" in reg and "prior_loss_weight" in reg
    assert "warning:" not in out.split("datasets (")[1].split("\n==")[0]  # one subject dataset: no imbalance
    data["datasets"][1]["is_reg"] = False  # a second subject dataset: 40 of 42 samples per epoch are the first's
    path.write_text(yaml.safe_dump(data))
    main([str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert "datasets (an epoch = 42 samples):" in out and "2 image(s) × repeats 20 = 40 (95% of an epoch)" in out
    assert "warning: subject is 95% of every epoch" in out
    # a reg set with no image in the subject's bucket (at 128 px: the subject 128x128, the wide reg images
    # 192x80): the run could not pair them, the dry run stops on it
    data["datasets"][1].update(is_reg=True, path=str(images(tmp_path / "wide_reg", 2, size=(128, 64), captions=["a thing"])))
    data["memory"]["bucketing"]["resolutions"] = [128]
    path.write_text(yaml.safe_dump(data))
    assert main([str(path), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "error: the regularisation set has no image in bucket(s) 128x128 that the subject trains at (it has 192x80)" in out
    # a missing mask: the dry run names the file, as the run would stop on it
    (tmp_path / "data" / "masks" / "im1.png").unlink()
    assert main([str(path), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "error: " in out and "im1.png: no mask of its file stem" in out



# ---------------------------------------------------------------------------------------------
# A regularisation set from the base model
# ---------------------------------------------------------------------------------------------


def test_regset_writes_class_images_with_captions_from_the_generation_path(tiny, tmp_path):
    from mflux2.pipeline import Flux2Pipeline
    from mflux2.training.regset import main as regset_main

    model, _ = tiny
    out = tmp_path / "reg"
    assert regset_main(["--model", str(model), "--prompt", "a photo of a thing", "--prompt", "a thing, outdoors",
                        "--count", "2", "--size", "64", "--steps", "2", "--seed", "5", "--output", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["a_photo_of_a_thing_0005.png", "a_photo_of_a_thing_0006.png", "a_thing_outdoors_0005.png",
                    "a_thing_outdoors_0006.png"]
    assert (out / "a_thing_outdoors_0006.txt").read_text().strip() == "a thing, outdoors"
    pipe = Flux2Pipeline.from_pretrained(str(model), low_memory=False)
    again = np.asarray(pipe.generate("a thing, outdoors", 64, 64, num_inference_steps=2, seed=6, progress=False)[0])
    assert np.array_equal(np.asarray(Image.open(out / "a_thing_outdoors_0006.png").convert("RGB")), again)
    # the folder trains as a regularisation set: its captions as written
    cfg = cfg_of(tmp_path, [{"path": str(images(tmp_path / "subj", 1, captions=["x"]))}, {"path": str(out), "is_reg": True}])
    reg = [s for s in data_mod.scan_datasets(cfg) if s.is_reg]
    assert sorted(s.caption for s in reg) == ["a photo of a thing"] * 2 + ["a thing, outdoors"] * 2
