"""Bad inputs, crashes mid-write, NaNs and full disks: one-line errors and nothing lost."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from mflux2.training.cli import main as train_cli
from mflux2.training.config_loading import load_config
from mflux2.training.outputs import checkpoint_dirs, latest_checkpoint
from mflux2.training.trainer import Trainer, TrainingError
from tests.test_trainer import metrics, tiny, write_config  # noqa: F401  (fixture)
from tests.tiny_flux2 import make_images

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv) -> str:
    code = train_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("mflux2-train:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- the bad-input matrix through the CLI ---------------------------------------------------------


def test_config_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert "nope.yaml" in one_line_error(capsys, [str(missing)])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "mapping" in one_line_error(capsys, [str(tmp_path / "list.yaml")])
    (tmp_path / "typo.yaml").write_text("model: {name: klein-4b}\ntraining: {learnin_rate: 0.1}\n")
    msg = one_line_error(capsys, [str(tmp_path / "typo.yaml")])
    assert "training.learnin_rate" in msg and "learning_rate" in msg
    (tmp_path / "rank.yaml").write_text("model: {name: klein-4b}\nlora: {rank: 0}\ndataset: {path: x}\n")
    assert "lora.rank" in one_line_error(capsys, [str(tmp_path / "rank.yaml")])
    # (DOP without a class word is no error: the Swift trainer assumes one, and so do we, with a warning)
    (tmp_path / "dop.yaml").write_text("model: {name: klein-4b}\ndataset: {path: x, trigger_word: sks}\n"
                                       "loss: {diff_output_preservation: true, diff_output_preservation_every_n_steps: 0}\n")
    assert "diff_output_preservation_every_n_steps" in one_line_error(capsys, [str(tmp_path / "dop.yaml")])
    (tmp_path / "res.yaml").write_text("model: {name: klein-4b}\nmemory: {bucketing: {resolutions: [500]}}\n")
    assert "multiple of 16" in one_line_error(capsys, [str(tmp_path / "res.yaml")])


def test_data_and_model_errors_are_one_line(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = write_config(tmp_path, tiny, dataset={"path": str(empty)})
    assert str(empty) in one_line_error(capsys, [str(cfg)])

    bad = make_images(tmp_path / "bad", n=2, size=64)
    (bad / "img_0.png").write_bytes((bad / "img_0.png").read_bytes()[:60])  # truncated file
    cfg = write_config(tmp_path, tiny, dataset={"path": str(bad)})
    assert "img_0.png" in one_line_error(capsys, [str(cfg)])

    broken_model = tmp_path / "model"
    broken_model.mkdir()
    (broken_model / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    cfg = write_config(tmp_path, tiny, model={"path": str(broken_model)})
    assert "transformer" in one_line_error(capsys, [str(cfg)])

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = write_config(tmp_path, tiny, checkpoints={"output": str(blocker / "out")})
    assert "which is a file" in one_line_error(capsys, [str(cfg)])


def test_odd_images_are_converted_not_rejected(tiny, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")  # 16-bit grey
    (folder / "gray.txt").write_bytes("caf\xe9 [trigger]".encode("latin-1"))  # not UTF-8
    cfg = write_config(tmp_path, tiny, dataset={"path": str(folder)}, training={"max_steps": 2},
                       validation={"prompts": []})
    t = Trainer(load_config(cfg), log=lambda *a: None)
    t.run()
    assert t.stats["latents encoded"] == 4
    assert any(s.caption == "café sks" for s in t.samples)


def test_resume_with_another_model_is_refused(tiny, tmp_path, capsys):
    """The model is known by its identity (architecture + weights fingerprint), not its path: the same
    architecture with other weights is refused in one line (a moved folder resumes: test_resume.py)."""
    from tests.tiny_flux2 import build_tiny_klein

    cfg = write_config(tmp_path, tiny, training={"max_steps": 2}, validation={"prompts": []})
    Trainer(load_config(cfg), log=lambda *a: None).run()
    other = build_tiny_klein(tmp_path / "other_model", seed=1)
    cfg2 = write_config(tmp_path, tiny, model={"path": str(other)}, training={"max_steps": 4}, validation={"prompts": []})
    msg = one_line_error(capsys, [str(cfg2)])
    assert "checkpoint_000002: trained on another model than" in msg and "model.weights" in msg
    assert str(tiny[0]) in msg and "set model.path to that model" in msg


# ---- NaNs and full disks --------------------------------------------------------------------------


def test_repeated_nonfinite_loss_stops_with_the_last_good_state(tiny, tmp_path, monkeypatch):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 20}, validation={"prompts": []},
                       checkpoints={"save_every": 0}, loss={"diff_output_preservation": False})
    t = Trainer(load_config(cfg), log=lambda *a: None)
    real = Trainer._latents

    def poisoned(self, s):
        x = real(self, s)
        return x * float("nan") if self._poison else x

    t._poison = False
    monkeypatch.setattr(Trainer, "_latents", poisoned)

    def after(trainer, step):
        if step == 3:
            trainer._poison = True
            trainer._good = {k: np.array(v) for k, v in _flat(trainer.model.trainable_parameters())}

    t.on_step = after
    with pytest.raises(TrainingError, match="not finite for 5 steps"):
        t.run()
    ck = latest_checkpoint(tmp_path / "out")
    state = json.loads((ck / "training_state.json").read_text())
    assert state["skipped_nonfinite"] == 5 and state["step"] == 8
    saved = mx.load(str(ck / "optimizer_state.safetensors"))
    for k, v in t._good.items():
        np.testing.assert_array_equal(np.array(saved[f"params.{k}"]), v)


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_disk_full_before_start_is_refused(tiny, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg = write_config(tmp_path, tiny)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TrainingError, match="not enough free disk space"):
        Trainer(load_config(cfg), log=lambda *a: None).run()
    assert not (tmp_path / "out" / ".latent_cache").exists() or not any((tmp_path / "out" / ".latent_cache").iterdir())


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_resumes(tiny, tmp_path, monkeypatch):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 6}, validation={"prompts": []})
    real_save = mx.save_safetensors
    calls = {"n": 0}

    def flaky(path, arrays, *a, **k):
        if "optimizer_state" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, arrays, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", flaky)
    with pytest.raises(TrainingError, match="disk is full.*checkpoint_000003 is kept"):
        Trainer(load_config(cfg), log=lambda *a: None).run()
    out = tmp_path / "out"
    assert [s for s, _ in checkpoint_dirs(out)] == [3]
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    t = Trainer(load_config(cfg), log=lambda *a: None)
    t.run()
    assert t.result["step"] == 6


# ---- SIGKILL at random moments --------------------------------------------------------------------


def _check_checkpoints(out: Path):
    for step, d in checkpoint_dirs(out):
        state = json.loads((d / "training_state.json").read_text())
        assert state["step"] == step
        for f in ("lora.safetensors", "optimizer_state.safetensors"):
            with safe_open(str(d / f), "np") as fh:
                assert len(list(fh.keys())) > 0


def _latest_step(out: Path) -> int:
    dirs = checkpoint_dirs(out) if out.exists() else []
    return max((s for s, _ in dirs), default=0)


def test_sigkill_at_random_moments_never_loses_a_checkpoint(tiny, tmp_path):
    # Each run is killed at a random moment *after* it has made progress (a new checkpoint), so the kills
    # land mid-training, often mid-write, however fast or slow the machine is.
    max_steps = 120
    cfg = write_config(tmp_path, tiny, training={"max_steps": max_steps},
                       checkpoints={"save_every": 1, "keep_last": 3}, validation={"prompts": []})
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(1234)
    kills = 0
    for i in range(6):
        before = _latest_step(out)
        proc = subprocess.Popen([sys.executable, "-m", "mflux2.training.cli", str(cfg)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while proc.poll() is None and _latest_step(out) <= before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        _check_checkpoints(out)
        assert _latest_step(out) < max_steps, "the run finished before it could be killed: raise max_steps"
        if i == 2 and (out / ".latent_cache").exists():  # a half-written cache entry is detected and rebuilt
            entry = next((out / ".latent_cache").glob("*.safetensors"))
            entry.write_bytes(entry.read_bytes()[:50])
    assert kills == 6
    done = subprocess.run([sys.executable, "-m", "mflux2.training.cli", str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_checkpoints(out)
    assert (out / "lora_final.safetensors").exists()
    assert latest_checkpoint(out).name == f"checkpoint_{max_steps:06d}"
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == max_steps  # the log reads as one uninterrupted run
