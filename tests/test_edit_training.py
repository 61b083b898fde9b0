"""Edit (image-to-image) LoRA training: the control images' config keys, pairing and geometry, the
step with reference tokens (parity with diffusers' img2img training step + PEFT), control dropout,
caches and resume on a tiny model (CPU). Semantics: docs/training.md, "Edit LoRAs (image-to-image)"."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from PIL import Image

from mflux2.models.vae import image_ids
from mflux2.training import data as data_mod
from mflux2.training.config import ConfigError, ConfigWarning
from mflux2.training.config_loading import config_from_dict, load_config
from mflux2.training.data import BatchSampler, DataError, DataWarning, scan_dataset
from mflux2.training.step import Batch, StepConfig, TrainStep
from mflux2.training.trainer import Trainer
from tests.test_step import assert_same_grads, tiny_batch, tiny_model
from tests.tiny_flux2 import build_tiny_klein, make_images

ROOT = Path(__file__).resolve().parents[1]


def cfg_of(tmp_path, **dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return config_from_dict({"dataset": {"path": str(tmp_path / "t"), **dataset},
                                 "memory": {"bucketing": {"enabled": False}}, "model": {"name": "klein-4b"}},
                                source=str(tmp_path / "cfg.yaml"))


def save(path: Path, size=(32, 32), seed=0, text: str | None = "a caption"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    if text is not None and path.parent.name == "t":
        path.with_suffix(".txt").write_text(text)
    return path


def scan(cfg):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        samples = scan_dataset(cfg)
    return samples, [str(w.message) for w in rec if issubclass(w.category, DataWarning)]


# ---------------------------------------------------------------------------------------------
# Config


def test_control_keys_are_honoured_and_labelled(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("dataset: {path: d, control_path: ctrl, control_dropout: 0.25}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # no "accepted but ignored" any more
        cfg = load_config(path)
    assert cfg.dataset.control_path == ["ctrl"] and cfg.dataset.control_dropout == 0.25 and cfg.dataset.edit
    labels = cfg.provenance_labels()
    assert labels["dataset.control_path"] == labels["dataset.control_dropout"] == "from file"
    plain = config_from_dict({"dataset": {"path": "d"}})
    assert plain.dataset.control_path is None and not plain.dataset.edit and plain.dataset.control_dropout == 0.0
    assert plain.provenance_labels()["dataset.control_path"] == "Swift default"  # absent: text-to-image, as Swift
    many = config_from_dict({"model": {"name": "dev"}, "dataset": {"path": "d", "control_path": ["a", "b", "c", "d", "e", "f"]}})
    assert many.dataset.control_path == ["a", "b", "c", "d", "e", "f"]  # dev takes 6 references


@pytest.mark.parametrize("dataset, message", [
    ({"control_path": ["a", "b", "c", "d", "e"]}, "dataset.control_path: 5 folders, but klein-base-4b takes at most 4"),
    ({"control_path": []}, "dataset.control_path: must not be empty"),
    ({"control_path": ["a", "a"]}, "dataset.control_path: 'a' is given twice"),
    ({"control_path": "a", "control_dropout": 1.5}, "dataset.control_dropout: must be <= 1"),
    ({"validation_control_path": "v", "validation_path": "w"}, "dataset.validation_control_path: is set but dataset.control_path is not"),
    ({"control_path": "a", "validation_control_path": "v"}, "dataset.validation_control_path: is set but dataset.validation_path is not"),
])
def test_bad_control_keys_are_one_line_errors(tmp_path, dataset, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"path": "d", **dataset}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


def test_control_dropout_without_controls_warns(tmp_path):
    with pytest.warns(ConfigWarning, match="dataset.control_dropout: 0.5 has no effect without dataset.control_path"):
        config_from_dict({"dataset": {"path": "d", "control_dropout": 0.5}})


# ---------------------------------------------------------------------------------------------
# Pairing


def test_pairing_by_stem_and_the_warnings_that_count(tmp_path):
    for i in range(4):
        save(tmp_path / "t" / f"img{i}.png", seed=i)
    save(tmp_path / "c" / "img0.jpg", seed=10)  # another extension pairs too
    save(tmp_path / "c" / "img1.png", seed=11)
    save(tmp_path / "c" / "stray.png", seed=12)  # no target
    save(tmp_path / "c" / ".hidden.png", seed=13)
    samples, warns = scan(cfg_of(tmp_path, control_path=str(tmp_path / "c")))
    got = {s.path.name: [c.path.name for c in s.controls] for s in samples}
    assert got == {"img0.png": ["img0.jpg"], "img1.png": ["img1.png"], "img2.png": [], "img3.png": []}
    assert samples[0].controls[0].content_hash != samples[1].controls[0].content_hash
    assert samples[0].group == (512, 512, 1) and samples[2].group == (512, 512, 0)
    (without,) = [w for w in warns if "no control image" in w]
    assert "2 of 4 image(s)" in without and "img2.png, img3.png" in without and "text-to-image" in without
    (orphan,) = [w for w in warns if "match no image" in w]
    assert orphan.startswith("dataset.control_path: 1 control image(s)") and "stray.png" in orphan and ".hidden" not in orphan


def test_several_control_folders_give_references_in_folder_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: from the working directory, as dataset.path
    for i in range(2):
        save(tmp_path / "t" / f"x{i}.png", seed=i)
        save(tmp_path / "c1" / f"x{i}.png", seed=10 + i)
    save(tmp_path / "c2" / "x1.png", seed=20)
    cfg = cfg_of(tmp_path, control_path=["c1", "c2"])
    cfg.dataset.path = "t"
    samples, warns = scan(cfg)
    assert [[c.path.parent.name for c in s.controls] for s in samples] == [["c1"], ["c1", "c2"]]
    assert any("1 image(s) have a control in only some of the 2 folders" in w and "x0.png" in w for w in warns)


@pytest.mark.parametrize("case", ["missing folder", "two controls one stem", "unreadable", "no pairs", "file"])
def test_bad_controls_are_one_line_errors_naming_the_file(tmp_path, case):
    save(tmp_path / "t" / "a.png")
    save(tmp_path / "t" / "b.png", seed=1)
    c = tmp_path / "c"
    c.mkdir()
    if case == "two controls one stem":
        save(c / "a.png"), save(c / "a.webp")
        want = [f"{c / 'a.webp'}: a second control image for the stem 'a'", str(c / "a.png")]
    elif case == "unreadable":
        save(c / "a.png")
        (c / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        want = [f"{c / 'b.png'}: cannot decode image"]
    elif case == "no pairs":
        save(c / "z.png")
        want = ["dataset.control_path: none of the 2 image(s)", "has a control image of the same file stem"]
    elif case == "file":
        c.rmdir()
        c.write_text("x")
        want = [f"dataset.control_path: {c} is a file"]
    else:
        c.rmdir()
        want = [f"dataset.control_path: no such folder: {c}"]
    with pytest.raises(DataError) as e:
        scan_dataset(cfg_of(tmp_path, control_path=str(c)))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in want), msg


def test_unreadable_control_is_skipped_with_its_target_when_asked(tmp_path):
    save(tmp_path / "t" / "a.png"), save(tmp_path / "t" / "b.png", seed=1)
    save(tmp_path / "c" / "a.png")
    (tmp_path / "c" / "b.png").write_bytes(b"")
    samples, warns = scan(cfg_of(tmp_path, control_path=str(tmp_path / "c"), skip_bad_images=True))
    assert [s.path.name for s in samples] == ["a.png"]
    assert any("skipped 1 unreadable" in w and "b.png (its control:" in w for w in warns)


# ---------------------------------------------------------------------------------------------
# Geometry: the control is cropped exactly like its target


def coordinate_image(w: int, h: int) -> Image.Image:
    """R = x, G = y (as fractions of the size), B = a checker: every pixel says where it is."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x + 0.5) / w * 255, (y + 0.5) / h * 255, ((x // 8 + y // 8) % 2) * 255], -1)
    return Image.fromarray(a.round().astype(np.uint8))


def test_control_crop_coincides_with_the_target_crop(tmp_path):
    target = tmp_path / "target.png"
    coordinate_image(160, 96).save(target)  # wider than its bucket: the crop drops columns
    bucket = data_mod.choose_bucket(160, 96, [64], bucketing=False)
    assert bucket == (64, 64)
    t = data_mod.load_image_for_bucket(target, bucket)
    same = tmp_path / "same.png"
    coordinate_image(160, 96).save(same)
    np.testing.assert_array_equal(data_mod.load_control_for_bucket(same, (160, 96), bucket), t)
    # a control at another size of the same aspect... and of another aspect (stretched to the target's first)
    for size in [(80, 48), (120, 120)]:
        ctrl = tmp_path / f"c{size[0]}.png"
        coordinate_image(*size).save(ctrl)
        c = data_mod.load_control_for_bucket(ctrl, (160, 96), bucket)
        assert c.shape == t.shape == (64, 64, 3)
        # where each pixel comes from (R = x, G = y) agrees to within a pixel of the target's grid
        assert np.abs(c[..., :2] - t[..., :2]).max() < 2 * 2 / 64, size
        # the Swift trainer's stretch to the bucket would be off by the cropped margins
        stretched = np.asarray(Image.open(ctrl).resize(bucket, Image.Resampling.LANCZOS), np.float32) / 127.5 - 1
        assert np.abs(stretched[..., 0] - t[..., 0]).max() > 0.3


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_share_bucket_and_reference_count():
    groups = [(64, 64, 1)] * 5 + [(64, 64, 0)] * 3 + [(64, 48, 1)] * 2
    s = BatchSampler(groups, batch_size=2, seed=0)
    for _ in range(30):
        assert len({groups[i] for i in next(s)}) == 1
    # text-to-image data keeps the sampler fingerprint and order of before (older checkpoints resume)
    plain = [(64, 64)] * 4 + [(64, 48)] * 2
    a, b = BatchSampler(plain, 2, 3), BatchSampler([(*g, 0) for g in plain], 2, 3)
    assert a.state_dict() == b.state_dict() and [next(a) for _ in range(9)] == [next(b) for _ in range(9)]


# ---------------------------------------------------------------------------------------------
# The step: references in, their predictions out


def edit_batch(b=2, seed=1):
    """A 4x4-token target with two references on grids of their own (4x2 at t=10, 2x3 at t=20)."""
    batch = tiny_batch(b=b, n=16, seed=seed)
    batch.img_ids = image_ids(64, 64)
    batch.refs = mx.random.normal((b, 8 + 6, 16), key=mx.random.key(seed + 100))
    batch.ref_ids = mx.concatenate([image_ids(64, 32, t=10), image_ids(32, 48, t=20)])
    return batch


@pytest.mark.parametrize("dop", [False, True])
def test_checkpointed_step_with_references_equals_the_plain_one(dop):
    """The block-by-block backward (gradient checkpointing) on the longer sequence: the same loss and
    gradients; and the references change both (they are read, never trained on)."""
    model, batch, key = tiny_model(), edit_batch(), mx.random.key(3)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None))
    (l0, aux0), g0 = step._grad_fn(dop)(model, batch, key)
    t2i = Batch(**{**vars(batch), "refs": None, "ref_ids": None})
    (l_t2i, _), _ = step._grad_fn(dop)(model, t2i, key)
    assert abs(float(l0) - float(l_t2i)) > 1e-5 * abs(float(l_t2i))  # float32 noise: ~1e-7
    model.set_gradient_checkpointing(2)
    (l1, *aux1), g1 = step._blockwise_grads(step._blockwise(), batch, key, dop)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    assert np.allclose([float(a) for a in aux0], [float(a) for a in aux1], rtol=1e-6)
    assert_same_grads(g0, g1, rtol=1e-5)


def test_dop_passes_share_the_references():
    """Prior (LoRA off), main and preservation all see x_t with the same references: the DOP loss is
    the one written out from three forwards on [x_t ; refs]."""
    from mflux2.lora import lora_disabled
    from mflux2.training.step import noisy_inputs

    model, batch, key = tiny_model(), edit_batch(), mx.random.key(5)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None, compile=False))
    total, (main, pres, _) = step.dop_loss(model, batch, key)
    xt, target, t = noisy_inputs(batch.latents, key, step.cfg)
    x = mx.concatenate([xt, batch.refs], axis=1)
    ids = mx.concatenate([batch.img_ids, batch.ref_ids])
    f = lambda e: model(x, e, t, ids, batch.txt_ids)[:, :16]  # noqa: E731
    with lora_disabled(model):
        prior = f(batch.dop_embeds)
    want_main = mx.mean(mx.square(f(batch.prompt_embeds) - target))
    want_pres = mx.mean(mx.square(f(batch.dop_embeds) - prior))
    assert float(main) == pytest.approx(float(want_main), rel=1e-5)
    assert float(pres) == pytest.approx(float(want_pres), rel=1e-5) and float(pres) > 0


def test_compiled_steps_switch_between_reference_and_text_to_image_batches():
    """Control dropout alternates [x_t ; refs] and x_t micro-batches: the compiled step (one graph,
    and checkpointed) gives the uncompiled step's updates for both shapes."""
    batches = [edit_batch(), Batch(**{**vars(edit_batch()), "refs": None, "ref_ids": None})]
    results = {}
    for compiled in (True, False):
        for every in (0, 2):
            model = tiny_model()
            model.set_gradient_checkpointing(every)
            step = TrainStep(model, optim.AdamW(1e-3), StepConfig(memory_limit=None, compile=compiled))
            losses = []
            for i in range(4):
                out = step(batches[i % 2], mx.random.key(i), dop=i == 2)
                mx.eval(out["loss"], step.state_arrays())
                losses.append(out["loss"].item())
            results[compiled, every] = losses, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    ref_losses, ref_params = results[False, 0]
    for key, (losses, params) in results.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(key))
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=f"{key} {k}")


# ---------------------------------------------------------------------------------------------
# Parity: diffusers' img2img training step with a PEFT LoRA


# PEFT module (diffusers names) -> mflux2's LoRA layer, one to one (fused q/k/v would not be)
PEFT_TO_MFLUX2 = {
    r"transformer_blocks.{i}.attn.to_out.0": "double_blocks.{i}.img_attn.proj",
    r"transformer_blocks.{i}.attn.to_add_out": "double_blocks.{i}.txt_attn.proj",
    r"transformer_blocks.{i}.ff.linear_in": "double_blocks.{i}.img_mlp.0",
    r"transformer_blocks.{i}.ff.linear_out": "double_blocks.{i}.img_mlp.2",
    r"transformer_blocks.{i}.ff_context.linear_in": "double_blocks.{i}.txt_mlp.0",
    r"transformer_blocks.{i}.ff_context.linear_out": "double_blocks.{i}.txt_mlp.2",
    r"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj": "single_blocks.{i}.linear1",
    r"single_transformer_blocks.{i}.attn.to_out": "single_blocks.{i}.linear2",
}


def test_edit_step_loss_and_lora_gradients_match_diffusers_img2img_training(tmp_path):
    """One I2I step, float32: x0 (3x5 tokens), two references (4x2 at t=10, 2x3 at t=20), the same
    noise and t. diffusers' train_dreambooth_lora_flux2_klein_img2img.py: x_t = (1-t)·x0 + t·ε,
    transformer([x_t ; c], ids [ids_x ; ids_c]), prediction[:, :N], mean((pred - (ε - x0))²); its LoRA
    is PEFT's. mflux2: TrainStep.plain_loss on a Batch with refs, the same LoRA loaded trainable."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mflux2.lora import load_lora
    from mflux2.models.transformer import load_transformer
    from mflux2.training.step import noisy_inputs
    from tests.test_transformer import make_reference, rel_err

    ref = make_reference(False)
    ref.save_pretrained(tmp_path / "transformer")
    modules = [m.format(i=i) for m in PEFT_TO_MFLUX2 for i in (0, 1)]
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=modules)
    ref.add_adapter(config)
    torch.manual_seed(3)
    with torch.no_grad():  # B non-zero and of the size a trained LoRA has
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    diffusers.Flux2KleinPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(ref),
                                                   transformer_lora_adapter_metadata=config.to_dict())

    model = load_transformer(tmp_path / "transformer", dtype=mx.float32)
    load_lora(model, tmp_path / "lora" / "pytorch_lora_weights.safetensors", trainable=True)
    g = np.random.default_rng(0)
    x0 = g.standard_normal((2, 15, 16)).astype(np.float32)
    refs = g.standard_normal((2, 8 + 6, 16)).astype(np.float32)
    embeds = g.standard_normal((2, 7, 24)).astype(np.float32)
    ids_x = np.array(image_ids(48, 80))
    ids_c = np.concatenate([np.array(image_ids(64, 32, t=10)), np.array(image_ids(32, 48, t=20))])
    txt_ids = np.array([(0, 0, 0, l) for l in range(7)], np.float32)
    batch = Batch(mx.array(x0), mx.array(embeds), mx.array(ids_x), mx.array(txt_ids), refs=mx.array(refs), ref_ids=mx.array(ids_c))
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(timestep_sampling="uniform", memory_limit=None, compile=False))
    key = mx.random.key(11)
    (loss, _), grads = step._grad_fn(False)(model, batch, key)
    _, target, t = noisy_inputs(batch.latents, key, step.cfg)
    noise = np.array(target) + x0  # the step's own ε and t, handed to the reference

    T = torch.from_numpy
    tt = T(np.array(t))
    xt = (1 - tt[:, None, None]) * T(x0) + tt[:, None, None] * T(noise)
    pred = ref(hidden_states=torch.cat([xt, T(refs)], dim=1), encoder_hidden_states=T(embeds), timestep=tt,
               img_ids=T(np.concatenate([ids_x, ids_c])), txt_ids=T(txt_ids), guidance=None, return_dict=False)[0]
    pred = pred[:, : x0.shape[1]]
    want = torch.mean(((pred.float() - (T(noise) - T(x0))) ** 2).reshape(2, -1), 1).mean()
    want.backward()
    assert rel_err(float(loss), float(want.detach())) <= 1e-4
    ours = dict(tree_flatten(grads))
    for peft_name, module in ref.named_modules():
        for pattern, mflux2_name in PEFT_TO_MFLUX2.items():
            for i in (0, 1):
                if peft_name == pattern.format(i=i):
                    for ab in ("A", "B"):
                        theirs = getattr(module, f"lora_{ab}")["default"].weight.grad.numpy()
                        mine = np.array(ours.pop(f"{mflux2_name.format(i=i)}.lora_{ab}"))
                        assert np.abs(theirs).max() > 0
                        assert rel_err(mine, theirs) <= 1e-4, (peft_name, ab, rel_err(mine, theirs))
    assert not ours, list(ours)  # every LoRA gradient compared


# ---------------------------------------------------------------------------------------------
# The trainer on a tiny model


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_edit")
    model = build_tiny_klein(root / "model")
    data = make_images(root / "data", n=3, size=64)
    controls = make_images(root / "control", n=3, size=64, seed=5, captions=False)
    val = make_images(root / "val", n=1, size=64, seed=7)
    val_controls = make_images(root / "val_control", n=1, size=64, seed=8, captions=False)
    return model, data, controls, val, val_controls


def edit_config(tmp_path: Path, tiny_edit, name="cfg.yaml", **sections) -> Path:
    model, data, controls, _, _ = tiny_edit
    cfg = {
        "model": {"path": str(model), "quantization": "bf16", "transformer_quantization": "bf16"},
        "lora": {"rank": 4, "target_layers": "attention"},
        "dataset": {"path": str(data), "control_path": str(controls), "trigger_word": "sks"},
        "training": {"max_steps": 6, "learning_rate": 1e-3, "log_every_n_steps": 1, "seed": 3},
        "memory": {"bucketing": {"resolutions": [64]}},
        "checkpoints": {"output": str(tmp_path / "out"), "save_every": 3},
        "validation": {"prompts": []},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(path: Path, **kw) -> Trainer:
    t = Trainer(load_config(path), log=lambda *a: None, **kw)
    t.run()
    return t


def test_control_latents_are_cached_and_reused(tiny_edit, tmp_path):
    cfg = edit_config(tmp_path, tiny_edit, training={"max_steps": 2})
    first = train(cfg)
    assert first.stats["latents encoded"] == 6 and first.stats["steps with references"] == 2  # 3 targets + 3 controls
    s = first.samples[0]
    cached = first.lat_cache.get(first._control_key(s, s.controls[0]))["latents"]
    vae = first.pipe.vae
    pixels = data_mod.load_control_for_bucket(s.controls[0].path, s.size, s.bucket)
    np.testing.assert_array_equal(np.array(cached), np.array(vae.pack(vae.encode(mx.array(pixels)[None]))[0]))
    assert cached.shape == first._latents(s).shape  # the target's grid
    other = np.asarray(Image.open(s.controls[0].path))[::-1].copy()
    work = tmp_path / "controls"
    shutil.copytree(s.controls[0].path.parent, work)
    Image.fromarray(other).save(work / s.controls[0].path.name)  # one control changed
    changed = edit_config(tmp_path, tiny_edit, name="changed.yaml", training={"max_steps": 2},
                          dataset={"control_path": str(work)})
    assert train(changed, resume=False).stats["latents encoded"] == 1  # the changed control; the rest from the cache


def test_control_dropout_is_resumed_exactly(tiny_edit, tmp_path):
    """With control_dropout 0.5 the decisions come from the checkpointed RNG: a run stopped at step 3
    and resumed trains the same steps, with and without references, as an uninterrupted one."""
    runs = {}
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        cfg = edit_config(tmp_path / name, tiny_edit, dataset={"control_dropout": 0.5}, training={"max_steps": 6})
        if name == "resumed":
            stop = lambda trainer, step: step == 3 and (trainer.output / ".stop").write_text("")  # noqa: E731
            first = train(cfg, on_step=stop)
            assert first.result["step"] == 3
            second = train(cfg)
            runs[name] = (first.stats["steps with references"] + second.stats["steps with references"], tmp_path / name / "out")
        else:
            runs[name] = (train(cfg).stats["steps with references"], tmp_path / name / "out")
    (n_whole, out_whole), (n_resumed, out_resumed) = runs["whole"], runs["resumed"]
    assert 0 < n_whole < 6 and n_resumed == n_whole  # a mix of edit and text-to-image steps, the same ones
    la = [m["loss"] for m in map(json.loads, (out_whole / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    lb = [m["loss"] for m in map(json.loads, (out_resumed / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    wa, wb = mx.load(str(out_whole / "lora_final.safetensors")), mx.load(str(out_resumed / "lora_final.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), rtol=1e-5, atol=1e-7)


def test_edit_run_with_dop_checkpointing_dropout_one_and_a_validation_loss(tiny_edit, tmp_path):
    _, _, _, val, val_controls = tiny_edit
    cfg = edit_config(tmp_path, tiny_edit, dataset={"validation_path": str(val), "validation_control_path": str(val_controls),
                                                      "control_dropout": 1.0},
                      training={"max_steps": 4, "eval_every_n_steps": 2},
                      loss={"diff_output_preservation": True, "diff_output_preservation_class": "thing"},
                      memory={"gradient_checkpointing": True})
    t = train(cfg)
    assert t.result["step"] == 4 and t.stats["steps with references"] == 0  # dropout 1: every step text-to-image
    assert [s.controls[0].path.parent for s in t.val_samples] == [val_controls]
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["dop_loss"] is not None for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    # the validation loss reads the references: without them it differs
    s = t.val_samples[0]
    c = t.cond
    batch = Batch(t._latents(s)[None], c.embeds(s.caption)[None], c.img_ids(s.bucket), c.txt_ids, **t._edit_inputs([s]))
    plain = Batch(t._latents(s)[None], c.embeds(s.caption)[None], c.img_ids(s.bucket), c.txt_ids)
    from mflux2.training.step import StepConfig as SC

    step = TrainStep.__new__(TrainStep)
    step.cfg, step.dtype = SC(), t.model.dtype
    with_refs = float(step.plain_loss(t.model, batch, mx.random.key(10_000))[0])
    assert with_refs == pytest.approx(t._validation_loss(step), rel=1e-6)
    assert with_refs != float(step.plain_loss(t.model, plain, mx.random.key(10_000))[0])


# ---------------------------------------------------------------------------------------------
# Memory estimate and the GPU benchmark hook


def test_memory_estimate_counts_reference_tokens():
    from mflux2.training import memory

    plain = memory.estimate_peak_gb("klein-4b", resolution=512, checkpointing=1)
    edit = memory.estimate_peak_gb("klein-4b", resolution=512, checkpointing=1, references=1)
    longer = memory.estimate_peak_gb("klein-4b", resolution=512, checkpointing=1, text_tokens=512 + 1024)
    assert edit == pytest.approx(longer) and edit > plain  # one 512² reference: 1024 more tokens
    from mflux2.training.plan import _run_args

    cfg = config_from_dict({"dataset": {"path": "d", "control_path": ["a", "b"]}})
    assert _run_args(cfg)["references"] == 2


def test_benchmark_times_the_edit_step():
    from tests.test_benchmark import bench

    r = bench("--control", "1", "--checkpointing", "1", "--resolution", "64")
    assert r["control"] == 1 and r["reference_tokens"] == r["image_tokens"] > 0 and r["loss_finite"] is True
    assert r["tokens_per_s"] > 0 and r["blockwise"] is True


def test_dry_run_of_the_edit_quickstart_reports_pairs_and_counts_references(tmp_path, monkeypatch, capsys):
    from mflux2.model_files import resolve_source
    from mflux2.training import plan as P
    from mflux2.training.cli import main as train_cli

    monkeypatch.chdir(ROOT)
    config = ROOT / "configs" / "quickstart-edit.yaml"
    assert train_cli([str(config), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "edit pairs: 96 image(s) with 1 reference(s)" in out and "edit training: 1 reference image(s)" in out
    cfg = load_config(config, {"checkpoints.output": str(tmp_path / "o")})
    cfg.resolve_model_defaults("klein-base-4b")
    step = P.make_plan(cfg, resolve_source("models/toy"), P.this_machine()).phase("training step").gb
    cfg.dataset.control_path = None
    assert step > P.make_plan(cfg, resolve_source("models/toy"), P.this_machine()).phase("training step").gb
    assert f"{step:6.2f} GB" in next(ln for ln in out.splitlines() if "training step" in ln)
