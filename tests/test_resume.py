"""Resuming from a damaged output, a moved model folder or another number of machines, and
training a folder converted by scripts/convert.py at its stored precision (tiny model, CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from mflux2.training.cli import main as train_cli
from mflux2.training.config import config_hash, resume_signature
from mflux2.training.config_loading import load_config
from mflux2.training.outputs import checkpoint_dirs, checkpoint_problem
from mflux2.training.trainer import Trainer, TrainingError
from tests.test_trainer import metrics, tiny, write_config  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"validation": {"prompts": []}}


def run(path: Path, lines: list | None = None, world: int | None = None, **kw) -> Trainer:
    t = Trainer(load_config(path), log=(lines.append if lines is not None else lambda *a: None), **kw)
    if world is not None:
        t.world = world  # as if launched on `world` machines (this process is rank 0; all_sum of one is itself)
    t.run()
    return t


def one_line_error(capsys, argv) -> str:
    code = train_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("mflux2-train:")]
    assert len(lines) == 1, err
    return lines[0]


def sub(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def cut(path: Path, keep: float = 0.5) -> None:
    """A file cut short, as by an interrupted copy."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- damaged checkpoints --------------------------------------------------------------------------


def test_damaged_checkpoints_are_skipped_with_one_warning_naming_them(tiny, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 6}, checkpoints={"save_every": 2}, **QUIET)
    run(cfg)
    out = tmp_path / "out"
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 4, 6]
    cut(out / "checkpoint_000006" / "training_state.json")  # the JSONDecodeError of the issue
    cut(out / "checkpoint_000004" / "optimizer_state.safetensors", 0.9)
    (out / "checkpoint_000004" / "lora.safetensors").unlink()
    assert "training_state.json is cut short" in checkpoint_problem(out / "checkpoint_000006")
    assert "optimizer_state.safetensors is cut short" in checkpoint_problem(out / "checkpoint_000004")
    damaged = []
    assert [s for s, _ in checkpoint_dirs(out, damaged)] == [2]  # never resumed from, nor counted by keep_last
    assert [p.name for p, _ in damaged] == ["checkpoint_000004", "checkpoint_000006"]

    # --resume to a damaged one: one line naming it and what is wrong
    msg = one_line_error(capsys, [str(cfg), "--resume", str(out / "checkpoint_000006")])
    assert "checkpoint_000006" in msg and "training_state.json is cut short" in msg and "--no-resume" in msg

    more = write_config(tmp_path, tiny, training={"max_steps": 8}, checkpoints={"save_every": 2}, **QUIET)
    lines = []
    t = run(more, lines)
    warn = [l for l in lines if "skipping damaged" in l]
    assert len(warn) == 1 and warn[0].startswith("warning:"), lines
    assert "checkpoint_000004 (optimizer_state.safetensors is cut short" in warn[0]
    assert "checkpoint_000006 (training_state.json is cut short" in warn[0] and "resuming from checkpoint_000002" in warn[0]
    assert any(l.startswith("resumed from") and l.endswith("checkpoint_000002 at step 2") for l in lines)
    assert t.result["step"] == 8
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 4, 6, 8]  # the damaged ones were written again
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == list(range(1, 9))  # the log reads as one run

    # nothing complete left: a warning, and a fresh start (through the CLI: no internal error)
    for _, p in checkpoint_dirs(out):
        cut(p / "training_state.json")
    (out / "lora_final.safetensors").unlink()
    assert train_cli([str(more)]) == 0
    err = capsys.readouterr().err
    assert "internal error" not in err and [s for s, _ in checkpoint_dirs(out)] == [2, 4, 6, 8]


# ---- the model's identity, not its path -----------------------------------------------------------


def test_a_moved_or_copied_model_folder_resumes(tiny, tmp_path):
    model = tmp_path / "models" / "a"
    shutil.copytree(tiny[0], model)
    cfg = write_config(tmp_path, tiny, model={"path": str(model)}, training={"max_steps": 3}, **QUIET)
    run(cfg)
    out = tmp_path / "out"
    state = json.loads((out / "checkpoint_000003" / "training_state.json").read_text())
    assert {"model.config", "model.weights"} <= set(state["resume_signature"]) and "model.path" not in state["resume_signature"]

    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    os.rename(model, moved)
    lines = []
    t = run(write_config(tmp_path, tiny, model={"path": str(moved)}, training={"max_steps": 5}, **QUIET), lines)
    assert t.result["step"] == 5 and any(l.startswith("resumed from") for l in lines)

    # a copy with new modification times (scp, a copy without -p) is the same model too
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied, copy_function=shutil.copyfile)
    lines = []
    t = run(write_config(tmp_path, tiny, model={"path": str(copied)}, training={"max_steps": 6}, **QUIET), lines)
    assert t.result["step"] == 6 and any(l.startswith("resumed from") and "at step 5" in l for l in lines)

    # a checkpoint written before the identity was recorded still resumes where its model.path is
    ck = out / "checkpoint_000006"
    state = json.loads((ck / "training_state.json").read_text())
    legacy = write_config(tmp_path, tiny, model={"path": str(copied)}, training={"max_steps": 7}, **QUIET)
    state.update(config_hash=config_hash(load_config(legacy)), resume_signature=resume_signature(load_config(legacy)))
    (ck / "training_state.json").write_text(json.dumps(state))
    assert run(legacy).result["step"] == 7


def test_a_different_number_of_machines_resumes_with_a_warning(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 2, "batch_size": 1}, checkpoints={"save_every": 1}, **QUIET)
    run(cfg, world=2)  # two machines: each step draws 2 × 1 images
    state = json.loads((tmp_path / "out" / "checkpoint_000002" / "training_state.json").read_text())
    assert state["world"] == 2 and state["sampler"]["batch_size"] == 2 and state["sampler"]["position"] == 2

    lines = []
    t = run(write_config(tmp_path, tiny, training={"max_steps": 4, "batch_size": 1}, checkpoints={"save_every": 1}, **QUIET), lines)
    warn = [l for l in lines if l.startswith("warning:") and "machine" in l]
    assert len(warn) == 1 and warn[0].startswith("warning: checkpoint_000002 was written by a run on 2 machine(s), this one runs on 1")
    assert "data order" in warn[0]
    assert t.result["step"] == 4 and any(l.startswith("resumed from") for l in lines)
    st = json.loads((tmp_path / "out" / "checkpoint_000003" / "training_state.json").read_text())
    # 3 images, 2 per step: the two steps on two machines were one epoch (the last batch filled up); the
    # one-machine run goes on at the same share of its epoch (its end), so step 3 is epoch 1's first batch
    assert st["world"] == 1 and {k: st["sampler"][k] for k in ("batch_size", "epoch", "position")} == \
        {"batch_size": 1, "epoch": 1, "position": 1}

    # and back to two machines
    lines = []
    t = run(write_config(tmp_path, tiny, training={"max_steps": 5, "batch_size": 1}, checkpoints={"save_every": 1}, **QUIET), lines,
            world=2)
    assert t.result["step"] == 5 and any("written by a run on 1 machine(s), this one runs on 2" in l for l in lines)


# ---- a folder converted by scripts/convert.py -----------------------------------------------------


@pytest.fixture(scope="module")
def converted_int8(tiny, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("mflux2_convert", ROOT / "scripts" / "convert.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    out = conv.convert(str(tiny[0]), tmp_path_factory.mktemp("conv") / "int8", quantize="int8", progress=False)
    assert json.loads((out / "mflux2.json").read_text())["transformer"]["quantization"]["name"] == "int8"
    return out


def test_a_converted_int8_folder_trains_logs_and_estimates_int8(tiny, converted_int8, tmp_path, capsys):
    lines = []
    cfg = write_config(tmp_path, tiny, model={"path": str(converted_int8), "transformer_quantization": "auto"},
                       training={"max_steps": 2}, **QUIET)
    t = run(cfg, lines)
    assert t.result["step"] == 2 and t.transformer_quantization == "int8"
    assert any(l.startswith("transformer auto: int8 (as stored in the converted folder") for l in lines), [l for l in lines if "auto" in l or "plan" in l]
    assert t.plan.transformer_quantization == "int8" and "int8" in t.plan.phase("training step").how
    assert t.model.quantization == "int8"  # what trained is what was logged and estimated
    assert json.loads((tmp_path / "out" / "checkpoint_000002" / "training_state.json").read_text())["transformer_quantization"] == "int8"
    explicit = write_config(sub(tmp_path, "x"), tiny,
                            model={"path": str(converted_int8), "transformer_quantization": "int8"}, training={"max_steps": 1}, **QUIET)
    assert run(explicit).transformer_quantization == "int8"

    # a precision the folder cannot load: one line, before anything is cached or loaded
    for q, how in (("bf16", "without --quantize"), ("int4", "with --quantize int4")):
        bad = write_config(sub(tmp_path, q), tiny,
                           model={"path": str(converted_int8), "transformer_quantization": q}, **QUIET)
        with pytest.raises(TrainingError) as e:
            run(bad)
        msg = str(e.value)
        assert "\n" not in msg and f"model.transformer_quantization: {q}" in msg and "converted as int8" in msg and how in msg
        assert "set model.transformer_quantization to int8 or auto" in msg
        assert not (tmp_path / q / "out" / ".latent_cache").exists()
        assert f"model.transformer_quantization: {q}" in one_line_error(capsys, [str(bad)])

    # the text encoder (converted without quantisation) loads as stored: the default int8 is not forced on it
    lines = []
    default_te = write_config(sub(tmp_path, "te"), tiny,
                              model={"path": str(converted_int8), "transformer_quantization": "auto"}, training={"max_steps": 1}, **QUIET)
    raw = yaml.safe_load(default_te.read_text())
    del raw["model"]["quantization"]  # the default (int8)
    default_te.write_text(yaml.safe_dump(raw))
    assert run(default_te, lines).result["step"] == 1
    assert "text encoder: bf16 (as stored)" in lines
    raw["model"]["quantization"] = "int4"
    default_te.write_text(yaml.safe_dump(raw))
    msg = one_line_error(capsys, [str(default_te)])
    assert "model.quantization: int4" in msg and "converted as bf16" in msg and "with --text-encoder-quantize int4" in msg


# ---- several datasets --------------------------------------------------------------------------------


def test_a_resumed_run_with_datasets_draws_the_same_samples_as_an_uninterrupted_one(tiny, tmp_path):
    """Repeats, a reg set, masks, loss weights and shuffled captions (a variant drawn per step from the
    checkpointed RNG): stopped at step 3 and resumed, the run draws the same samples and captions and
    ends with the same LoRA as one that was never interrupted."""
    import mlx.core as mx
    import numpy as np

    from tests.test_datasets import datasets_config, drawn_rows

    a = datasets_config(tmp_path, tiny, out="a", training={"max_steps": 8}, checkpoints={"save_every": 3})
    run(a)
    b = datasets_config(tmp_path, tiny, out="b", training={"max_steps": 8}, checkpoints={"save_every": 3})

    def stop_at_3(trainer, step):
        if step == 3:
            (trainer.output / ".stop").write_text("")

    first = run(b, on_step=stop_at_3)
    assert first.result["step"] == 3
    second = run(b)
    assert second.result["step"] == 8
    ra, rb = drawn_rows(tmp_path / "a"), drawn_rows(tmp_path / "b")
    assert [r["samples"] for r in rb] == [r["samples"] for r in ra] and len(ra) == 8
    np.testing.assert_allclose([r["main_loss"] for r in rb], [r["main_loss"] for r in ra], rtol=1e-5)
    wa, wb = mx.load(str(tmp_path / "a" / "lora_final.safetensors")), mx.load(str(tmp_path / "b" / "lora_final.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), rtol=1e-5, atol=1e-7)


def test_an_optimiser_state_of_the_other_flat_layout_resumes_exactly(tiny, tmp_path):
    """A checkpoint written with the LoRA factors stored as they are in the flat parameters (an
    earlier mflux2; MFLUX2_FLAT_TRANSPOSED=0) resumes under today's transposed layout as if the run
    had never stopped: its optimiser state is re-laid out parameter by parameter, not refused. A
    conversion that skipped the transpose, or moved the wrong slices, changes the moments and so the
    final LoRA (Adam's second moment enters every update)."""
    import mlx.core as mx
    import numpy as np

    from mflux2.ops.switches import using

    a = write_config(sub(tmp_path, "a"), tiny, training={"max_steps": 6, "warmup_steps": 2, "learning_rate": 1e-3,
                                                         "seed": 7}, checkpoints={"output": str(tmp_path / "a" / "out"),
                                                                                  "save_every": 6}, **QUIET)
    run(a)
    b = write_config(sub(tmp_path, "b"), tiny, training={"max_steps": 3, "warmup_steps": 2, "learning_rate": 1e-3,
                                                         "seed": 7}, checkpoints={"output": str(tmp_path / "b" / "out"),
                                                                                  "save_every": 3}, **QUIET)
    with using(flat_transposed=False):
        run(b)
    ck = tmp_path / "b" / "out" / "checkpoint_000003"
    saved = mx.load(str(ck / "optimizer_state.safetensors"))
    assert not any(k.split(".")[1].endswith("_t") for k in saved if k.startswith("optimizer.") and k.count(".") > 1)
    b = write_config(tmp_path / "b", tiny, training={"max_steps": 6, "warmup_steps": 2, "learning_rate": 1e-3,
                                                     "seed": 7}, checkpoints={"output": str(tmp_path / "b" / "out"),
                                                                              "save_every": 3}, **QUIET)
    resumed = run(b)
    assert resumed.result["step"] == 6
    wa = mx.load(str(tmp_path / "a" / "out" / "lora_final.safetensors"))
    wb = mx.load(str(tmp_path / "b" / "out" / "lora_final.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), rtol=1e-5, atol=1e-7)


def test_an_optimiser_state_of_no_known_layout_is_refused_in_one_line_naming_init_from(tiny, tmp_path, capsys):
    """An optimiser state that fits neither flat layout (here a group renamed and cut short) is
    refused by name, never misread, and the message says how to carry the LoRA on."""
    import mlx.core as mx

    cfg = write_config(tmp_path, tiny, training={"max_steps": 2}, checkpoints={"save_every": 2}, **QUIET)
    run(cfg)
    ck = tmp_path / "out" / "checkpoint_000002"
    f = ck / "optimizer_state.safetensors"
    arrays = mx.load(str(f))
    renamed = {(k.replace("_t.", ".") if k.startswith("optimizer.") else k): (v[:-1] if k.startswith("optimizer.") and v.ndim == 1 and v.size > 1 else v)
               for k, v in arrays.items()}
    assert renamed.keys() != arrays.keys()  # the layout the test stands for is the one in use
    mx.save_safetensors(str(f), renamed)
    write_config(tmp_path, tiny, training={"max_steps": 4}, checkpoints={"save_every": 2}, **QUIET)
    msg = one_line_error(capsys, [str(cfg), "--resume", str(ck)])
    assert "optimizer_state.safetensors: no optimizer." in msg and f"lora.init_from: {ck / 'lora.safetensors'}" in msg
