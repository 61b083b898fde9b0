"""DOP that also keeps prompts other than the class prompt (loss.diff_output_preservation_prompts).

The trainer rotates the extra prompts with the class prompts through DOP's preservation half of the batch,
as a pure function of the step (a resumed run rotates as an uninterrupted one); on the toy model the
option keeps unrelated prompts closer to the base model than DOP alone (a cut-down
scripts/preservation_eval.py; the full comparison is in docs/toy-model.md).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mflux2.training import data as data_mod
from mflux2.training.step import TrainStep
from tests.test_trainer import metrics, run, tiny, write_config  # noqa: F401  (fixture)


def test_rotation_is_a_pure_function_of_the_step():
    samples = [data_mod.Sample(Path("a.png"), "sks, a", "cat, a", (64, 64), "h", (64, 64))] * 2
    rot = [data_mod.preservation_prompts(samples, step, 2, ["", "a dog"])[0] for step in range(0, 18, 2)]
    assert rot == ["cat, a", "", "cat, a", "a dog"] * 2 + ["cat, a"]  # the class prompt every other DOP step
    every3 = [data_mod.preservation_prompts(samples, step, 3, ["a dog"])[0] for step in (0, 3, 6, 9)]
    assert every3 == ["cat, a", "a dog", "cat, a", "a dog"]
    assert data_mod.preservation_prompts(samples, 6, 3, []) == ["cat, a"] * 2  # without the option: DOP as before


def test_the_trainer_feeds_the_rotation_and_a_resumed_run_continues_it(tiny, tmp_path, monkeypatch):
    extra = ["", "a photo of a dog"]
    seen = []
    call = TrainStep.__call__

    def spy(self, batch, key, dop=False):
        seen.append(batch.dop_embeds[0] if dop else None)  # batch size 1
        return call(self, batch, key, dop)

    def stop_after_3(trainer, step):
        if step == 3:
            (trainer.output / ".stop").write_text("")

    monkeypatch.setattr(TrainStep, "__call__", spy)
    cfg = write_config(tmp_path, tiny, training={"max_steps": 8}, loss={"diff_output_preservation_prompts": extra},
                       validation={"prompts": []})
    first = run(cfg, on_step=stop_after_3)  # 8 steps, DOP every 2 (steps 0, 2, 4, 6); stopped after 3
    assert first.result["step"] == 3
    second = run(cfg)  # resumed from checkpoint_000003: a fresh process would know nothing else
    assert second.result["step"] == 8 and [e is not None for e in seen] == [True, False] * 4

    def same(x, prompt):
        return bool(mx.array_equal(x, second.cond.embeds(prompt)))

    # DOP steps 0, 2, 4, 6: the class prompt every other time, the extra prompts in turn between
    # (steps 4 and 6 after the resume)
    assert any(same(seen[0], s.dop_caption) for s in second.samples) and any(same(seen[4], s.dop_caption) for s in second.samples)
    assert same(seen[2], "") and not same(seen[2], extra[1])
    assert same(seen[6], extra[1])
    # the preservation losses of those steps were logged as DOP losses
    assert [m["dop_loss"] is not None for m in metrics(tmp_path / "out") if "loss" in m] == [True, False] * 4


# ---- the option keeps unrelated prompts closer to the base model (the toy model) ---------------------
# A cut-down scripts/preservation_eval.py: the quickstart config for STEPS steps, DOP alone and DOP with
# loss.diff_output_preservation_prompts (the same multiplier, seed and data), prompts of SHORT tokens
# instead of 512 (the toy model's prompts are at most 16 tokens; it was trained mostly on 32), which
# makes a step ~6x cheaper. Drift: the relative change of the guided velocity sampling follows
# (velocity_drift), not of rendered images. Measured, seed 0 / seed 1: unrelated prompts 0.79x / 0.84x DOP's
# change (0.437 / 0.556 and 0.420 / 0.500), trigger prompts 1.01x / 0.93x (the subject is learned as
# with DOP). Shorter runs separate less (100 steps, seed 0: 0.89x).
STEPS, SHORT = 150, 64
MAX_UNRELATED_RATIO = 0.9  # the option off would feed the class prompt every time: exactly 1.0
MIN_TRIGGER_RATIO = 0.85


@pytest.fixture(scope="module")
def drift(tmp_path_factory):
    from mflux2.pipeline import Flux2Pipeline
    from scripts import preservation_eval as pe
    tmp = tmp_path_factory.mktemp("preservation")
    option = pe.train("dop", tmp / "option", STEPS, overrides={"loss.diff_output_preservation_prompts": pe.PRESERVE},
                      text_length=SHORT)
    dop = pe.train("dop", tmp / "dop", STEPS, caches_from=tmp / "option", text_length=SHORT)
    cfg = pe.config()
    pipe = Flux2Pipeline.from_pretrained(pe.MODEL, max_sequence_length=SHORT)
    result = pe.velocity_drift(pipe, {"dop": dop, "option": option}, pe.eval_prompts(cfg), [0.7, 0.9], cfg.validation.guidance)
    print(f"\nguided velocity change after {STEPS} steps: {result}")
    return result


def test_the_extra_prompts_keep_unrelated_prompts_closer_to_the_base_model(drift):
    dop, option = drift["dop"], drift["option"]
    assert option["unrelated"] < MAX_UNRELATED_RATIO * dop["unrelated"], drift
    assert option["trigger"] > MIN_TRIGGER_RATIO * dop["trigger"], drift  # the subject is still learned
