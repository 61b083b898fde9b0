"""Everything the trainer writes: atomic files, checkpoints, metrics, the learning curve.

A checkpoint is complete when its folder exists under its final name: it is assembled in
`checkpoint_NNNNNN.partial/` and renamed in one `os.replace`, so a crash at any moment leaves either
the previous complete checkpoints or a `.partial` folder that is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")


class TrainingError(RuntimeError):
    """A run cannot start or continue. One actionable line."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # (reading it means setting it: put it straight back)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Write through `write(tmp_path)` into a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the target's suffix: mx.save_safetensors appends ".safetensors" otherwise.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make this file private, unlike the others
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


CHECKPOINT_FILES = ("training_state.json", "optimizer_state.safetensors", "lora.safetensors")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (missing, cut short, not safetensors), or None. Reads the
    header only: the file must be as long as its header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except FileNotFoundError:
        return f"no {path.name}"
    except (OSError, ValueError) as e:
        return f"{path.name} cannot be read ({e.__class__.__name__})"
    if not isinstance(header, dict):
        return f"{path.name} is cut short or not a safetensors file ({size} bytes)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path.name} has a malformed header"
    if size < 8 + n + end:
        return f"{path.name} is cut short ({size} of {8 + n + end} bytes)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing or cut short, e.g. by an
    interrupted copy), or None when it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state = folder / "training_state.json"
    try:
        tstate = json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no training_state.json"
    except (OSError, ValueError) as e:
        return f"training_state.json is cut short or not valid JSON ({e.__class__.__name__})"
    if not isinstance(tstate, dict) or not {"step", "sampler", "rng"} <= set(tstate):
        return "training_state.json lacks step, sampler or rng"
    for name in CHECKPOINT_FILES[1:]:
        problem = _safetensors_problem(folder / name)
        if problem:
            return problem
    return None


def checkpoint_dirs(output: Path, damaged: list | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A `checkpoint_NNNNNN` folder with a file missing or cut
    short is left out (and added to `damaged` as (path, why) when a list is given): never resumed
    from, nor counted by `keep_last`."""
    if not output.is_dir():
        return []
    found = []
    for p in output.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            problem = checkpoint_problem(p)
            if problem is None:
                found.append((int(m.group(1)), p))
            elif damaged is not None:
                damaged.append((p, problem))
    if damaged is not None:
        damaged.sort()
    return sorted(found)


def latest_checkpoint(output: Path, damaged: list | None = None) -> Path | None:
    """The newest complete checkpoint (damaged ones are skipped; see `checkpoint_dirs`)."""
    dirs = checkpoint_dirs(output, damaged)
    return dirs[-1][1] if dirs else None


def commit_checkpoint(partial: Path, final: Path, keep_last: int | None = None) -> None:
    """Publish a fully written `.partial` folder under its final name, then prune old ones."""
    for f in partial.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(partial)
    if final.exists():  # re-saving the same step (e.g. .checkpoint right after a scheduled save)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync_dir(final.parent)
    if keep_last:
        for _, p in checkpoint_dirs(final.parent)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def clean_partials(output: Path) -> list[Path]:
    """Remove leftovers of interrupted checkpoint writes."""
    removed = []
    if output.is_dir():
        for p in output.iterdir():
            if p.is_dir() and (p.name.endswith(".partial") or p.name.endswith(".old")) and p.name.startswith("checkpoint_"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step. Lines after `step` are dropped on resume so
    a resumed run's log reads as if it had never stopped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # only one process of a data-parallel group writes

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        atomic_write_text(self.path, "".join(l + "\n" for l in keep))

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def learning_curve_svg(series: dict[str, tuple[list[int], list[float]]], window: int = 20, title: str = "loss") -> str:
    """A self-contained SVG: one panel per series (the DOP term is orders of magnitude smaller than
    the main loss), each with its raw values (faint) and moving average (solid), sharing the step axis."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    series = {k: [(s, v) for s, v in zip(*sv) if np.isfinite(v)] for k, sv in series.items()}
    series = {k: v for k, v in series.items() if v}
    w, panel_h, pad_l, pad_r, pad_t, gap = 760, 200, 70, 30, 50, 46
    h = pad_t + max(len(series), 1) * (panel_h + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{pad_l}" y="18" font-size="14">{title} (faint: per step, solid: moving average of {window})</text>']
    if not series:
        parts.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">no data yet</text></svg>')
        return "\n".join(parts)
    x0 = min(s for pts in series.values() for s, _ in pts)
    x1 = max(s for pts in series.values() for s, _ in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    sx = lambda s: pad_l + (s - x0) / (x1 - x0) * (w - pad_l - pad_r)  # noqa: E731
    ticks = sorted({int(round(x0 + (x1 - x0) * i / 4)) for i in range(5)})
    for i, (name, pts) in enumerate(series.items()):
        top = pad_t + i * (panel_h + gap)
        vals = np.array([v for _, v in pts])
        lo, hi = (1, 99) if len(vals) >= 50 else (0, 100)  # clip outliers only when there are enough points
        y0, y1 = float(np.percentile(vals, lo)), float(np.percentile(vals, hi))
        if y1 <= y0:
            y0, y1 = y0 - max(abs(y0), 1e-8) * 0.5, y1 + max(abs(y1), 1e-8) * 0.5
        sy = lambda v: top + (1 - (min(max(v, y0), y1) - y0) / (y1 - y0)) * panel_h  # noqa: E731
        c = colours[i % len(colours)]
        parts.append(f'<text x="{pad_l}" y="{top - 6}" fill="{c}" font-weight="bold">{name}</text>')
        parts.append(f'<rect x="{pad_l}" y="{top}" width="{w - pad_l - pad_r}" height="{panel_h}" fill="none" stroke="#999"/>')
        for j in range(5):
            v = y0 + (y1 - y0) * j / 4
            parts.append(f'<text x="{pad_l - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
            parts.append(f'<line x1="{pad_l}" x2="{w - pad_r}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>')
        for s in ticks:
            parts.append(f'<text x="{sx(s):.1f}" y="{top + panel_h + 15}" text-anchor="middle">{s}</text>')
        raw = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        avg = moving_average([v for _, v in pts], window)
        smooth = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for (s, _), v in zip(pts, avg))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-opacity="0.3" points="{raw}"/>')
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{smooth}"/>')
        if len(pts) < 2:  # a polyline of one point draws nothing
            parts += [f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="{c}"/>' for s, v in pts]
    parts.append(f'<text x="{(w - pad_r + pad_l) / 2}" y="{h - 6}" text-anchor="middle">step</text>')
    parts.append("</svg>")
    return "\n".join(parts)
