"""A vision-language model in the loop, on the tiny Qwen3.5 of tests/tiny_vlm.py (the
default VLM's layout; its head answers fixed replies): mflux2-caption, dataset.auto_caption and
validation.vlm_scoring in a 4-step training (baseline, checkpoints and the final LoRA scored,
best_checkpoint/, metrics, report), resume and early stop on the score, the dry run's VLM phases,
the Swift trainer's reply parsing, reference picking and stopping rules, and
scripts/vlm_benchmark.py --tiny."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from mflux2 import vlm
from mflux2.captions import main as caption_main
from mflux2.training import memory
from mflux2.training.cli import main as train_cli
from mflux2.training.config_loading import config_from_dict, load_config
from mflux2.training.scoring import early_stop_reason, parse_reply, plan_targets, select_references, status
from mflux2.training.trainer import Trainer
from mflux2.training.validation import validation_items
from tests.tiny_flux2 import build_tiny_klein, make_images
from tests.tiny_vlm import BLEED_REPLY, CAPTION_REPLY, SCORE_REPLY, build_tiny_qwen35

ROOT = Path(__file__).resolve().parents[1]
# what the tiny VLM answers: scene 72, style 64 -> 0.5·72 + 0.5·64 = 68; bleed 10 -> 90; mean 79
COMPOSITE, PRESERVATION, SCORE = 68.0, 90.0, 79.0


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny_qwen35(tmp_path_factory.mktemp("vlm") / "qwen35")


def lines(out: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


# ------------------------------------------------------------------------------------------------
# Captions


def test_caption_cli_writes_missing_captions_keeps_existing_and_resumes(qwen, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=3, size=48, captions=False)
    (data / "img_1.txt").write_text("my own caption\n")
    args = [str(data), "--model", str(qwen), "--trigger", "sks", "--class", "toy", "--quiet"]
    assert caption_main(args) == 0
    assert (data / "img_0.txt").read_text() == f"sks, {CAPTION_REPLY}\n"  # the trigger first, then the VLM's sentence
    assert (data / "img_2.txt").read_text() == f"sks, {CAPTION_REPLY}\n"
    assert (data / "img_1.txt").read_text() == "my own caption\n"
    assert "captions: 2 written, 1 kept (already captioned) of 3 image(s)" in capsys.readouterr().out
    assert caption_main(args) == 0  # done: nothing left
    assert "0 written, 3 kept" in capsys.readouterr().out
    assert caption_main(args + ["--overwrite"]) == 0
    assert "3 written, 0 kept" in capsys.readouterr().out and (data / "img_1.txt").read_text().startswith("sks, a toy")


def test_edit_captions_pair_each_target_with_its_control(qwen, tmp_path, capsys):
    data = make_images(tmp_path / "target", n=2, size=48, captions=False)
    control = tmp_path / "control"
    control.mkdir()
    shutil.copy(data / "img_0.png", control / "img_0.png")  # img_1 has no control image
    assert caption_main([str(data), "--model", str(qwen), "--style", "edit", "--control", str(control), "--quiet"]) == 0
    assert (data / "img_0.txt").read_text() == f"{CAPTION_REPLY}\n" and not (data / "img_1.txt").exists()
    assert "1 failed: img_1.png (no control image with its stem" in capsys.readouterr().out


def test_the_default_vlm_comes_through_the_hub_cache_offline(qwen, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from mflux2.hub import ModelLoadError
    from tests.test_hub import add_to_cache, folder_files

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"mlx-community/Qwen3.5-4B-MLX-4bit is not \(completely\) in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        vlm.resolve("qwen3.5-4b")
    assert vlm.cached_folder(vlm.DEFAULT_VLM) is None
    snapshot = add_to_cache(cache, vlm.DEFAULT_VLM, folder_files(qwen))  # as if downloaded once
    assert vlm.resolve("qwen3.5-4b") == snapshot == vlm.cached_folder(vlm.DEFAULT_VLM)
    data = make_images(tmp_path / "data", n=1, size=32, captions=False)
    assert caption_main([str(data), "--quiet"]) == 0  # the default --model, from the cache
    assert (data / "img_0.txt").read_text() == f"{CAPTION_REPLY}\n"


def test_without_mlx_vlm_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # as if not installed
    with pytest.raises(vlm.VLMError, match=r'pip install -e "\.\[vlm\]"'):
        vlm.require_mlx_vlm()
    data = make_images(tmp_path / "data", n=1, size=32, captions=False)
    assert caption_main([str(data), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[vlm]"' in err


# ------------------------------------------------------------------------------------------------
# The Swift trainer's rules


def test_replies_are_parsed_the_swift_way():
    assert parse_reply('{"scene_score": ' + SCORE_REPLY) == {"scene": 72, "style": 64, "scene_reason": "the same striped toy",
                                                             "style_reason": "similar soft light"}
    got = parse_reply('<think>scene 10?</think>\n{"scene_score": 81, "style_score": 140}<|im_end|>')
    assert (got["scene"], got["style"]) == (81, 100)  # after the thinking block; clamped to 0-100
    got = parse_reply("Scene: 75/100 - same toy. Style score: 60, similar light.")  # the regex fallbacks
    assert (got["scene"], got["style"]) == (75, 60)
    assert parse_reply("I cannot compare these images.") is None  # unscored (the Swift trainer counts 0)
    assert parse_reply('{"bleed_score": ' + BLEED_REPLY, ("bleed",))["bleed"] == 10


def test_numbers_in_thinking_or_reasons_are_not_scores():
    # a reply that ran out of tokens while thinking: an unclosed <think> block holds no answer
    assert parse_reply("<think>The scene score would be 80/100 and the style 70/100, but") is None
    assert parse_reply('{"scene_score": <think>scene 75, style 60', ("scene", "style")) is None
    # the only numbers sit in reason fields (closed, or cut off by max_tokens)
    assert parse_reply('{"scene_score": "n/a", "scene_reason": "scene 85 of 100", "style_score": "n/a", '
                       '"style_reason": "style about 90/100"}') is None
    assert parse_reply('{"bleed_score": ?, "bleed_reason": "bleed 40 out of 100 at most', ("bleed",)) is None
    # a closed thinking block before the answer still parses the answer
    got = parse_reply('<think>scene 10, style 20</think>Scene: 75/100. Style score: 60.')
    assert (got["scene"], got["style"]) == (75, 60)


class RecordingVLM:
    """Stands in for a loaded VLM: records the images of each question and answers by them (a
    reply with scene = the second image's first pixel), so what it was shown decides the score."""

    def __init__(self):
        self.asked = []

    def ask(self, images, prompt, system=None, prefill="", max_tokens=300):
        from PIL import Image

        self.asked.append((list(images), prefill))
        level = Image.open(images[1]).getpixel((0, 0))[0] * 100 // 255
        if prefill.startswith('{"bleed'):
            return prefill + f'{level}, "bleed_reason": "x"}}'
        return prefill + f'{level}, "scene_reason": "x", "style_score": 50, "style_reason": "y"}}'


def test_each_image_is_scored_against_its_reference(tmp_path):
    """The VLM sees [reference, generated image], in that order, for the subject and the bleed
    questions alike; the score comes from the generated image."""
    from PIL import Image

    from mflux2.training.scoring import Target, score_images

    ref = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(ref)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    Image.new("RGB", (8, 8), (51, 0, 0)).save(folder / "prompt_0_64x64.png")  # 51/255 -> 20
    Image.new("RGB", (8, 8), (102, 0, 0)).save(folder / "prompt_1_64x64.png")  # -> 40
    targets = [Target("prompt_0_64x64.png", "sks, a toy", 0, "presence", ref),
               Target("prompt_1_64x64.png", "a toy", 0, "bleed", ref)]
    vlm = RecordingVLM()
    got = score_images(vlm, folder, targets, 0.5, "toy", log=lambda *a: None)
    assert [a[0] for a in vlm.asked] == [[ref, folder / "prompt_0_64x64.png"], [ref, folder / "prompt_1_64x64.png"]]
    assert [(r["kind"], r["score"]) for r in got] == [("presence", 0.5 * 20 + 0.5 * 50), ("bleed", 100.0 - 40)]


def test_early_stop_and_status_follow_the_swift_trainer():
    # its docs/examples/vlm-scoring run: 14, 51, 61, 42 after the baseline; degradation_threshold 15
    scores = [0.0, 14.0, 51.0, 61.0]
    assert early_stop_reason(scores, 3, 3.0, 15.0) is None and status(scores, 3.0) == "LEARNING"
    assert "dropped 19 below its peak 61" in early_stop_reason(scores + [42.0], 3, 3.0, 15.0)
    assert status(scores + [42.0], 3.0) == "DEGRADING" and status(scores + [62.0], 3.0) == "PLATEAU"
    assert "within early_stopping_min_delta 3" in early_stop_reason([40.0, 50.0, 51.0, 52.0], 3, 3.0, 15.0)
    assert early_stop_reason([40.0, 50.0, 51.0, 52.0], 4, 3.0, 15.0) is None


def test_references_and_scored_images_follow_the_swift_rules(tmp_path, capsys):
    images = [tmp_path / f"{i:02d}.png" for i in range(10)]
    assert [p.name for p in select_references([], images, 3)] == ["00.png", "03.png", "06.png"]  # evenly spaced
    images[5].write_bytes(b"x")
    assert select_references([str(images[5]), str(tmp_path / "gone.png")], images, 3) == [images[5]]
    refs = images[:2]
    base = {"dataset": {"path": "d", "trigger_word": "sks"},
            "validation": {"prompts": [{"prompt": "a toy on a beach"}, {"prompt": "a toy in a garden"},
                                       {"prompt": "a cat on a couch", "apply_trigger": False}]}}
    cfg = config_from_dict(base)
    targets, how = plan_targets(cfg, validation_items(cfg), refs)
    assert [(t.prompt, t.kind, t.reference.name) for t in targets] == [  # prompt i against reference i mod 2
        ("sks, a toy on a beach", "presence", "00.png"), ("sks, a toy in a garden", "presence", "01.png")]
    cfg = config_from_dict({**base, "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "toy"}})
    targets, how = plan_targets(cfg, validation_items(cfg), refs)
    assert [(t.prompt, t.kind) for t in targets][2:] == [  # with DOP: the no-trigger images, for bleed
        ("a toy on a beach", "bleed"), ("a toy in a garden", "bleed"), ("a cat on a couch", "bleed")]
    marked = json.loads(json.dumps(base))
    marked["validation"]["prompts"][2]["is_vlm_generated"] = True  # then exactly the marked prompts
    cfg = config_from_dict(marked)
    targets, _ = plan_targets(cfg, validation_items(cfg), refs)
    assert [(t.prompt, t.kind, t.reference.name) for t in targets] == [("a cat on a couch", "presence", "00.png")]


# ------------------------------------------------------------------------------------------------
# In a training run


def write_config(tmp_path: Path, model: Path, data: Path, qwen: Path, **scoring) -> Path:
    cfg = {
        "model": {"path": str(model), "quantization": "bf16", "transformer_quantization": "bf16"},
        "lora": {"rank": 4, "target_layers": "attention"},
        "dataset": {"path": str(data), "trigger_word": "sks", "auto_caption": True, "caption_model": str(qwen)},
        "training": {"max_steps": 4, "learning_rate": 1e-3, "log_every_n_steps": 1, "seed": 3},
        "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "thing"},
        "memory": {"bucketing": {"resolutions": [64]}},
        "checkpoints": {"output": str(tmp_path / "out"), "save_every": 2, "keep_last": 1},
        "validation": {"steps": 2, "prompts": [{"prompt": "a photo of a thing", "sizes": [64]}],
                       "vlm_scoring": {"enabled": True, "model": str(qwen), **scoring}},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scoring_in_a_4_step_toy_training_keeps_the_best_checkpoint(qwen, tmp_path):
    model = build_tiny_klein(tmp_path / "model")
    data = make_images(tmp_path / "data", n=3, size=64, captions=False)
    (data / "img_0.txt").write_text("a photo of sks number 0")
    path = write_config(tmp_path, model, data, qwen)
    t = Trainer(load_config(path), log=lambda *a: None)
    t.run()
    out = tmp_path / "out"

    # dataset.auto_caption: the two uncaptioned images were captioned before the scan, the third kept
    assert (data / "img_1.txt").read_text() == f"sks, {CAPTION_REPLY}\n" and (data / "img_0.txt").read_text() == "a photo of sks number 0"
    assert sorted(s.caption for s in t.samples) == sorted(["a photo of sks number 0"] + [f"sks, {CAPTION_REPLY}"] * 2)

    # the baseline, the checkpoint at 2 and the final LoRA (step 4) scored, into metrics.jsonl
    recs = lines(out, "vlm_score")
    assert [r["step"] for r in recs] == [0, 2, 4]
    for r in recs:
        assert (r["vlm_score"], r["vlm_composite"], r["vlm_preservation"]) == (SCORE, COMPOSITE, PRESERVATION)
        assert (r["vlm_scene"], r["vlm_style"], r["vlm_scored"]) == (72, 64, 2)
    assert recs[1]["vlm_improvement"] == 0.0 and recs[2]["vlm_status"] == "PLATEAU"
    detail = json.loads((out / "checkpoint_000004" / "vlm_scores.json").read_text())
    assert [(i["kind"], i["prompt"], i["reference"]) for i in detail["images"]] == [
        ("presence", "sks, a photo of a thing", "img_0.png"), ("bleed", "a photo of a thing", "img_0.png")]

    # best_checkpoint/: the last of the equal scores (>=, as the Swift trainer); keep_last pruned step 2 only
    best = out / "best_checkpoint"
    assert sorted(p.name for p in best.iterdir()) == ["best_info.json", "lora.safetensors", "prompt_0_64x64.png",
                                                       "prompt_1_64x64.png", "vlm_scores.json"]
    info = json.loads((best / "best_info.json").read_text())
    assert (info["step"], info["composite_score"], info["source_checkpoint"]) == (4, SCORE, "checkpoint_000004")
    assert (best / "lora.safetensors").read_bytes() == (out / "checkpoint_000004" / "lora.safetensors").read_bytes()
    assert not (out / "checkpoint_000002").exists()

    report = (out / "report.html").read_text()
    assert 'id="vlm-scores"' in report and "VLM 68 · scene 72 · style 64" in report and "VLM 90 · bleed 10" in report
    assert "best checkpoint (VLM)</th><td>step 4, score 79.0" in report
    phases = {r["phase"] for r in lines(out, "phase")}
    assert {"captions (VLM)", "VLM scoring (load, score, free)"} <= phases

    # resumed with a better step-4 score on record: step 6 scores 79, 16 below that peak of 95 —
    # degradation (threshold 15) stops the run there; best_checkpoint/ keeps step 4 although
    # keep_last: 1 has pruned its checkpoint folder
    hist = json.loads((out / "vlm_scores.json").read_text())
    hist["history"][-1]["score"] = 95.0
    (out / "vlm_scores.json").write_text(json.dumps(hist))
    resumed = write_config(tmp_path, model, data, qwen, early_stopping=True)
    t = Trainer(load_config(resumed, {"training.max_steps": 10}), log=lambda *a: None)
    t.run()
    assert t.result["reason"] == "early-stopped" and t.result["step"] == 6
    assert [r["step"] for r in lines(out, "vlm_score")] == [0, 2, 4, 6]  # step 6 once: the stop's checkpoint is the final one
    assert not (out / "checkpoint_000004").exists() and (out / "checkpoint_000006").is_dir()
    assert json.loads((best / "best_info.json").read_text())["step"] == 4


def test_dry_run_counts_the_vlm_phases(qwen, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "star"
    shutil.copytree(ROOT / "data" / "toy" / "star", data)
    for txt in sorted(data.glob("*.txt"))[:2]:
        txt.unlink()
    sets = {"dataset.path": str(data), "dataset.auto_caption": "true", "dataset.caption_model": str(qwen),
            "validation.vlm_scoring.enabled": "true", "validation.vlm_scoring.model": str(qwen)}
    argv = ["configs/quickstart.yaml", "--output", str(tmp_path / "out"), "--dry-run"]
    assert train_cli([*argv, *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]) == 0
    out = capsys.readouterr().out
    gb = vlm.weights_bytes(qwen) / 1e9
    assert "captions (dataset.auto_caption): 2 image(s) without a caption" in out
    assert f"captions: VLM {qwen}: local ({gb:.2f} GB)" in out
    assert "scoring (validation.vlm_scoring): 5 image(s) a scoring (2 for the subject, 3 for bleed)" in out
    cap = next(ln for ln in out.splitlines() if ln.strip().startswith("VLM captions"))
    assert f"{memory.vlm_phase_gb(gb):6.2f} GB ok" in cap  # the VLM alone
    step = float(next(ln for ln in out.splitlines() if ln.strip().startswith("training step")).split()[2])
    score = next(ln for ln in out.splitlines() if ln.strip().startswith("VLM scoring"))
    assert "training model + VLM" in score and float(score.split()[2]) > gb + memory.VLM_WORKING_GB
    assert step > 0 and not (tmp_path / "out").exists()


def test_vlm_benchmark_tiny_prints_its_figures(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("vlm_benchmark", ROOT / "scripts" / "vlm_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--images", "2", "--size", "96", "--val-size", "64", "--work", str(tmp_path)]) == 0
    r = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert (r["model"], r["captions"], r["scored_images"], r["unscored"]) == ("tiny", 2, 4, 0)
    assert r["caption_s"] > 0 and r["score_s"] >= r["score_load_s"] > 0
    assert r["score_peak_gb"] > 0 and r["weights_gb"] > 0 and r["device"].startswith("Device(")
