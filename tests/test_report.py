"""report.html: self-contained, refreshed at each checkpoint, and it really renders (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_trainer import run, tiny, write_config  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = write_config(tmp, tiny, training={"max_steps": 4}, checkpoints={"save_every": 2})
    run(cfg)
    return tmp / "out" / "report.html"


def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    assert "<svg" in page and "polyline" in page  # the learning curve, inlined
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    # 2 prompts (trigger / no trigger) x (baseline + checkpoints 2 and 4)
    assert sorted(imgs) == sorted(["baseline", "step 2", "step 4"] * 2)
    assert not re.search(r'(src|href)="(http|file:|/)', page)  # nothing external
    assert "with trigger" in page and "without trigger" in page
    assert "trigger_word: sks" in page  # the config


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,1400",
           f"--screenshot={shot}", report.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the curve: pixels of its first series colour (#1f77b4)
    curve = (np.abs(px - np.array([31, 119, 180])).sum(-1) < 40).sum()
    assert curve > 100, curve
    # the validation thumbnails: 6 images of 192x192 are far more saturated pixels than text and lines
    sat = px.max(-1) - px.min(-1)
    assert (sat > 40).sum() > 6 * 192 * 192 * 0.3, (sat > 40).sum()


def test_every_output_file_gets_the_users_umask(report):
    """report.html, the curve and the PNGs (written through the atomic writer) have the same mode as
    the safetensors and JSON files: what the umask leaves of 0666, not a private 0600."""
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    modes = {f.relative_to(report.parent).as_posix(): stat.S_IMODE(f.stat().st_mode)
             for f in report.parent.rglob("*") if f.is_file()}
    assert {"report.html", "learning_curve.svg", "baseline/prompt_0_64x64.png", "lora_final.safetensors"} <= set(modes)
    assert {f: m for f, m in modes.items() if m != 0o666 & ~mask} == {}


def test_atomic_writes_follow_the_umask(tmp_path):
    import os
    import stat

    from mflux2.training.outputs import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_report_shows_images_before_curve_and_timing(report):
    page = report.read_text()
    assert page.index("Validation images") < page.index("Learning curve") < page.index('<table id="timing"')


def test_a_series_of_one_point_is_still_drawn():
    from mflux2.training.outputs import learning_curve_svg

    svg = learning_curve_svg({"loss (main)": ([1, 2, 3], [1.0, 0.9, 0.8]), "DOP preservation": ([3], [2e-5])})
    assert svg.count("<circle") == 1  # the DOP point; the main loss has a line


def test_report_groups_the_prompts_and_shows_each_images_change_from_the_baseline(report):
    from mflux2.training.config_loading import load_config
    from mflux2.training.report import pixel_change
    from mflux2.training.validation import prompt_group

    out = report.parent
    page = report.read_text()
    prompts = json.loads((out / "progression" / "prompts.json").read_text())
    # "sks, a photo of a thing" / "a photo of a thing": the class word is "thing"
    assert [p["group"] for p in prompts] == ["trigger", "class"]
    assert page.index('id="group-trigger"') < page.index('id="group-class"') and 'id="group-unrelated"' not in page
    # the headings say what training does to each group (not that its images stay put: Δ shows they move)
    heads = dict(re.findall(r'id="group-(\w+)">[^<]*<span class="tag">\(([^)]*\([^)]*\)[^)]*|[^)]*)\)</span>', page))
    assert heads["class"].startswith("DOP (when on) trains these toward the baseline; Δ is how far they still moved")
    assert "should stay" not in page
    from mflux2.training.report import GROUPS

    assert dict((g, h) for g, _, h in GROUPS)["unrelated"].startswith("nothing in training holds these to the baseline")
    cfg = load_config(out.parent / "cfg.yaml")
    assert prompt_group("a photo of a dog", False, cfg) == "unrelated"
    shown = re.findall(r"<h4>([^<]+) <span.*?</h4>(.*?)</section>", page, re.S)
    assert [p for p, _ in shown] == [p["prompt"] for p in prompts]
    for p, (_, strip) in zip(prompts, shown):  # each checkpoint image captioned with its measured change
        name = f"prompt_{p['index']}_64x64.png"
        want = [f"step {s} · Δ {pixel_change(out / 'baseline' / name, out / f'checkpoint_{s:06d}' / name):.1f}" for s in (2, 4)]
        assert re.findall(r"step \d+ · Δ \d+\.\d", strip) == want
