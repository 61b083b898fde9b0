"""The training step's memory machinery: the block-by-block checkpointed backward gives the plain
path's gradients, the update's ordering and the memory-limit calibration. (The custom operations it
runs through: tests/test_ops.py.)"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mflux2.training.step as S
from mflux2.lora import apply_lora, dropout_key
from mflux2.models.transformer import Flux2Transformer, TransformerConfig
from mflux2.training.step import Batch, StepConfig, TrainStep

CFG = TransformerConfig(num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=16,
                        joint_attention_dim=24, in_channels=16, axes_dims_rope=(4, 4, 4, 4))


def tiny_model(seed=0, dropout=0.0, guidance=False):
    mx.random.seed(seed)
    model = Flux2Transformer(TransformerConfig(**{**vars(CFG), "guidance_embeds": guidance}))
    apply_lora(model, rank=4, targets="attention", dropout=dropout)
    # B starts at zero; random B makes every A gradient non-trivial
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def tiny_batch(b=2, n=16, l=8, seed=1):
    mx.random.seed(seed)
    return Batch(latents=mx.random.normal((b, n, 16)), prompt_embeds=mx.random.normal((b, l, 24)),
                 img_ids=mx.random.randint(0, 4, (n, 4)).astype(mx.float32),
                 txt_ids=mx.random.randint(0, 4, (l, 4)).astype(mx.float32), dop_embeds=mx.random.normal((b, l, 24)))


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def assert_same_grads(g0, g1, rtol=1e-6):
    f0, f1 = flat(g0), flat(g1)
    assert f0.keys() == f1.keys() and f0
    for k in f0:
        assert np.abs(f0[k]).max() > 0, k
        np.testing.assert_allclose(f1[k], f0[k], rtol=rtol, atol=rtol * np.abs(f0[k]).max(), err_msg=k)


@pytest.mark.parametrize("dop,batched", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("every", [1, 2])
def test_blockwise_backward_equals_plain_gradients(dop, batched, every):
    model, batch, key = tiny_model(), tiny_batch(), mx.random.key(3)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(dop_batched=batched, memory_limit=None))
    (l0, aux0), g0 = step._grad_fn(dop)(model, batch, key)
    model.set_gradient_checkpointing(every)
    bw = step._blockwise()
    assert [len(s) for s in bw.segments] == ([every] * (5 // every) + ([5 % every] if 5 % every else []))
    (l1, *aux1), g1 = step._blockwise_grads(bw, batch, key, dop)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    assert np.allclose([float(a) for a in aux0], [float(a) for a in aux1], rtol=1e-6)
    assert_same_grads(g0, g1)


@pytest.mark.parametrize("ahead", [0, 2])
def test_blockwise_host_run_ahead_changes_order_not_gradients(ahead, monkeypatch):
    import mflux2.training.step as step_mod

    model, batch, key = tiny_model(), tiny_batch(), mx.random.key(3)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None, blockwise_ahead=ahead))
    (l0, _), g0 = step._grad_fn(False)(model, batch, key)
    model.set_gradient_checkpointing(1)
    bw = step._blockwise()
    assert bw.ahead == ahead
    in_flight = []
    real_push = step_mod._Pipeline.push

    def push(self, arrays):
        real_push(self, arrays)
        in_flight.append(len(self.queue))

    monkeypatch.setattr(step_mod._Pipeline, "push", push)
    (l1, *_), g1 = step._blockwise_grads(bw, batch, key, False)
    assert max(in_flight) == ahead and len(in_flight) == 2 * len(bw.segments) + 1  # fwd, head, bwd
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    assert_same_grads(g0, g1)


def test_blockwise_trains_parameters_outside_the_blocks():
    """Trainable embedders (the prelude) and final layer get their gradients through the VJPs of
    `embed` (fed with every block's cotangents for the shared modulations) and of the head."""
    model, batch, key = tiny_model(guidance=True), tiny_batch(), mx.random.key(4)
    model.img_in.unfreeze()
    model.double_stream_modulation_txt.unfreeze()
    model.final_layer.linear.unfreeze()
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(guidance=3.0, memory_limit=None))
    _, g0 = step._grad_fn(False)(model, batch, key)
    model.set_gradient_checkpointing(2)
    (_, *_), g1 = step._blockwise_grads(step._blockwise(), batch, key, False)
    assert {"img_in.weight", "double_stream_modulation_txt.lin.weight", "final_layer.linear.weight"} <= set(flat(g1))
    assert_same_grads(g0, g1, rtol=1e-5)


def test_blockwise_recompute_draws_the_same_dropout_masks():
    """With LoRA dropout, the checkpointed gradients equal those of one graph over the same
    segments with the same keys: the recomputation reproduced the forward pass's masks."""
    model, batch, key = tiny_model(dropout=0.5), tiny_batch(), mx.random.key(5)
    model.train()
    model.set_gradient_checkpointing(1)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None))
    bw = step._blockwise()
    (loss, *_), g1 = step._blockwise_grads(bw, batch, key, False)

    xt, target, t = step._prep_fn(False)(vars(batch), key)
    keys = S._key_split(mx.random.split(key, 3)[2], len(bw.segments))

    def reference(m):
        state, ctx = m.embed(*step._inputs(xt, batch.prompt_embeds, t, batch))
        for k, seg in enumerate(bw.segments):
            with dropout_key(keys[k]):
                for i in seg:
                    state = m.block(i, state, ctx)
        return step._head_main(m.head(state, ctx, xt.shape[1]), target, t)[0]

    l0, g0 = nn.value_and_grad(model, reference)(model)
    assert float(l0) == pytest.approx(float(loss), rel=1e-6)
    assert_same_grads(g0, g1)
    # and the masks are real: another key gives other gradients
    keys = S._key_split(mx.random.key(99), len(bw.segments))
    _, g2 = nn.value_and_grad(model, reference)(model)
    assert not np.allclose(flat(g2)["single_blocks.0.linear1.lora_A"], flat(g1)["single_blocks.0.linear1.lora_A"])


def test_checkpointed_step_updates_like_the_plain_step():
    batch, key = tiny_batch(), mx.random.key(6)
    params = []
    for every in (0, 1):
        model = tiny_model()
        model.set_gradient_checkpointing(every)
        step = TrainStep(model, optim.AdamW(1e-2), StepConfig(max_grad_norm=1e-3, memory_limit=None))
        out = step(batch, key)
        mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
        assert bool(out["finite"]) and float(out["grad_norm"]) > 1e-3  # clipping active
        params.append(flat(model.trainable_parameters()))
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_global_norm_and_clipping_match_mlx():
    grads = {"a": [mx.random.normal((3, 4)), mx.random.normal((5,))], "b": mx.random.normal((2, 2)) * 10}
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert float(S.global_norm(grads)) == pytest.approx(float(norm), rel=1e-6)
    model = tiny_model()
    step = TrainStep(model, optim.SGD(learning_rate=1.0), StepConfig(max_grad_norm=1.0, compile=False, memory_limit=None))
    w0 = flat(model.trainable_parameters())
    g = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
    norm, finite, _ = step._update(g, mx.array(1.0))
    ref, ref_norm = optim.clip_grad_norm(g, 1.0)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-5) and float(norm) > 1 and bool(finite)
    w1, ref = flat(model.trainable_parameters()), flat(ref)
    for k in w0:
        np.testing.assert_allclose(w1[k], w0[k] - ref[k], rtol=1e-5, atol=1e-6)
    norm, finite, _ = step._update(g, mx.array(float("nan")))  # skipped: parameters kept, norm 0
    assert not bool(finite) and float(norm) == 0.0
    w2 = flat(model.trainable_parameters())
    assert all(np.array_equal(w2[k], w1[k]) for k in w1)


def test_accumulated_gradients_are_evaluated_with_each_micro_step():
    model, batch = tiny_model(), tiny_batch()
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None), grad_accumulation=2)
    out = step(batch, mx.random.key(0))
    assert not out["applied"]
    arrays = step.state_arrays()
    assert len(arrays) == 3 and arrays[0].keys() == step.flat.keys()  # the flat accumulated gradient
    assert sum(a.size for a in arrays[0].values()) == sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    out = step(batch, mx.random.key(1))
    assert out["applied"] and len(step.state_arrays()) == 2


def test_memory_limit_auto_calibrates_on_the_second_step(monkeypatch):
    monkeypatch.setattr(S, "_on_gpu", lambda: True)
    before = mx.get_memory_limit()
    try:
        model, batch = tiny_model(), tiny_batch()
        # evaluated in pieces, the one-graph step needs no limit
        step = TrainStep(model, optim.AdamW(1e-4), StepConfig())
        for i in range(3):
            mx.eval(step(batch, mx.random.key(i))["loss"], step.state_arrays())
        assert step.memory_limit is None and mx.get_memory_limit() == before
        # evaluated at once, it gets one
        step = TrainStep(model, optim.AdamW(1e-4), StepConfig(pipeline_ahead=None))
        for i in range(3):
            out = step(batch, mx.random.key(i))
            mx.eval(out["loss"], step.state_arrays())
            if i == 0:
                assert step.memory_limit is None and mx.get_memory_limit() == 1  # compiling: serialised
        assert step.memory_limit and mx.get_memory_limit() == step.memory_limit
        assert mx.get_active_memory() < step.memory_limit < mx.get_active_memory() + (1 << 30)
    finally:
        mx.set_memory_limit(before)


def test_checkpointed_memory_limit_is_tightest_with_synchronous_segments(monkeypatch):
    """The block-by-block step's calibrated limit: 2% + 64 MB above the serialised peak when the host
    runs a segment ahead (speed), 16 MB with synchronous segments (the memory-first mode)."""
    monkeypatch.setattr(S, "_on_gpu", lambda: True)
    monkeypatch.setattr(S.mx, "get_peak_memory", lambda: 10**9)  # the calibration step's peak
    before = mx.get_memory_limit()
    try:
        for ahead, expected in ((1, int(1e9 * 1.02) + (64 << 20)), (0, 10**9 + (16 << 20))):
            model, batch = tiny_model(), tiny_batch()
            model.set_gradient_checkpointing(1)
            step = TrainStep(model, optim.AdamW(1e-4), StepConfig(blockwise_ahead=ahead))
            for i in range(2):
                mx.eval(step(batch, mx.random.key(i))["loss"], step.state_arrays())
            assert step.memory_limit == expected and mx.get_memory_limit() == expected
            mx.set_memory_limit(before)
    finally:
        mx.set_memory_limit(before)


def test_optimizer_updates_flat_parameters_like_per_parameter_updates():
    """TrainStep keeps the trainable parameters in one flat array per dtype (the model holds
    views): two AdamW steps with clipping equal mlx.optimizers applied per parameter."""
    batch, keys = tiny_batch(), [mx.random.key(11), mx.random.key(12)]
    model, ref = tiny_model(), tiny_model()
    step = TrainStep(model, optim.AdamW(1e-2, weight_decay=0.1), StepConfig(max_grad_norm=1e-3, memory_limit=None))
    assert list(step.flat) == ["float32_t"] and step.flat["float32_t"].size == sum(  # (LoRA factors stored transposed)
        p.size for _, p in tree_flatten(model.trainable_parameters()))
    ref_step = TrainStep(ref, optim.AdamW(1e-2), StepConfig(memory_limit=None))
    opt = optim.AdamW(1e-2, weight_decay=0.1)
    for key in keys:
        out = step(batch, key)
        mx.eval(out["loss"], step.state_arrays())
        (loss, _), g = ref_step._grad_fn(False)(ref, batch, key)
        g, norm = optim.clip_grad_norm(g, 1e-3)
        opt.update(ref, g)
        mx.eval(ref.parameters(), opt.state)
        assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-6)
        assert float(out["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    got, want = flat(model.trainable_parameters()), flat(ref.trainable_parameters())
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_replaced_model_arrays_become_the_flat_parameters():
    """A resume (or anything else) that puts new arrays into the model is picked up by the next step."""
    model, batch = tiny_model(), tiny_batch()
    step = TrainStep(model, optim.SGD(learning_rate=0.0), StepConfig(memory_limit=None))
    mx.eval(step(batch, mx.random.key(0))["loss"], step.state_arrays())
    new = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
    model.update(new)
    mx.eval(step(batch, mx.random.key(1))["loss"], step.state_arrays())
    got, want = flat(model.trainable_parameters()), flat(new)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_lora_factors_stored_transposed_give_the_same_steps():
    """Switch "flat_transposed": LoRA's factors stored transposed in the flat parameters (their
    gradients then flatten without a layout copy) change nothing but the storage order: two AdamW
    steps give the same losses and parameters as the plain layout, bit for bit (the update is
    elementwise); the gradient norm sums the same squares in another order (float32 rounding)."""
    from mflux2.ops import using

    batch, keys = tiny_batch(), [mx.random.key(21), mx.random.key(22)]
    results = []
    for on in (False, True):
        with using(flat_transposed=on):
            model = tiny_model()
            step = TrainStep(model, optim.AdamW(1e-2), StepConfig(memory_limit=None))
            assert all(k.endswith("_t") == on for k in step.flat)
            outs = []
            for key in keys:
                out = step(batch, key)
                mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
                outs.append((float(out["loss"]), float(out["grad_norm"])))
            results.append((outs, flat(model.trainable_parameters())))
    (o0, p0), (o1, p1) = results
    assert [l for l, _ in o0] == [l for l, _ in o1]
    assert [n for _, n in o1] == pytest.approx([n for _, n in o0], rel=1e-6)
    for k in p0:
        np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)


def test_lora_matrices_are_cast_once_for_a_bf16_model(tmp_path):
    """With a bf16 base the float32 LoRA matrices form their own flat group, cast to bf16 once for
    the forward pass; the gradient equals the per-matrix casts' within bf16 precision, and the
    step's graph holds a few optimiser ops, not a few per LoRA matrix."""
    import re

    mx.random.seed(0)
    model = Flux2Transformer(CFG)
    model.set_dtype(mx.bfloat16)
    apply_lora(model, rank=4, targets="attention")
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    batch = Batch(**{k: (v.astype(mx.bfloat16) if k in ("latents", "prompt_embeds", "dop_embeds") else v)
                     for k, v in vars(tiny_batch()).items()})
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None))
    assert list(step.flat) == ["float32_lora_t"] and step.params.casts["float32_lora_t"] == mx.bfloat16
    key = mx.random.key(4)
    (_, _), g_tree = step._grad_fn(False)(model, batch, key)
    (_, _), g_flat = step._flat_grad_fn(False)(dict(step.flat), batch, key)
    step._install(step.flat)
    want = np.array(step.params.flatten(g_tree)["float32_lora_t"])
    got = np.array(g_flat["float32_lora_t"])
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())
    out = step(batch, key)
    graph = tmp_path / "step.dot"
    mx.export_to_dot(str(graph), out["loss"], out["grad_norm"], *[a for _, a in tree_flatten(step.state_arrays())])
    selects = [label for label in re.findall(r'label ="([^"]*)"', graph.read_text()) if "Select" in label]
    assert 0 < len(selects) <= 12  # the NaN guard on a few flat arrays (per parameter it was 3 × 28)
    mx.eval(out["loss"], step.state_arrays())
    assert bool(out["finite"])


@pytest.mark.parametrize("dop", [False, True])
def test_one_graph_step_evaluated_in_pieces_gives_the_same_update(dop, monkeypatch):
    """The plain step is evaluated piece by piece (forward, then each block's backward, last block
    first) with the host a bounded number of pieces ahead; values are those of one evaluation."""
    batch, key = tiny_batch(), mx.random.key(8)
    pushed, results = [], []
    for ahead in (None, 1):
        model = tiny_model()
        step = TrainStep(model, optim.AdamW(1e-2), StepConfig(pipeline_ahead=ahead, memory_limit=None))
        if ahead is not None:
            real = S._Pipeline.push
            monkeypatch.setattr(S._Pipeline, "push", lambda self, x: (pushed.append(x), real(self, x)))
        out = step(batch, key, dop=dop)
        mx.eval(out["loss"], step.state_arrays())
        results.append((float(out["loss"]), flat(model.trainable_parameters())))
    # every block's output (with DOP: the prior pass's, then the batched main + preservation pass's),
    # the loss, then one piece per block backwards
    assert len(pushed) == 5 * (2 if dop else 1) + 1 + 5
    assert results[1][0] == results[0][0]
    for k in results[0][1]:
        assert np.array_equal(results[1][1][k], results[0][1][k]), k


def test_accumulated_checkpointed_steps_update_like_plain_ones():
    """Gradient accumulation over the block-by-block backward (its gradient trees flattened into the
    flat layout) gives the update of accumulation over the one-graph step."""
    batch, keys = tiny_batch(), [mx.random.key(21), mx.random.key(22)]
    params = []
    for every in (0, 1):
        model = tiny_model()
        model.set_gradient_checkpointing(every)
        step = TrainStep(model, optim.AdamW(1e-2), StepConfig(max_grad_norm=1.0, memory_limit=None), grad_accumulation=2)
        outs = [step(batch, k) for k in keys]
        mx.eval(outs[-1]["loss"], step.state_arrays())
        assert [o["applied"] for o in outs] == [False, True]
        params.append(flat(model.trainable_parameters()))
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("dop", [False, True])
def test_optimised_step_gradients_equal_plain_autodiff(dop):
    """Issue 33: every fast path of mflux2.ops on (q/k/v parts with a shared LoRA down-projection, the
    fused VJPs, flat views, the GEMMs' accumulators; the CUDA kernels where CUDA runs) against every switch off
    (plain MLX autodiff of plain MLX ops): each of several steps' LoRA gradients, float32, then the
    parameters after those steps through the real (compiled) TrainStep."""
    from mflux2 import ops

    on, off = ({name: v for name in ops.SWITCHES} for v in (True, False))  # (the CUDA kernels run only on CUDA)
    for i in range(3):
        batch, key, grads = tiny_batch(seed=10 + i), mx.random.key(20 + i), []
        for switches in (on, off):
            model = tiny_model()
            step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None))
            with ops.using(**switches):
                (loss, _), g = step._flat_grad_fn(dop)(dict(step.flat), batch, key)
            mx.eval(loss, g)
            grads.append(g)
        assert_same_grads(grads[1], grads[0], rtol=1e-4)
    params = []
    for switches in (on, off):
        model = tiny_model()
        step = TrainStep(model, optim.AdamW(1e-2), StepConfig(memory_limit=None))
        with ops.using(**switches):
            for i in range(3):
                out = step(tiny_batch(seed=10 + i), mx.random.key(20 + i), dop=dop)
                mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
        params.append(flat(model.trainable_parameters()))
    for k in params[0]:
        np.testing.assert_allclose(params[0][k], params[1][k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("every", [0, 1])
def test_a_bucket_change_traces_each_shape_once(every, monkeypatch):
    """Batches of two token counts (two buckets), alternating as an epoch draws them: the compiled step
    (one graph, or block by block) is traced on the first batch of each shape only; going back to a
    shape reuses its compiled graph (MLX's compile cache keeps both)."""
    import mflux2.models.transformer as T

    traces = []
    orig = T.SingleStreamBlock.__call__

    def counted(self, *a, **k):
        traces.append(a[0].shape[1])  # the block's joint sequence: text + image tokens
        return orig(self, *a, **k)

    monkeypatch.setattr(T.SingleStreamBlock, "__call__", counted)
    model = tiny_model()
    if every:
        model.set_gradient_checkpointing(every)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None))
    per_shape = []
    for i, n in enumerate([16, 16, 12, 12, 16, 12, 16, 12]):
        before = len(traces)
        out = step(tiny_batch(b=1, n=n, seed=i), mx.random.key(i), dop=True)
        mx.eval(out["loss"], step.state_arrays())
        per_shape.append(len(traces) - before)
    assert per_shape[0] > 0 and per_shape[2] == per_shape[0]  # each shape's first step traces it whole
    assert per_shape[1] == per_shape[3] == 0 and per_shape[4:] == [0, 0, 0, 0]  # never again
