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


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    make_reference(False).save_pretrained(root / "transformer")
    return root


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
