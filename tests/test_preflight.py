"""`mflux2-train CONFIG --dry-run` (mflux2/training/preflight.py): the report in seconds, loading no
weights and downloading nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mflux2.training import memory
from mflux2.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def no_weights(monkeypatch):
    """Reading any safetensors tensor fails the test."""

    def refuse(*a, **k):
        raise AssertionError(f"--dry-run read weights: {a}")

    monkeypatch.setattr(mx, "load", refuse)
    try:
        import safetensors
        import safetensors.numpy

        monkeypatch.setattr(safetensors, "safe_open", refuse)
        monkeypatch.setattr(safetensors.numpy, "load_file", refuse)
    except ImportError:
        pass


def dry_run(capsys, *args):
    t0 = time.perf_counter()
    rc = main([*map(str, args), "--dry-run"])
    took = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return rc, out, err, took


def test_quickstart_fits_in_seconds_without_weights(tmp_path, monkeypatch, capsys, no_weights):
    monkeypatch.chdir(ROOT)
    rc, out, err, took = dry_run(capsys, CONFIG, "--output", tmp_path / "out")
    assert rc == 0, out + err
    for section in ("== config", "== dataset", "== model", "== plan", "== disk", "== verdict"):
        assert section in out
    assert "16 image(s)" in out and "64x64 (16)" in out
    assert "local: models/toy" in out
    for phase in ("text-encoder cache", "latent cache", "training step", "validation images"):
        assert phase in out
    assert "\n  fits" in out
    assert took <= 10, took
    assert not (tmp_path / "out").exists()  # nothing written


def test_step_figure_is_the_runs(tmp_path, monkeypatch, capsys, no_weights):
    """The training-step line is the plan's, the figure the trainer logs."""
    from mflux2.model_files import resolve_source
    from mflux2.training import plan as P
    from mflux2.training.config_loading import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(CONFIG, {"checkpoints.output": str(tmp_path / "o")})
    cfg.resolve_model_defaults("klein-base-4b")
    want = P.make_plan(cfg, resolve_source("models/toy"), P.this_machine()).phase("training step").gb
    rc, out, _, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "o")
    line = next(ln for ln in out.splitlines() if "training step" in ln)
    assert f"{want:6.2f} GB" in line


def test_does_not_fit_lists_the_changes(tmp_path, monkeypatch, capsys, no_weights):
    monkeypatch.chdir(ROOT)
    no_val = ("--set", "validation.prompts=[]")
    rc, out, err, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "out", *no_val)
    assert rc == 0, out + err
    step = float(re.search(r"training step\s+([\d.]+) GB", out).group(1))
    monkeypatch.setattr(memory, "available_gb", lambda: step * 0.9)  # a machine where this step does not fit
    rc, out, err, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "out", *no_val)
    assert rc == 1
    verdict = out.split("== verdict", 1)[1]
    assert "does not fit:" in verdict and "\n  - does not fit: training step" in verdict
    fixes = [line for line in verdict.splitlines() if line.startswith("  - --set")]
    assert fixes and all("re-planned: peak" in f for f in fixes)
    assert any("loss.diff_output_preservation=false" in f for f in fixes)  # what fits for the toy's DOP step
    assert not any("every_n_steps" in f for f in fixes)  # a DOP step is the peak, however rare
    assert len(err.strip().splitlines()) == 1 and "does not fit" in err


def test_hub_model_not_in_cache_offline(tmp_path):
    """A hub id with an empty cache and HF_HUB_OFFLINE=1: reported, exit 1, nothing downloaded."""
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"model:\n  name: klein-4b\ndataset:\n  path: {ROOT / 'data/toy/star'}\n  image_size: 64\n"
                   f"checkpoints:\n  output: {tmp_path / 'out'}\n")
    home = tmp_path / "hf"
    home.mkdir()
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mflux2.training.cli", str(cfg), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert p.returncode == 1, p.stdout + p.stderr
    assert "black-forest-labs/FLUX.2-klein-base-4B: not in the cache" in p.stdout
    assert "not in the cache" in p.stderr and len(p.stderr.strip().splitlines()) <= 2  # (+ a config warning)
    assert "training step" in p.stdout  # the transformer's figures come from the preset alone
    assert not any(f.is_file() for f in home.rglob("*")), list(home.rglob("*"))
    print(f"subprocess dry run (imports included): {took:.1f} s")


def test_unreadable_image_listed(tmp_path, monkeypatch, capsys, no_weights):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "data/toy/star", data)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.chdir(ROOT)
    rc, out, err, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "out", "--dataset", data)
    assert rc == 1  # the run would stop at them
    section = out.split("== dataset")[1].split("== model")[0]
    # one story: the section's error names both, says the run stops, and the count is the readable ones
    assert "error: dataset.path: 2 unreadable image(s), the run stops at them" in section, section
    assert "\n    broken.png (" in section and "\n    cut.jpg (" in section and "skipped" not in section
    assert "the 16 readable image(s)" in section
    assert "broken.png" in err and "cut.jpg" in err and "skip_bad_images" in err
    rc, out, err, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "out", "--dataset", data,
                              "--set", "dataset.skip_bad_images=true")
    assert rc == 0, out + err
    assert "broken.png" in out


def test_trainer_checks_the_same_disk_figure(tmp_path, monkeypatch, capsys):
    """Trainer._check_disk_space_for and the dry run share preflight.disk_need; a full disk is refused
    before any cache is filled."""
    import shutil as sh
    from collections import namedtuple

    from mflux2.training.config_loading import load_config
    from mflux2.training.trainer import Trainer, TrainingError

    monkeypatch.chdir(ROOT)
    rc, out, _, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "out")
    disk_line = next(ln for ln in out.splitlines() if "for the caches and" in ln)
    seen = {}
    real = Trainer._check_disk_space

    def spy(self, need, keep):
        seen["need"], seen["keep"] = need, keep
        return real(self, need, keep)

    monkeypatch.setattr(Trainer, "_check_disk_space", spy)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TrainingError, match="not enough free disk space"):
        Trainer(load_config(CONFIG, {"checkpoints.output": str(tmp_path / "out")}), log=lambda *a: None).run()
    assert f"{seen['need'] / 1e9:.2f} GB for the caches and {seen['keep']} checkpoint(s)" in disk_line
    lat = tmp_path / "out" / ".latent_cache"
    assert not lat.exists() or not any(lat.iterdir())


def test_validation_estimate_counts_an_editing_prompts_reference_tokens(tmp_path, monkeypatch, capsys, no_weights):
    import re

    from PIL import Image

    monkeypatch.chdir(ROOT)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (512, 512), "red").save(ref)

    def validation_gb(*extra):
        rc, out, err, _ = dry_run(capsys, CONFIG, "--output", tmp_path / "out", *extra)
        assert rc == 0, out + err
        return float(re.search(r"validation images\s+([\d.]+) GB", out).group(1))

    from mflux2.training import plan as P

    for path in P.VAE_BYTES_PER_PIXEL.values():  # the forward's term, where references count
        monkeypatch.setitem(path, "decode", 0)
    prompt = "validation.prompts=[{prompt: a red shape, sizes: [512]%s}]"
    plain = validation_gb("--set", prompt % "")
    edit = validation_gb("--set", prompt % f", reference_image: {ref}")
    assert edit > plain  # 1024 reference tokens beside the image's 1024
