"""The trainer end to end on a tiny FLUX.2 model in the real diffusers layout (CPU, seconds each)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml

from mflux2 import lora as lora_mod
from mflux2.training.cli import main as train_cli
from mflux2.training.config_loading import load_config
from mflux2.training.step import Batch, StepConfig, TrainStep
from mflux2.training.trainer import Trainer, TrainingError
from tests.tiny_flux2 import build_tiny_klein, make_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_klein(root / "model"), make_images(root / "data", n=3, size=64)


def write_config(tmp_path: Path, tiny, **sections) -> Path:
    model, data = tiny
    cfg = {
        "model": {"path": str(model), "quantization": "bf16", "transformer_quantization": "bf16"},
        "lora": {"rank": 4, "target_layers": "attention"},
        "dataset": {"path": str(data), "trigger_word": "sks"},
        "training": {"max_steps": 6, "warmup_steps": 2, "learning_rate": 1e-3, "log_every_n_steps": 1, "seed": 7},
        "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "thing",
                 "diff_output_preservation_every_n_steps": 2},
        "memory": {"bucketing": {"resolutions": [64]}},
        "checkpoints": {"output": str(tmp_path / "out"), "save_every": 3},
        "validation": {"steps": 2, "prompts": [{"prompt": "a photo of a thing", "sizes": [64]}]},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path: Path, **kw) -> Trainer:
    t = Trainer(load_config(path), log=lambda *a: None, **kw)
    t.run()
    return t


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_writes_the_whole_output_tree(tiny, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny)
    assert train_cli([str(cfg)]) == 0
    out = tmp_path / "out"
    for name in ["baseline/prompt_0_64x64.png", "baseline/prompt_1_64x64.png", "learning_curve.svg", "lora_final.safetensors",
                 "metrics.jsonl", "progression/prompt_0_64x64.png", "progression/prompts.json"]:
        assert (out / name).is_file(), name
    for step in (3, 6):
        ck = out / f"checkpoint_{step:06d}"
        for name in ["lora.safetensors", "optimizer_state.safetensors", "training_state.json", "prompt_0_64x64.png"]:
            assert (ck / name).is_file(), (ck, name)
    assert any((out / ".latent_cache").iterdir()) and any((out / ".text_cache").iterdir())
    prompts = json.loads((out / "progression" / "prompts.json").read_text())
    assert [p["trigger"] for p in prompts] == [True, False] and prompts[0]["prompt"].startswith("sks")
    state = json.loads((out / "checkpoint_000006" / "training_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
    svg = (out / "learning_curve.svg").read_text()
    assert svg.startswith("<svg") and "DOP preservation" in svg and "polyline" in svg
    # the LoRA file loads into a fresh transformer and has the recorded metadata
    from safetensors import safe_open

    with safe_open(str(out / "lora_final.safetensors"), "np") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["trigger_word"] == "sks" and meta["training_steps"] == "6" and meta["rank"] == "4"
    assert all(k.startswith("diffusion_model.") for k in keys)


def test_dop_every_n_runs_on_exactly_those_steps(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, loss={"diff_output_preservation_every_n_steps": 3},
                       training={"max_steps": 7}, validation={"prompts": []})
    run(cfg)
    rows = [m for m in metrics(tmp_path / "out") if "loss" in m]
    dop_steps = [m["step"] for m in rows if m["dop_loss"] is not None]
    assert dop_steps == [1, 4, 7]  # 0-based steps 0, 3, 6 run DOP
    # DOP's preservation term is exactly zero at the first step: LoRA B starts at zero
    assert rows[0]["dop_loss"] == 0.0
    assert rows[3]["dop_loss"] > 0.0


def test_resume_continues_exactly(tiny, tmp_path):
    a = write_config(tmp_path / "a", tiny, validation={"prompts": []}) if (tmp_path / "a").mkdir() is None else None
    run(a)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = write_config(b_dir, tiny, validation={"prompts": []})

    def stop_at_3(trainer, step):
        if step == 3:
            (trainer.output / ".stop").write_text("")

    first = run(b, on_step=stop_at_3)
    assert first.result["reason"] == "stopped" and first.result["step"] == 3
    second = run(b)  # picks up checkpoint_000003
    assert second.result["step"] == 6
    la = [m["loss"] for m in metrics(tmp_path / "a" / "out") if "loss" in m]
    lb = [m["loss"] for m in metrics(b_dir / "out") if "loss" in m]
    assert len(la) == len(lb) == 6
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    wa = mx.load(str(tmp_path / "a" / "out" / "lora_final.safetensors"))
    wb = mx.load(str(b_dir / "out" / "lora_final.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), rtol=1e-5, atol=1e-7)


def test_second_run_uses_the_caches(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 2})
    first = run(cfg)
    assert first.stats["latents encoded"] == 3 and first.stats["prompts embedded"] > 0
    second = run(cfg, resume=False)
    assert second.stats["latents encoded"] == 0 and second.stats["prompts embedded"] == 0


def test_text_encoder_quantization_auto_is_decided_before_the_text_encoder_loads(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 1}, validation={"prompts": []}, model={"quantization": "auto"})
    lines = []
    t = Trainer(load_config(cfg), log=lines.append)
    t.run()
    assert t.result["step"] == 1 and t.pipe.text_encoder_quantize is None
    assert any(line.startswith("text encoder auto: bf16") for line in lines)  # the tiny one fits anywhere


def test_resume_refuses_a_changed_lora_rank(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 3}, validation={"prompts": []})
    run(cfg)
    changed = write_config(tmp_path, tiny, training={"max_steps": 6}, lora={"rank": 8}, validation={"prompts": []})
    with pytest.raises(TrainingError, match="lora.rank"):
        run(changed)


def test_resume_refuses_an_optimizer_state_of_another_layout(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 3}, validation={"prompts": []})
    run(cfg)
    ck = sorted((tmp_path / "out").glob("checkpoint_*"))[-1]
    state = dict(mx.load(str(ck / "optimizer_state.safetensors")))
    gone = [k for k in state if k.startswith("optimizer.") and k.endswith(".m")]
    assert gone
    for k in gone:  # as written by a version that kept one state entry per LoRA matrix
        del state[k]
    mx.save_safetensors(str(ck / "optimizer_state.safetensors"), state)
    more = write_config(tmp_path, tiny, training={"max_steps": 6}, validation={"prompts": []})
    with pytest.raises(TrainingError, match=r"optimizer_state.safetensors: no optimizer\.\S+\.m .*--no-resume"):
        run(more)


def test_control_files_checkpoint_and_pause(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 5}, checkpoints={"save_every": 0}, validation={"prompts": []})
    out = tmp_path / "out"
    seen = {}

    def control(trainer, step):
        if step == 1:
            (out / ".checkpoint").write_text("")
        if step == 2:
            seen["after_checkpoint"] = (out / "checkpoint_000001").is_dir() and not (out / ".checkpoint").exists()
            (out / ".pause").write_text("")
            threading.Timer(1.0, lambda: (out / ".pause").unlink()).start()
            seen["t_pause"] = time.time()
        if step == 3:
            seen["paused_s"] = time.time() - seen["t_pause"]
            seen["pause_checkpoint"] = (out / "checkpoint_000002").is_dir()

    t = run(cfg, on_step=control)
    assert seen["after_checkpoint"] and seen["pause_checkpoint"]
    assert seen["paused_s"] >= 0.9
    assert t.result["step"] == 5 and (out / "lora_final.safetensors").exists()


# ---- the step itself ---------------------------------------------------------------------------


def tiny_model():
    from mflux2.models.transformer import Flux2Transformer, TransformerConfig

    mx.random.seed(0)
    cfg = TransformerConfig(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                            joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
    model = Flux2Transformer(cfg)
    mx.eval(model.parameters())
    return model


def tiny_batch(dop=True, seed=0):
    g = np.random.default_rng(seed)
    ids = np.array([(0, r, c, 0) for r in range(2) for c in range(2)], np.float32)
    tids = np.array([(0, 0, 0, l) for l in range(6)], np.float32)
    return Batch(mx.array(g.standard_normal((1, 4, 128)), mx.float32), mx.array(g.standard_normal((1, 6, 24)), mx.float32),
                 mx.array(ids), mx.array(tids), mx.array(g.standard_normal((1, 6, 24)), mx.float32) if dop else None)


def test_loss_decreases_when_overfitting_one_image():
    from mflux2.models.transformer import Flux2Transformer, TransformerConfig

    mx.random.seed(0)
    model = Flux2Transformer(TransformerConfig(num_layers=2, num_single_layers=2, num_attention_heads=4,
                                               attention_head_dim=16, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4)))
    mx.eval(model.parameters())
    lora_mod.apply_lora(model, rank=16, targets="all")
    step = TrainStep(model, optim.AdamW(learning_rate=1e-3), StepConfig(timestep_sampling="uniform", compile=True))
    batch = tiny_batch(dop=False)
    keys = [mx.random.key(1000 + i) for i in range(8)]  # held-out t/noise draws, the same before and after

    def fixed_loss():
        return float(np.mean([step.plain_loss(model, batch, k)[0].item() for k in keys]))

    before = fixed_loss()
    for i in range(200):
        out = step(batch, mx.random.key(i))
        mx.eval(out["loss"], step.state_arrays())
    after = fixed_loss()
    assert after < 0.85 * before, (before, after)  # measured 2.33 -> 1.76


def test_dop_batched_gradient_equals_three_passes():
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = tiny_model()
    lora_mod.apply_lora(model, rank=4, targets="attention")
    # non-zero B so the preservation term has a gradient
    for _, m in lora_mod.lora_layers(model):
        m.lora_B = mx.random.normal(m.lora_B.shape) * 0.1
    batch, key = tiny_batch(), mx.random.key(3)
    grads = {}
    for batched in (True, False):
        st = TrainStep(model, optim.SGD(learning_rate=0.0), StepConfig(dop_batched=batched, compile=False))
        (loss, (main, pres, _)), g = nn.value_and_grad(model, lambda m: st.dop_loss(m, batch, key))(model)
        grads[batched] = (loss.item(), pres.item(), dict(tree_flatten(g)))
    assert grads[True][1] > 0
    assert abs(grads[True][0] - grads[False][0]) < 1e-5
    for k, v in grads[True][2].items():
        np.testing.assert_allclose(np.array(v), np.array(grads[False][2][k]), rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_skips_the_update_on_device():
    model = tiny_model()
    lora_mod.apply_lora(model, rank=4)
    step = TrainStep(model, optim.AdamW(learning_rate=1e-2), StepConfig())
    good = tiny_batch(dop=False)
    mx.eval(step(good, mx.random.key(0))["loss"], step.state_arrays())
    before = {k: np.array(v) for k, v in tree_items(model.trainable_parameters())}
    bad = Batch(good.latents * float("nan"), good.prompt_embeds, good.img_ids, good.txt_ids)
    out = step(bad, mx.random.key(1))
    mx.eval(out["loss"], step.state_arrays())
    assert not out["finite"].item()
    after = {k: np.array(v) for k, v in tree_items(model.trainable_parameters())}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(v).all() for v in after.values())


def tree_items(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_accumulation_batches_ema_caption_dropout_validation_loss_and_early_stop(tiny, tmp_path):
    model, data = tiny
    val = make_images(tmp_path / "val", n=2, size=64, seed=9)
    cfg = write_config(
        tmp_path, tiny,
        dataset={"validation_path": str(val)},
        training={"max_steps": 12, "batch_size": 2, "gradient_accumulation": 2, "caption_dropout": 0.5,
                  "eval_every_n_steps": 2, "optimizer": "lion", "lr_scheduler": "linear"},
        ema={"enabled": True, "decay": 0.5},
        early_stop={"on_val_stagnation": True, "min_val_improvement": 0.5, "val_patience": 2},
        loss={"diff_output_preservation": False}, validation={"prompts": []},
    )
    t = run(cfg)
    rows = metrics(tmp_path / "out")
    vals = [m for m in rows if "val_loss" in m]
    assert vals and all(np.isfinite(m["val_loss"]) for m in vals)
    # a 50% improvement per evaluation never happens: stagnation stops the run after 2 more evaluations
    assert t.result["reason"] == "early-stopped" and t.result["step"] == 6
    # with EMA on, the saved LoRA is the average, not the live parameters
    saved = lora_mod.read_lora(tmp_path / "out" / "lora_final.safetensors")[0]
    live = lora_mod.lora_weights(t.model)
    k = sorted(saved)[0]
    assert not np.allclose(np.array(saved[k].delta()), np.array(live[k].delta()))


def test_print_config_and_cli_overrides(tiny, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny)
    assert train_cli([str(cfg), "--print-config", "--max-steps", "9", "--set", "loss.weighting=bell_shaped"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["max_steps"] == 9 and shown["loss"]["weighting"] == "bell_shaped"
    assert shown["lora"]["alpha"] == 4.0  # derived default (= rank), resolved
    assert not (tmp_path / "out").exists()  # printing trains nothing
    assert train_cli([str(cfg), "--max-steps", "2", "--output", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "checkpoint_000002").is_dir()


def test_ctrl_c_once_stops_cleanly_with_a_final_checkpoint(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cfg = write_config(tmp_path, tiny, training={"max_steps": 100000}, checkpoints={"save_every": 0},
                       validation={"prompts": []})
    proc = subprocess.Popen([sys.executable, "-m", "mflux2.training.cli", str(cfg)], cwd=root,
                            env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-1500:]
    assert (tmp_path / "out" / "lora_final.safetensors").exists()
    assert "stopped at step" in out


def test_apple_silicon_wires_the_working_set_and_tight_memory_runs_segments_synchronously(tiny, tmp_path, monkeypatch):
    """Where MLX reports a recommended working set (Metal), training wires it for the run and
    restores the old limit; with checkpointing and a machine where only the synchronous segments'
    estimate fits, the step runs them synchronously (and still trains)."""
    import mflux2.training.memory as memory

    real_info = mx.device_info()
    monkeypatch.setattr(mx, "device_info", lambda: {**real_info, "max_recommended_working_set_size": 64 * 10**9})
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 123)
    monkeypatch.setattr(memory, "available_gb", lambda: 0.4)  # tiny model: ahead ≈ 0.75 GB, synchronous ≈ 0.05 GB
    cfg = write_config(tmp_path, tiny, training={"max_steps": 2}, validation={"prompts": []},
                       memory={"gradient_checkpointing": True})
    t = run(cfg)
    assert calls == [64 * 10**9, 123]
    assert t.blockwise_ahead == 0 and t.result["step"] == 2
    assert all(m["loss"] == m["loss"] for m in metrics(tmp_path / "out") if "loss" in m)


def test_validation_prompts_that_name_the_trigger_are_tagged_as_trigger_prompts():
    from mflux2.training.config_loading import config_from_dict
    from mflux2.training.validation import validation_items

    cfg = config_from_dict({"model": {"name": "klein-4b"}, "dataset": {"path": "x", "trigger_word": "sks"},
                            "validation": {"prompts": [
                                {"prompt": "a red sks on blue", "apply_trigger": False, "sizes": [64]},
                                {"prompt": "a red shape on blue", "apply_trigger": False, "sizes": [64]},
                                {"prompt": "a dog", "apply_trigger": True, "sizes": [64]},
                                {"prompt": "the sksx word is not the trigger", "apply_trigger": False, "sizes": [64]}]}})
    got = [(it.prompt, it.with_trigger) for it in validation_items(cfg)]
    assert got == [("a red sks on blue", True), ("a red shape on blue", False), ("sks, a dog", True), ("a dog", False),
                   ("the sksx word is not the trigger", False)]


def test_edit_validation_prompts_render_with_their_reference(tiny, tmp_path, monkeypatch):
    """validation.prompts[].reference_image (relative: from the current folder, as Swift): the prompt is
    rendered with its reference, encoded by the generation path (baseline too), as prompt_<i>_i2i_*;
    report.html and the progression strip show the reference, then baseline and checkpoints."""
    import re

    from PIL import Image

    from mflux2.pipeline import Flux2Pipeline
    from mflux2.training.config import ConfigError
    from mflux2.training.validation import prepare_validation_references

    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "refs", n=1, size=96, seed=3, captions=False)
    ref = Path("refs/img_0.png")
    text = "a photo of a thing"
    cfg = write_config(tmp_path, tiny, training={"max_steps": 2}, checkpoints={"save_every": 2},
                       loss={"diff_output_preservation": False}, validation={"prompts": [
                           {"prompt": text, "sizes": [64], "apply_trigger": False, "reference_image": str(ref)},
                           {"prompt": text, "sizes": [64], "apply_trigger": False}]})
    t = run(cfg)
    out = tmp_path / "out"
    for name in ["baseline/prompt_0_i2i_64x64.png", "baseline/prompt_1_64x64.png", "checkpoint_000002/prompt_0_i2i_64x64.png",
                 "progression/prompt_0_i2i_64x64.png", "progression/prompt_0_reference_0.png"]:
        assert (out / name).is_file(), name
    img = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)  # noqa: E731
    edit, plain = img(out / "baseline/prompt_0_i2i_64x64.png"), img(out / "baseline/prompt_1_64x64.png")
    assert np.abs(edit - plain).mean() > 0.5  # same prompt and seed: only the reference differs
    # the baseline is what generation makes with that reference (klein-base: CFG, the validation settings)
    pipe = Flux2Pipeline.from_pretrained(tiny[0])
    want = pipe.generate(text, 64, 64, num_inference_steps=2, guidance_scale=t.validation.cfg_scale,
                         seed=t.cfg.validation.seed, image=ref, progress=False)[0]
    assert np.abs(np.asarray(want, dtype=np.int16) - edit).max() <= 1
    assert Image.open(out / "progression/prompt_0_reference_0.png").size == (96, 96)
    assert Image.open(out / "progression/prompt_0_i2i_64x64.png").size == (3 * 64, 64 + 18)  # reference, baseline, step 2
    section = re.search(r'<section class="prompt">.*?edit of the reference.*?</section>', (out / "report.html").read_text()).group(0)
    assert re.findall(r'<img alt="([^"]+)"', section) == ["reference", "baseline", "step 2"]
    # a reference the model cannot take stops the run at setup, naming the prompt
    Image.new("RGB", (40, 90)).save(tmp_path / "small.png")
    bad = load_config(write_config(tmp_path, tiny, validation={"prompts": [text, {"prompt": text, "reference_image": ["small.png"]}]}))
    with pytest.raises(ConfigError, match=r"validation.prompts\[1\].reference_image: small.png: 40x90 is too small"):
        prepare_validation_references(bad, pipe)


def test_checkpointed_runs_on_cuda_set_small_command_batches_before_anything_runs(tiny, tmp_path, monkeypatch):
    """MLX reads MLX_MAX_OPS_PER_BUFFER once, at its first command: the trainer decides
    checkpointing and sets it before the caches are filled (the first device work)."""
    import mflux2.ops.switches as switches

    monkeypatch.setattr(switches, "cuda_available", lambda: True)  # the device stays the CPU: only the decision runs
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "")  # recorded, so the value the code sets is undone after
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    seen = []
    fill = Trainer._fill_caches
    monkeypatch.setattr(Trainer, "_fill_caches", lambda self, *a: seen.append(os.environ.get("MLX_MAX_OPS_PER_BUFFER")) or fill(self, *a))
    logs = []
    for checkpointing in (False, True):
        folder = tmp_path / str(checkpointing)
        folder.mkdir()
        cfg = write_config(folder, tiny, training={"max_steps": 1}, validation={"prompts": []},
                           memory={"gradient_checkpointing": checkpointing})
        Trainer(load_config(cfg), log=logs.append).run()
    assert seen == [None, "4"]
    assert sum(line.startswith("memory: MLX command batches of 4") for line in logs) == 1


def test_a_klein_name_on_a_distilled_folder_says_how_to_train_it(tiny, tmp_path):
    """`model.name: klein-4b` trains the klein-base weights (as the Swift trainer): a local distilled
    folder is refused with one line that names both ways out."""
    import json as _json

    from mflux2.hub import ModelLoadError
    from mflux2.training.trainer import open_model

    model, _ = tiny
    index = _json.loads((model / "model_index.json").read_text())
    assert index["is_distilled"] is False
    distilled = tmp_path / "distilled"
    shutil.copytree(model, distilled)
    (distilled / "model_index.json").write_text(_json.dumps({**index, "is_distilled": True}))
    from mflux2.training.config_loading import config_from_dict

    cfg = config_from_dict({"model": {"name": "klein-4b", "path": str(distilled)}, "dataset": {"path": "x"}})
    with pytest.raises(ModelLoadError, match="model.use_base: false") as e:
        open_model(cfg)
    assert "\n" not in str(e.value)
    cfg = config_from_dict({"model": {"name": "klein-4b", "path": str(distilled), "use_base": False}, "dataset": {"path": "x"}})
    assert open_model(cfg).family == "klein"


def test_validation_images_from_a_separate_validation_model_carry_the_trained_lora(tiny, tmp_path):
    """model.validation_path: the images come from another transformer that carries the same LoRA.
    With a copy of the training model there, every checkpoint's images equal those the training
    model itself renders; the LoRA has moved them away from the baseline (so it was applied)."""
    import json as _json

    from PIL import Image

    model, _ = tiny
    copy = tmp_path / "validation_model"
    shutil.copytree(model, copy)
    outs = {}  # (the copy stays klein-base like the original: same sampling settings, CFG included)
    for name, extra in (("same", {}), ("separate", {"validation_path": str(copy)})):
        d = tmp_path / name
        d.mkdir()
        cfg = write_config(d, tiny, model={**extra}, training={"max_steps": 4, "learning_rate": 5e-2},
                           checkpoints={"output": str(d / "out"), "save_every": 4})
        t = run(cfg)
        assert (t.validation.pipe is not None) == (name == "separate")
        outs[name] = d / "out"
    img = lambda p: np.asarray(Image.open(p), dtype=np.int16)  # noqa: E731
    base = img(outs["same"] / "baseline" / "prompt_0_64x64.png")
    same = img(outs["same"] / "checkpoint_000004" / "prompt_0_64x64.png")
    separate = img(outs["separate"] / "checkpoint_000004" / "prompt_0_64x64.png")
    assert np.abs(same - base).mean() > 0.5  # the LoRA changed the image
    assert np.abs(separate - same).max() <= 1  # and the separate model rendered it the same way
    report = (outs["separate"] / "report.html").read_text()
    assert "validation_model (klein-base), 2 steps, CFG" in report and "LoRA trained on" in report
