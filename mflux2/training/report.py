"""`report.html`: one self-contained page per run (images and the curve inlined), refreshed at each
checkpoint, so people look at the run instead of reading logs."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mflux2.training.outputs import atomic_write_text, checkpoint_dirs
from mflux2.training.scoring import image_label


def _scored(folder: Path, name: str) -> str:
    """The image's VLM scores (validation.vlm_scoring) as a caption line, if it was scored."""
    label = image_label(folder, name)
    return f"<br>{html.escape(label)}" if label else ""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _timing_table(timing: list[dict]) -> str:
    """Where this run's wall time and memory went, phase by phase (the trainer's PhaseClock)."""
    total = sum(t["seconds"] for t in timing) or 1.0
    timing = sorted(timing, key=lambda t: t["phase"].startswith("other"))  # the remainder last, else run order
    rows = "".join(
        f"<tr><th>{html.escape(t['phase'])}</th><td>{t['seconds']:.2f} s</td><td>{100 * t['seconds'] / total:.1f}%</td>"
        f"<td>{t['peak_gb']:.2f} GB</td></tr>" for t in timing)
    return (f'<table id="timing"><tr><th>phase</th><th>time</th><th>share</th><th>peak memory</th></tr>{rows}'
            f"<tr><th>total</th><td>{total:.2f} s</td><td></td><td>{max(t['peak_gb'] for t in timing):.2f} GB</td></tr></table>")


# The validation prompts in three groups (validation.prompt_group), each with what training does to
# its images: the heading says what the strip shows, so a drift it measures never contradicts it.
GROUPS = (("trigger", "With the trigger word", "the LoRA's subject should appear here"),
          ("class", "The class word without the trigger",
           "DOP (when on) trains these toward the baseline; Δ is how far they still moved"),
          ("unrelated", "Other prompts",
           "nothing in training holds these to the baseline (DOP protects its class prompts only); Δ is the LoRA's drift"))


def _rgb16(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


def pixel_change(a: Path | np.ndarray, b: Path) -> float | None:
    """Mean absolute pixel difference of two images (a path, or `a` already read by _rgb16), 0–255;
    None when their sizes differ."""
    x, y = (_rgb16(a) if isinstance(a, Path) else a), _rgb16(b)
    return float(np.abs(x - y).mean()) if x.shape == y.shape else None


def _validation_rows(output: Path, prompts: list[dict], steps: list) -> str:
    """The validation strips grouped as GROUPS: an editing prompt's prepared references first, then the
    baseline and each checkpoint, captioned with its change from the baseline (and its VLM score); each
    group is headed by its mean change per checkpoint."""
    out = []
    for group, title, should in GROUPS:
        rows, change = [], {}  # change: step -> the group's pixel changes from the baseline
        for p in prompts:
            if p.get("group", "trigger" if p["trigger"] else "unrelated") != group:
                continue
            refs = p.get("references", [])  # editing prompts: the prepared reference images come first
            name = p.get("file") or f"prompt_{p['index']}_{p['size'][0]}x{p['size'][1]}.png"  # (runs from before editing)
            cells = []
            for j, ref in enumerate(refs):
                if (output / "progression" / ref).exists():
                    label = "reference" if len(refs) == 1 else f"reference {j + 1}"
                    cells.append(f"<figure>{_img(output / 'progression' / ref, label)}<figcaption>{label}</figcaption></figure>")
            base = output / "baseline" / name
            base_rgb = _rgb16(base) if base.exists() else None  # read once, compared with every checkpoint
            if base_rgb is not None:
                cells.append(f"<figure>{_img(base, 'baseline')}<figcaption>baseline{_scored(base.parent, name)}</figcaption></figure>")
            for s, d in steps:
                if (d / name).exists():
                    delta = pixel_change(base_rgb, d / name) if base_rgb is not None else None
                    if delta is not None:
                        change.setdefault(s, []).append(delta)
                    note = f" · Δ {delta:.1f}" if delta is not None else ""
                    cells.append(f"<figure>{_img(d / name, f'step {s}')}<figcaption>step {s}{note}{_scored(d, name)}</figcaption></figure>")
            tag = ("with trigger" if p["trigger"] else "without trigger") + (", edit of the reference" if refs else "")
            rows.append(f'<section class="prompt"><h4>{html.escape(p["prompt"])} <span class="tag">{tag}</span></h4>'
                        f'<div class="strip">{"".join(cells)}</div></section>')
        if rows:
            means = ", ".join(f"step {s}: {np.mean(v):.1f}" for s, v in sorted(change.items()))
            head = f"{should}; mean Δ at {means}" if means else should
            out.append(f'<h3 class="group" id="group-{group}">{title} <span class="tag">({html.escape(head)})</span></h3>'
                       + "".join(rows))
    return "".join(out)


def write_report(output: Path, config_yaml: str, summary: dict, timing: list[dict] | None = None) -> Path:
    """Build `<output>/report.html` from what the run has written so far; `timing`: the phases so far."""
    prompts_file = output / "progression" / "prompts.json"
    prompts = json.loads(prompts_file.read_text()) if prompts_file.exists() else []
    curve = output / "learning_curve.svg"
    vlm = output / "vlm_scores.svg"  # validation.vlm_scoring
    steps = [(s, d) for s, d in checkpoint_dirs(output)]
    rows = _validation_rows(output, prompts, steps)

    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mflux2 — {html.escape(output.name)}</title>
<style>
body {{ font-family: -apple-system, system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 28px; }} h3 {{ font-size: 15px; margin: 18px 0 4px; }}
h4 {{ font-size: 14px; margin: 10px 0 6px; }}
.tag {{ font-weight: normal; color: #777; }}
.strip {{ display: flex; gap: 8px; overflow-x: auto; }}
figure {{ margin: 0; text-align: center; }} figure img {{ width: 192px; height: 192px; object-fit: contain;
  image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ font-size: 12px; color: #555; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
pre {{ background: #f6f6f6; padding: 12px; font-size: 12px; overflow-x: auto; }}
#curve svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>mflux2 training report — {html.escape(output.name)}</h1>
<table>{facts}</table>
<h2>Validation images: baseline → checkpoints</h2>
<p class="tag">Δ: the mean absolute pixel change from the baseline image (0–255), same prompt and seed.</p>
{rows or "<p>no validation prompts configured</p>"}
{f'<h2>VLM score per checkpoint</h2><div id="vlm-scores">{vlm.read_text()}</div>' if vlm.exists() else ""}
<h2>Learning curve</h2>
<div id="curve">{curve.read_text() if curve.exists() else "<p>no checkpoint yet</p>"}</div>
<h2>Timing</h2>
{_timing_table(timing) if timing else "<p>-</p>"}
<h2>Config</h2>
<pre>{html.escape(config_yaml)}</pre>
</body></html>
"""
    target = output / "report.html"
    atomic_write_text(target, page)
    return target
