"""The baseline images as a keyed cache (mflux2.training.baseline): a run that starts over with the
same validation settings copies them from `.baseline_cache/` instead of rendering; a changed prompt or
seed renders them anew (an output folder never keeps a baseline of other settings); the progression
strips are made either way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from PIL import Image

from tests.test_trainer import run, tiny, write_config  # noqa: F401 - tiny: the module's fixture


def _phases(out: Path) -> set[str]:
    """The phases of the last run in `out` (metrics.jsonl keeps an earlier run's phase records)."""
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "phase" in r][-1]["run"]
    return {r["phase"] for r in recs if "phase" in r and r["run"] == last}


def _set_prompts(cfg: Path, prompts: list[dict]) -> None:
    c = yaml.safe_load(cfg.read_text())
    c["validation"]["prompts"] = prompts
    cfg.write_text(yaml.safe_dump(c))


def test_baseline_is_reused_when_the_settings_match_and_rendered_when_a_prompt_or_seed_changes(tiny, tmp_path):
    prompt = {"prompt": "a photo of a thing", "sizes": [64], "seed": 3}
    cfg = write_config(tmp_path, tiny, training={"max_steps": 1}, loss={"diff_output_preservation": False},
                       checkpoints={"save_every": 0}, validation={"steps": 2, "prompts": [prompt]})
    out = tmp_path / "out"
    names = ["prompt_0_64x64.png", "prompt_1_64x64.png"]  # with the trigger, without

    run(cfg)
    assert "baseline validation" in _phases(out)
    first = {n: (out / "baseline" / n).read_bytes() for n in names}
    entries = [p for p in (out / ".baseline_cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == sorted(names + ["key.json"])

    # starting over with the same settings: copied from the cache, not rendered; the strip still made
    shutil.rmtree(out / "progression")
    run(cfg, resume=False)
    assert "baseline (from the cache)" in _phases(out) and "baseline validation" not in _phases(out)
    assert {n: (out / "baseline" / n).read_bytes() for n in names} == first
    strip = out / "progression" / names[0]
    assert Image.open(strip).size == (2 * 64, 64 + 18)  # baseline, then the final checkpoint

    # another seed: rendered anew (before, the old baseline/ was kept), a second cache entry
    _set_prompts(cfg, [{**prompt, "seed": 4}])
    run(cfg, resume=False)
    assert "baseline validation" in _phases(out) and "baseline (from the cache)" not in _phases(out)
    reseeded = {n: (out / "baseline" / n).read_bytes() for n in names}
    assert all(reseeded[n] != first[n] for n in names)
    assert len([p for p in (out / ".baseline_cache").iterdir() if p.is_dir()]) == 2

    # another prompt: rendered anew too; its no-trigger twin shows the new text
    _set_prompts(cfg, [{**prompt, "prompt": "a photo of a red thing"}])
    run(cfg, resume=False)
    assert "baseline validation" in _phases(out)
    listing = json.loads((out / "progression" / "prompts.json").read_text())
    assert listing[1]["prompt"] == "a photo of a red thing"
    assert (out / "baseline" / names[1]).read_bytes() != first[names[1]]

    # back to the first settings: the first entry again, byte for byte
    _set_prompts(cfg, [prompt])
    run(cfg, resume=False)
    assert "baseline (from the cache)" in _phases(out)
    assert {n: (out / "baseline" / n).read_bytes() for n in names} == first


def test_an_incomplete_cache_entry_is_rendered_again(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 1}, loss={"diff_output_preservation": False},
                       checkpoints={"save_every": 0})
    out = tmp_path / "out"
    run(cfg)
    entry = next(p for p in (out / ".baseline_cache").iterdir() if p.is_dir())
    (entry / "prompt_0_64x64.png").unlink()
    run(cfg, resume=False)
    assert "baseline validation" in _phases(out)
    assert (entry / "prompt_0_64x64.png").is_file() and (out / "baseline" / "prompt_0_64x64.png").is_file()
