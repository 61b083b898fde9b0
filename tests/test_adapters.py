"""LoKr, LoHa and DoRA (mflux2.lora) against their reference implementations on diffusers' FLUX.2
transformer: LyCORIS (lycoris-lora 4.1.3: LoKr, LoHa) and PEFT (DoRA, LoKr, LoHa), float32, random
non-zero adapter weights. The same weights must give the same transformer output, and one training
step (mflux2's flow-matching loss, TrainStep's gradient function) the same loss and the same gradient
for every adapter array as torch autograd through the reference.

Adapters on diffusers' split to_q/to_k/to_v land on row ranges of BFL's fused qkv (SplitWeights:
stacked layers, one per part); single_transformer_blocks.*.attn.to_qkv_mlp_proj is BFL's fused
single_blocks.*.linear1 and carries one adapter over all its rows.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mflux2.lora import load_adapters, lora_layers, lora_weights
from mflux2.lora_formats import DoRAWeights, LoHaWeights, LoKrWeights, SplitWeights
from mflux2.models.transformer import load_transformer
from mflux2.training.step import Batch, StepConfig, TrainStep, noisy_inputs
from test_lora import klein  # noqa: F401  (fixture: the tiny klein transformer in diffusers' layout)
from test_transformer import make_inputs, make_reference, mlx_output, reference_output, rel_err

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (test extra)")

D = 32  # tiny model's hidden size (tests/test_transformer.py TINY)

# diffusers module (under transformer_blocks.{i}. / single_transformer_blocks.{i}.) -> (BFL module, q/k/v part)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
}
SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}


def targets(ref):
    """[(diffusers path, torch module, BFL module, part)] of every adapted layer."""
    out = []
    for i in range(len(ref.transformer_blocks)):
        out += [(f"transformer_blocks.{i}.{k}", ref.get_submodule(f"transformer_blocks.{i}.{k}"), f"double_blocks.{i}.{b}", p)
                for k, (b, p) in DOUBLE.items()]
    for i in range(len(ref.single_transformer_blocks)):
        out += [(f"single_transformer_blocks.{i}.{k}", ref.get_submodule(f"single_transformer_blocks.{i}.{k}"),
                 f"single_blocks.{i}.{b}", p) for k, (b, p) in SINGLE.items()]
    return out


def _randomize(params: dict, gen: torch.Generator, std: float):
    with torch.no_grad():
        for name, p in params.items():
            if "magnitude" in name:  # DoRA's m: around ‖W‖ (its init), not around zero
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def _np(t) -> mx.array:
    return mx.array(t.detach().float().numpy())


# ---- the references: each returns (ref model, {diffusers path: {our array name: torch parameter}}, {BFL: weights}) ----


def lycoris_ref(kind: str, rank=4, alpha=6.0, std=0.3, **knobs):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    ref = make_reference(False)
    gen = torch.Generator().manual_seed(1)
    params, parts = {}, {}
    for path, mod, bfl, part in targets(ref):
        cls = LokrModule if kind == "lokr" else LohaModule
        m = cls(path, mod, 1.0, lora_dim=rank, alpha=alpha, **knobs)
        names = [n for n in m.weight_list if isinstance(getattr(m, n, None), torch.nn.Parameter)]
        p = {n: getattr(m, n) for n in names}
        _randomize(p, gen, std)
        m.apply_to()
        mod._adapter = m  # (keeps the wrapper alive)
        params[path] = p
        t = {n.split("_", 1)[1]: _np(v) for n, v in p.items()}  # lokr_w1 -> w1, hada_w1_a -> w1_a
        w = (LoKrWeights(**t, alpha=float(m.alpha)) if kind == "lokr" else LoHaWeights(**t, alpha=float(m.alpha)))
        parts.setdefault(bfl, {})[part] = w
    return ref, params, _weights(parts)


def peft_ref(kind: str, rank=4, alpha=6.0, std=0.3, **knobs):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    ref = make_reference(False)
    paths = {path: (bfl, part) for path, _, bfl, part in targets(ref)}
    regex = "(" + "|".join(p.replace(".", r"\.") for p in paths) + ")"
    if kind == "dora":
        cfg = LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, init_lora_weights=False, target_modules=regex)
    elif kind == "lokr":
        cfg = LoKrConfig(r=rank, alpha=alpha, target_modules=regex, **knobs)
    else:
        cfg = LoHaConfig(r=rank, alpha=alpha, target_modules=regex)
    ref = inject_adapter_in_model(cfg, ref)
    gen = torch.Generator().manual_seed(2)
    params, parts = {}, {}
    for path, (bfl, part) in paths.items():
        mod = ref.get_submodule(path)
        if kind == "dora":
            p = {"lora_A": mod.lora_A["default"].weight, "lora_B": mod.lora_B["default"].weight,
                 "magnitude": mod.lora_magnitude_vector["default"].weight}
        else:
            prefix = "lokr_" if kind == "lokr" else "hada_"
            p = {n: d["default"] for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
                 for d in [getattr(mod, prefix + n, {})] if "default" in d}
            p = {prefix + n: v for n, v in p.items()}
        _randomize(p, gen, std)
        params[path] = p
        t = {n: _np(v) for n, v in p.items()}
        if kind == "dora":
            w = DoRAWeights(t["lora_A"], t["lora_B"], alpha, magnitude=t["magnitude"])
        elif kind == "lokr":
            assert not ("lokr_w1" in t and "lokr_w2" in t)  # PEFT scales alpha/r even then; LyCORIS and we use 1
            w = LoKrWeights(**{n[5:]: v for n, v in t.items()}, alpha=alpha)
        else:
            w = LoHaWeights(**{n[5:]: v for n, v in t.items()}, alpha=alpha)
        parts.setdefault(bfl, {})[part] = w
    return ref, params, _weights(parts)


def _weights(parts: dict) -> dict:
    """{BFL module: weights}, the q/k/v parts of a fused layer as a SplitWeights of row ranges."""
    out = {}
    for bfl, p in parts.items():
        if None in p:
            out[bfl] = p[None]
        else:
            out[bfl] = SplitWeights([((i * D, (i + 1) * D), p[i]) for i in sorted(p)], 3 * D)
    return out


CASES = {
    "lycoris_lokr": lambda: lycoris_ref("lokr"),  # W1 whole, W2 factored (rank 4 < max/2): scale alpha/r
    "lycoris_lokr_whole": lambda: lycoris_ref("lokr", rank=16),  # both halves whole: scale 1, alpha ignored
    "lycoris_lokr_both_factor4": lambda: lycoris_ref("lokr", rank=1, decompose_both=True, factor=4),
    "lycoris_loha": lambda: lycoris_ref("loha", std=0.5),
    "peft_dora": lambda: peft_ref("dora"),
    "peft_lokr": lambda: peft_ref("lokr", rank=2, decompose_both=True),
    "peft_loha": lambda: peft_ref("loha", std=0.5),
}


def ours(klein, weights, trainable=False):
    model = load_transformer(klein, dtype=mx.float32)
    load_adapters(model, weights, trainable=trainable)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_output_parity(klein, case):
    ref, _, weights = CASES[case]()
    inputs = make_inputs()
    theirs = reference_output(ref, *inputs)
    base = reference_output(make_reference(False), *inputs)
    assert rel_err(theirs, base) > 1e-2  # the adapters do change the output
    model = ours(klein, weights)
    assert rel_err(mlx_output(model, *inputs), theirs) <= 1e-4
    # the layers' own weights() give back what was loaded (q/k/v parts as a SplitWeights again)
    model = ours(klein, weights, trainable=True)
    got = lora_weights(model)
    assert set(got) == set(weights)
    for name, w in weights.items():
        assert type(got[name]) is type(w), name
        assert np.allclose(np.array(got[name].delta(mx.zeros(w.shape) + 1)), np.array(w.delta(mx.zeros(w.shape) + 1)), atol=1e-6)


def _our_path(bfl: str, part, n_parts: int = 3) -> str:
    """The module path of one adapter: the q/k/v parts stack, q innermost."""
    return bfl if part is None else bfl + ".base" * (n_parts - 1 - part)


@pytest.mark.parametrize("case", list(CASES))
def test_step_parity(klein, case):
    ref, params, weights = CASES[case]()
    model = ours(klein, weights, trainable=True)
    step = TrainStep(model, optim.SGD(0.0), StepConfig(compile=False, memory_limit=None, weighting="bell_shaped"))
    x, ctx, _, img_ids, txt_ids = make_inputs()
    batch = Batch(mx.array(x), mx.array(ctx), mx.array(img_ids), mx.array(txt_ids))
    key = mx.random.key(7)
    (loss, _), grads = step._grad_fn(False)(model, batch, key)
    grads = dict(tree_flatten(grads))

    xt, target, t = noisy_inputs(batch.latents, key, step.cfg)  # the same draws, for torch
    pred = ref(torch.tensor(np.array(xt)), torch.tensor(ctx), torch.tensor(np.array(t)), torch.tensor(img_ids),
               torch.tensor(txt_ids), return_dict=False)[0]
    tt = torch.tensor(np.array(t))
    w = torch.exp(-2.0 * (tt - 0.5) ** 2)
    from mflux2.training.timesteps import BELL_Z
    per = ((pred - torch.tensor(np.array(target))) ** 2).mean(dim=(1, 2)) * w / BELL_Z
    theirs = per.mean()
    theirs.backward()
    assert abs(loss.item() - theirs.item()) <= 1e-4 * abs(theirs.item())

    n_checked = 0
    for path, p in params.items():
        bfl, part = next((b, pt) for dp, _, b, pt in targets(ref) if dp == path)
        prefix = _our_path(bfl, part)
        for name, tp in p.items():
            ours_g = np.array(grads[f"{prefix}.{name}"])
            ref_g = tp.grad.numpy()
            assert np.abs(ref_g).max() > 0, (path, name)
            assert rel_err(ours_g, ref_g) <= 1e-4, (case, path, name, rel_err(ours_g, ref_g))
            n_checked += 1
    assert n_checked == len(grads)  # every trainable array of ours was compared
    assert len(lora_layers(model)) == sum(len(p) for p in [params])  # one adapter layer per reference module


# ---- every type through the training machinery (TrainStep, checkpoints, quantized bases, fuse) ----

from mflux2.lora import ADAPTERS, AdapterLinear, _set, apply_lora, fuse_lora, lora_parameters, remove_lora  # noqa: E402
from mflux2.models.transformer import Flux2Transformer, TransformerConfig  # noqa: E402
from mflux2.training import checkpoints  # noqa: E402

TYPES = ["lora", "lokr", "loha", "dora"]
CFG = TransformerConfig(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                        joint_attention_dim=24, in_channels=16, axes_dims_rope=(4, 4, 4, 4))


def tiny(kind, seed=0, quantize=False, targets="attention", noise_seed=0):
    mx.random.seed(seed)
    model = Flux2Transformer(CFG)
    if quantize:
        import mlx.nn as nn
        nn.quantize(model, group_size=32, bits=8,
                    class_predicate=lambda p, m: isinstance(m, nn.Linear) and p.startswith(("double_blocks", "single_blocks")))
    knobs = {"decompose_both": True, "factor": 4} if kind == "lokr" else {}
    apply_lora(model, rank=2, targets=targets, type=kind, **knobs)
    g = np.random.default_rng(noise_seed)
    for _, m in lora_layers(model):  # every factor non-zero (the zero-initialised ones too)
        for k in m.param_names():
            noise = g.standard_normal(m[k].shape).astype(np.float32)
            m[k] = m[k] * mx.array(1 + 0.1 * noise) if k == "magnitude" else mx.array(0.2 * noise)
    mx.eval(model.parameters())
    return model


def tiny_batch(n=16, b=2, l=8, seed=1):
    g = np.random.default_rng(seed)
    f = lambda *s: mx.array(g.standard_normal(s).astype(np.float32))  # noqa: E731
    return Batch(latents=f(b, n, 16), prompt_embeds=f(b, l, 24), img_ids=mx.array(g.integers(0, 4, (n, 4)).astype(np.float32)),
                 txt_ids=mx.array(g.integers(0, 4, (l, 4)).astype(np.float32)), dop_embeds=f(b, l, 24))


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


@pytest.mark.parametrize("kind", TYPES)
def test_layers_parameters_and_identity_init(kind):
    mx.random.seed(0)
    model = Flux2Transformer(CFG)
    inputs = [mx.array(a) for a in make_inputs(in_ch=16)]
    before = model(*inputs)
    paths = apply_lora(model, rank=2, targets="attention", type=kind)
    assert all(type(m) is ADAPTERS[kind] for _, m in lora_layers(model)) and len(paths) == 4 * CFG.num_layers + 2 * CFG.num_single_layers
    # the reference's init: the delta starts at exactly zero (DoRA: m = ‖W‖, B = 0)
    assert rel_err(np.array(model(*inputs)), np.array(before)) <= 1e-6
    trainable = flat(model.trainable_parameters())
    assert set(trainable) == {f"{p}.{k}" for p, m in lora_layers(model) for k in m.param_names()} == set(flat(lora_parameters(model)))
    remove_lora(model)
    assert not lora_layers(model) and np.array_equal(np.array(model(*inputs)), np.array(before))
    # the plan's count is what the layers hold (LoKr: ranks on both sides of LyCORIS's r < max/2 rule)
    from mflux2.training.memory import lora_parameters as planned
    knobs = [{}] if kind != "lokr" else [{}, {"decompose_both": True}, {"factor": 4}, {"factor": 2, "decompose_both": True}]
    for rank in (1, 2, 4, 6):
        for kw in knobs:
            for targets in ("attention", "all"):
                apply_lora(model, rank=rank, targets=targets, type=kind, **kw)
                n = sum(v.size for v in flat(model.trainable_parameters()).values())
                assert n == planned(CFG, rank, targets, kind, kw.get("factor", -1), kw.get("decompose_both", False)), (rank, kw)
                remove_lora(model)


@pytest.mark.parametrize("kind", TYPES)
def test_train_step_checkpointing_dop_compile(kind):
    """DOP with the block-by-block checkpointed backward gives the plain gradients; the compiled
    step with checkpointing updates like the uncompiled step without."""
    batch, key = tiny_batch(), mx.random.key(3)
    model = tiny(kind)
    step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None))
    (l0, _), g0 = step._grad_fn(True)(model, batch, key)
    model.set_gradient_checkpointing(1)
    (l1, *_), g1 = step._blockwise_grads(step._blockwise(), batch, key, True)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    f0, f1 = flat(g0), flat(g1)
    assert f0.keys() == f1.keys() == set(flat(model.trainable_parameters()))
    for k in f0:
        assert np.abs(f0[k]).max() > 0, k
        np.testing.assert_allclose(f1[k], f0[k], rtol=1e-5, atol=1e-5 * np.abs(f0[k]).max(), err_msg=k)

    params = []
    for every, compiled in ((0, False), (1, True)):
        model = tiny(kind)
        model.set_gradient_checkpointing(every)
        step = TrainStep(model, optim.AdamW(1e-2), StepConfig(memory_limit=None, compile=compiled))
        out = step(batch, key, dop=True)
        mx.eval(out["loss"], step.state_arrays())
        assert bool(out["finite"])
        params.append(flat(model.trainable_parameters()))
    for k in params[0]:
        np.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-5, atol=1e-6, err_msg=k)


def _tree_lerp(ema, params, decay=0.9):
    from mlx.utils import tree_map
    return tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


@pytest.mark.parametrize("kind", TYPES)
def test_exact_resume_with_ema(kind, tmp_path):
    """Three steps in one go, or one step, a checkpoint's arrays (parameters, AdamW state, EMA)
    written and read into a fresh model, then two more: the same parameters and EMA, bit for bit."""
    batch = tiny_batch()
    keys = [mx.random.key(10 + i) for i in range(3)]

    def run(model, step, ema, ks):
        for k in ks:
            out = step(batch, k)
            mx.eval(out["loss"], step.state_arrays())
            ema = _tree_lerp(ema, model.trainable_parameters())
        return ema

    model = tiny(kind)
    step = TrainStep(model, optim.AdamW(1e-2), StepConfig(memory_limit=None))
    ema = run(model, step, flat_tree(model.trainable_parameters()), keys)
    want, want_ema = flat(model.trainable_parameters()), flat(ema)

    model = tiny(kind)
    step = TrainStep(model, optim.AdamW(1e-2), StepConfig(memory_limit=None))
    ema = run(model, step, flat_tree(model.trainable_parameters()), keys[:1])
    mx.save_safetensors(str(tmp_path / "state.safetensors"), checkpoints.state_arrays(model, step.optimizer, ema))

    model = tiny(kind, noise_seed=5)  # other adapter values: the checkpoint must replace them all
    step = TrainStep(model, optim.AdamW(1e-2), StepConfig(memory_limit=None))
    ema = checkpoints.restore_arrays(tmp_path, mx.load(str(tmp_path / "state.safetensors")), model, step.optimizer,
                                     flat_tree(model.trainable_parameters()))
    ema = run(model, step, ema, keys[1:])
    got, got_ema = flat(model.trainable_parameters()), flat(ema)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
        assert np.array_equal(got_ema[k], want_ema[k]), k


def flat_tree(tree):
    from mlx.utils import tree_map
    return tree_map(lambda a: mx.array(a), tree)


@pytest.mark.parametrize("kind", TYPES)
def test_quantized_base_and_fuse(kind):
    """QLoRA: an int8 base (dequantised by tiles at 256+ tokens, quantized_matmul below) trains only
    the adapter; fuse_lora folds every type's delta into the weights (float: exactly; int8: within
    its rounding) and leaves plain layers."""
    import mlx.nn as nn

    model = tiny(kind, quantize=True, targets="all")
    assert isinstance(model.single_blocks[0].linear1.base, nn.QuantizedLinear)
    for n in (16, 256):
        batch = tiny_batch(n=n)
        step = TrainStep(model, optim.AdamW(1e-4), StepConfig(memory_limit=None, compile=False))
        (loss, _), grads = step._grad_fn(False)(model, batch, mx.random.key(2))
        g = flat(grads)
        assert set(g) == set(flat(model.trainable_parameters())) == set(flat(lora_parameters(model)))
        assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in g.values()) and np.isfinite(float(loss))
    inputs = [mx.array(a) for a in make_inputs(in_ch=16)]
    with_adapter = np.array(model(*inputs))
    # the forward equals dense float layers W + ΔW (W dequantised, ΔW from the file-layout weights)
    from mflux2.lora import _base_matrix, _outermost
    dense = tiny(kind, quantize=True, targets="all")
    for path, m in _outermost(dense):
        plain = m
        while not isinstance(plain, (nn.Linear, nn.QuantizedLinear)) or isinstance(plain, AdapterLinear):
            plain = plain.base
        w = _base_matrix(plain)
        layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in plain)
        layer.weight = w + m.weights().delta(w)
        if "bias" in plain:
            layer.bias = plain.bias
        _set(dense, path, layer)
    assert rel_err(np.array(dense(*inputs)), with_adapter) <= 1e-5
    fuse_lora(model)
    assert not lora_layers(model) and isinstance(model.single_blocks[0].linear1, nn.QuantizedLinear)
    assert rel_err(np.array(model(*inputs)), with_adapter) <= 2e-2  # int8 requantisation
    model = tiny(kind, targets="all")
    with_adapter = np.array(model(*inputs))
    fuse_lora(model)
    assert rel_err(np.array(model(*inputs)), with_adapter) <= 1e-5


@pytest.mark.parametrize("kind", TYPES)
def test_weights_round_trip_with_ranges(kind):
    """The `attention` target's restricted single-block layers in whole-layer file form (LoKr's W1 and
    LoHa's w1 zero-padded, DoRA's m = ‖W‖ outside): loaded whole (trainable=False) they give the same
    output, and loaded to train (mflux2's `attention` metadata) the same ranges and arrays again."""
    model = tiny(kind)
    inputs = [mx.array(a) for a in make_inputs(in_ch=16)]
    want = np.array(model(*inputs))
    weights = lora_weights(model)
    layer = model.single_blocks[0].linear1
    assert layer.restricted and weights["single_blocks.0.linear1"].shape == (layer.output_dims, layer.input_dims)
    plain = tiny(kind)
    remove_lora(plain)
    load_adapters(plain, weights)
    assert not plain.single_blocks[0].linear1.restricted
    assert rel_err(np.array(plain(*inputs)), want) <= 1e-5
    remove_lora(plain)
    load_adapters(plain, weights, {"software": "mflux2", "targets": "attention"}, trainable=True)
    assert rel_err(np.array(plain(*inputs)), want) <= 1e-5
    got, ref = flat(plain.trainable_parameters()), flat(model.trainable_parameters())
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    for (_, a), (_, b) in zip(lora_layers(plain), lora_layers(model)):
        assert (a.out_start, a.out_stop, a.in_start, a.in_stop) == (b.out_start, b.out_stop, b.in_start, b.in_stop)


def test_config_keys_and_plan():
    """lora.type / factor / decompose_both are validated at load time with one line naming the key;
    a LoRA config means what it meant (same resume signature)."""
    from mflux2.training.config import resume_signature
    from mflux2.training.config_loading import load_config
    from test_plan import ROOT as PLAN_ROOT, cat_toy_plan

    base = load_config(PLAN_ROOT / "configs" / "cat-toy.yaml")
    assert (base.lora.type, base.lora.factor, base.lora.decompose_both) == ("lora", -1, False)
    assert "lora.type" not in resume_signature(base)
    lokr = load_config(PLAN_ROOT / "configs" / "cat-toy.yaml", {"lora.type": "lokr", "lora.factor": 8})
    assert resume_signature(lokr)["lora.type"] == "lokr" and resume_signature(lokr)["lora.factor"] == 8
    for key, value in (("lora.type", "lycoris"), ("lora.factor", 0), ("lora.factor", -2), ("lora.decompose_both", "yes")):
        with pytest.raises(Exception) as e:
            load_config(PLAN_ROOT / "configs" / "cat-toy.yaml", {key: value})
        msg = str(e.value)
        assert key.split(".")[-1] in msg and "\n" not in msg.strip(), msg
    for kind in TYPES:  # every type can be saved, so the plan lets each run
        assert not cat_toy_plan("configs/cat-toy.yaml", overrides={"lora.type": kind}).problems, kind


@pytest.mark.parametrize("kind", TYPES)
def test_file_round_trip(kind, tmp_path):
    """save_lora writes each type (mflux2.lora_formats' layouts; DoRA's ComfyUI dora_scale relative to
    the base weights, an int8 base's dequantised ones) and load_lora reads it back: the same output,
    and with trainable=True the same arrays on the same ranges."""
    from mflux2.lora import load_lora, save_lora

    inputs = [mx.array(a) for a in make_inputs(in_ch=16)]
    formats = ["bfl", "kohya"] + (["diffusers"] if kind in ("lora", "dora") else [])
    for quantize in (False, True):
        model = tiny(kind, quantize=quantize)
        want, arrays = np.array(model(*inputs)), flat(model.trainable_parameters())
        for fmt in formats:
            path = save_lora(tmp_path / f"{fmt}{quantize}.safetensors", model, format=fmt)
            other = tiny(kind, quantize=quantize, noise_seed=9)
            remove_lora(other)
            load_lora(other, path)
            assert rel_err(np.array(other(*inputs)), want) <= 1e-5, (fmt, quantize)
            remove_lora(other)
            load_lora(other, path, trainable=True)
            assert all(type(m) is ADAPTERS[kind] for _, m in lora_layers(other))
            got = flat(other.trainable_parameters())
            assert got.keys() == arrays.keys()
            for k in arrays:
                np.testing.assert_allclose(got[k], arrays[k], rtol=1e-5, atol=1e-6, err_msg=f"{fmt} {quantize} {k}")


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_gradients_against_dense(fast, bias):
    """DoRA's output and every gradient — the magnitude's above all, which the rescale's custom VJP
    derives from the output (mflux2.ops.gemm `_rescale`) — against autodiff through the dense
    W' = m ⊙ V / ‖V‖ (V = W + s·B A, the norm detached as in PEFT), float32, on a fused layer's
    output parts that cut the adapter's row range, with restricted input columns, with and without
    a bias, in the fast path and the fallback."""
    import mlx.nn as nn

    from mflux2.lora import DoRALinear
    from mflux2.ops.gemm import linear_split

    mx.random.seed(3)
    base = nn.Linear(24, 32, bias=bias)
    if bias:
        base.bias = mx.random.normal((32,))
    base.freeze()
    layer = DoRALinear(base, 4, alpha=8, out_range=(4, 20), in_range=(2, 22))
    layer.lora_B = 0.3 * mx.random.normal(layer.lora_B.shape)
    layer.magnitude = layer.magnitude * (1 + 0.1 * mx.random.normal(layer.magnitude.shape))
    x, wts = mx.random.normal((2, 5, 24)), mx.random.normal((2, 5, 32))
    sizes = [10, 12, 10]  # parts 0:10, 10:22, 22:32: the first two cut the range 4:20

    def dense(p):
        v = base.weight[4:20] + 2.0 * mx.pad(p["lora_B"] @ p["lora_A"], [(0, 0), (2, 2)])  # s = alpha / rank
        g = p["magnitude"] / mx.stop_gradient(mx.sqrt(mx.square(v).sum(axis=1)))
        y = x @ mx.concatenate([base.weight[:4], g[:, None] * v, base.weight[20:]]).T + (base.bias if bias else 0)
        return (y * wts).sum(), y

    def ours():
        y = mx.concatenate(linear_split(layer, x, sizes, fast=fast), axis=-1)
        return (y * wts).sum(), y

    params = {k: layer[k] for k in layer.param_names()}
    want, y_want = dense(params)
    g_want = mx.grad(lambda p: dense(p)[0])(params)
    (got, y_got), g_got = nn.value_and_grad(layer, ours)()
    g_got = dict(tree_flatten(g_got))
    assert rel_err(np.array(y_got), np.array(y_want)) <= 1e-5
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert set(g_got) == {"lora_A", "lora_B", "magnitude"}
    for k, v in g_want.items():
        assert rel_err(np.array(g_got[k]), np.array(v)) <= 1e-5, (k, rel_err(np.array(g_got[k]), np.array(v)))


def test_dora_magnitude_gradient_is_computed_with_the_input_gradient():
    """The rescale's VJP (mflux2.ops.gemm `_rescale`) computes the magnitude's d g when the backward
    pass computes d u, not whenever d g itself is evaluated (the optimizer, after the whole backward
    pass): evaluating d u alone must leave no cotangent or output [tokens, rows] alive for a later d g.
    Untied, each DoRA layer's cotangent stayed alive until the step's end (docs/performance.md,
    "DoRA's peak")."""
    from mflux2.ops.gemm import _rescale, _rescale_bias

    n, rows = 1024, 256
    unit = n * rows * 4  # one [tokens, rows] float32 array
    g = 1 + 0.1 * mx.random.normal((rows,), key=mx.random.key(1))
    bias = mx.random.normal((rows,), key=mx.random.key(2))
    mx.eval(g, bias)
    for fn, extra in ((_rescale, []), (_rescale_bias, [bias])):
        # u and the cotangent lazy (nothing of their size exists before the evaluation)
        u = mx.random.normal((n, rows), key=mx.random.key(3))
        cot = mx.random.normal((n, rows), key=mx.random.key(4))
        du, dg = mx.vjp(fn, [u, g, *extra], [cot])[1][:2]  # (the output itself not held)
        del u, cot
        before = mx.get_active_memory()
        mx.eval(du)
        kept = mx.get_active_memory() - before
        assert kept < 1.5 * unit, (len(extra), kept / unit)  # d u (1 unit) and d g ([rows]) alone


def test_dora_bf16_keeps_small_magnitude_changes():
    """In bf16 the rescale forms g − 1 in float32 before the cast: a magnitude 1 % above ‖W‖ scales
    the output by 1.01 on average (g itself in bf16 would be 1.0078, the nearest bf16 number)."""
    import mlx.nn as nn

    from mflux2.lora import DoRALinear
    from mflux2.ops.gemm import linear

    mx.random.seed(4)
    base = nn.Linear(64, 48, bias=False)
    base.set_dtype(mx.bfloat16)
    base.freeze()
    layer = DoRALinear(base, 4)  # B = 0: V = W, g = m / ‖W‖
    layer.magnitude = layer.magnitude * 1.01
    x = mx.random.normal((128, 64)).astype(mx.bfloat16)
    for fast in (True, False):
        y, y0 = linear(layer, x, fast=fast).astype(mx.float32), base(x).astype(mx.float32)
        ratio = ((y * y0).sum() / (y0 * y0).sum()).item()
        assert abs(ratio - 1.01) <= 5e-4, (fast, ratio)
