"""LoRA / DoRA / LoKr / LoHa / LoCon files without a model: every FLUX.2 naming found in the wild is
read into the right weights class with the right delta, every type is written in the layouts its
consumers load, and those consumers (ComfyUI's loader, transcribed below; diffusers/PEFT, run) give
the same weights as mflux2's `delta()`."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mflux2.lora_formats import (
    _BFL_NAMES,
    _DIFFUSERS_NAMES,
    DoRAWeights,
    LoHaWeights,
    LoKrWeights,
    LoRAError,
    LoRAWeights,
    SplitWeights,
    convert_lora,
    parse_lora,
    read_lora,
    write_lora,
)

TYPES = ("lora", "dora", "lokr", "loha")
CLASSES = {"lora": LoRAWeights, "dora": DoRAWeights, "lokr": LoKrWeights, "loha": LoHaWeights}
QKV = ("double_blocks.{i}.img_attn.qkv", "double_blocks.{i}.txt_attn.qkv")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """{BFL module: weight} of the tiny dev transformer (guidance embedder too): every linear layer
    an adapter can sit on — double blocks' fused qkv/proj/MLPs, single blocks' linear1/linear2, the
    modulation layers, the final layer and the embedders."""
    from mflux2.models.transformer import load_transformer
    from test_transformer import make_reference

    root = tmp_path_factory.mktemp("dev")
    make_reference(True).save_pretrained(root / "transformer")
    params = dict(tree_flatten(load_transformer(root, dtype=mx.float32).parameters()))
    names = [t.replace("{i}", str(i)) for t in _BFL_NAMES for i in ((0, 1) if "{i}" in t else (None,))]
    out = {n: params[f"{n}.weight"] for n in names}
    assert len(out) == 2 * 8 + 2 * 2 + 11
    return out


# ---------------------------------------------------------------------------------------------
# Random adapters as plain numpy tensors, their deltas computed here from the published maths
# (docs/lora.md "Adapter types"), independent of mflux2's classes.


def _adapter(kind: str, out: int, inn: int, g: np.random.Generator, base_w: np.ndarray | None = None, variant: int = 0) -> dict:
    n = lambda *s: (g.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    if kind in ("lora", "dora"):
        t = {"A": n(3, inn), "B": n(out, 3), "alpha": 5.0}
        if kind == "dora":
            t["m"] = (np.linalg.norm(base_w, axis=1) * (1 + 0.2 * g.standard_normal(out))).astype(np.float32)
        return t
    if kind == "loha":
        return {"hada_w1_a": n(out, 2), "hada_w1_b": n(2, inn), "hada_w2_a": n(out, 2), "hada_w2_b": n(2, inn), "alpha": 3.0}
    # LoKr, factor 4: W1 [4, 4] whole and W2 factored (LyCORIS's usual), both whole (alpha ignored),
    # or W1 factored and W2 whole
    t = {"alpha": 6.0 if variant != 1 else 10000.0}
    if variant == 2:
        t.update(lokr_w1_a=n(4, 2), lokr_w1_b=n(2, 4), lokr_w2=n(out // 4, inn // 4))
    else:
        t["lokr_w1"] = n(4, 4)
        t.update(lokr_w2=n(out // 4, inn // 4)) if variant == 1 else t.update(lokr_w2_a=n(out // 4, 2), lokr_w2_b=n(2, inn // 4))
    return t


def _delta(t: dict, base_w: np.ndarray | None = None) -> np.ndarray:
    if "A" in t:
        d = t["alpha"] / t["A"].shape[0] * (t["B"] @ t["A"])
        if "m" not in t:
            return d
        v = base_w + d
        return t["m"][:, None] * v / np.linalg.norm(v, axis=1, keepdims=True) - base_w
    if "hada_w1_a" in t:
        return t["alpha"] / t["hada_w1_b"].shape[0] * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)
    return np.kron(w1, w2) * (1.0 if rank is None else t["alpha"] / rank)


def _swap(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]])


# ---------------------------------------------------------------------------------------------
# Namings found in the wild for FLUX.2 -> (module key, suffix style)
#   kohya / musubi-tuner: lora_unet_ + BFL path with '_', fused qkv; LyCORIS suffixes, lora_down/up + alpha
#   ai-toolkit: diffusion_model. + BFL path; lora_A/B (LoKr: lokr_* + alpha, as diffusers' converter reads)
#   LyCORIS (SimpleTuner's lycoris preset): lycoris_ + diffusers path with '_', q/k/v split
#   PEFT / diffusers (SimpleTuner's PEFT LoRA/DoRA, save_lora_weights): transformer. + diffusers path;
#     raw PEFT: base_model.model. + diffusers path with the adapter name (.default.)
#   OneTrainer: lora_transformer_ + diffusers path with '_' (ComfyUI's key for it), and its current FLUX.2
#     saver's unconverted dotted names (transformer. + diffusers path, lora_down/up + alpha)
NAMINGS = {
    "kohya": ("bfl", "lora_unet_{_}", "down"),
    "ai-toolkit": ("bfl", "diffusion_model.{.}", "AB"),
    "lycoris": ("diffusers", "lycoris_{_}", "down"),
    "peft": ("diffusers", "transformer.{.}", "AB"),
    "peft-raw": ("diffusers", "base_model.model.{.}", "AB.default"),
    "onetrainer": ("diffusers", "lora_transformer_{_}", "down"),
    "onetrainer-dotted": ("diffusers", "transformer.{.}", "down"),
}


def _key(naming: str, module: str) -> str:
    template = NAMINGS[naming][1]
    return template.replace("{_}", module.replace(".", "_")).replace("{.}", module)


def _emit(naming: str, module: str, t: dict) -> dict[str, np.ndarray]:
    k, style = _key(naming, module), NAMINGS[naming][2]
    if "A" not in t:
        return {f"{k}.{s}": (np.float32(v) if s == "alpha" else v) for s, v in t.items()}
    if style == "down":
        out = {f"{k}.lora_down.weight": t["A"], f"{k}.lora_up.weight": t["B"], f"{k}.alpha": np.float32(t["alpha"])}
    else:  # PEFT: alpha folded into B (diffusers' convention: no alpha key -> scale 1)
        sfx = ".default" if style == "AB.default" else ""
        b = t["B"] * (t["alpha"] / t["A"].shape[0])
        out = {f"{k}.lora_A{sfx}.weight": t["A"], f"{k}.lora_B{sfx}.weight": b}
    if "m" in t:
        if style == "down":
            out[f"{k}.dora_scale"] = t["m"][:, None]  # LyCORIS wd_on_out: [out, 1]
        else:
            out[f"{k}.lora_magnitude_vector" + (".default.weight" if style == "AB.default" else "")] = t["m"]
    return out


def _file(naming: str, kind: str, base: dict, seed: int = 0) -> tuple[dict[str, mx.array], dict[str, np.ndarray], set]:
    """A file in `naming` with a `kind` adapter on every layer -> (tensors, {BFL module: expected delta},
    BFL modules held as split q/k/v parts)."""
    g = np.random.default_rng(seed)
    tensors, expected, split = {}, {}, set()
    diffusers = {}  # BFL template -> [(diffusers template, part)]
    for d, (b, part) in _DIFFUSERS_NAMES.items():
        diffusers.setdefault(b, []).append((d, part))
    for j, (name, w) in enumerate(base.items()):
        w = np.array(w)
        if NAMINGS[naming][0] == "bfl":
            t = _adapter(kind, *w.shape, g, w, variant=j % 3)
            tensors.update(_emit(naming, name, t))
            expected[name] = _delta(t, w)
            continue
        template = next(b for b in diffusers if _matches(b, name))
        i = name.split(".")[1] if "{i}" in template else ""
        entries = diffusers[template]
        if entries[0][1] in (0, 1, 2):  # q/k/v: one independent adapter per part
            split.add(name)
            rows = w.shape[0] // 3
            parts = []
            for dname, part in entries:
                wp = w[part * rows : (part + 1) * rows]
                t = _adapter(kind, *wp.shape, g, wp, variant=part)
                tensors.update(_emit(naming, dname.replace("{i}", i), t))
                parts.append(_delta(t, wp))
            expected[name] = np.concatenate(parts)
        elif entries[0][1] == "swap":  # diffusers' norm_out.linear: [scale; shift] rows
            t = _adapter(kind, *w.shape, g, _swap(w))
            tensors.update(_emit(naming, entries[0][0], t))
            expected[name] = _swap(_delta(t, _swap(w)))
        else:
            t = _adapter(kind, *w.shape, g, w, variant=j % 3)
            tensors.update(_emit(naming, entries[0][0].replace("{i}", i), t))
            expected[name] = _delta(t, w)
    return {k: mx.array(v) for k, v in tensors.items()}, expected, split


def _matches(template: str, name: str) -> bool:
    import re

    return re.fullmatch(re.escape(template).replace(r"\{i\}", r"\d+"), name) is not None


def _check(weights: dict, expected: dict, base: dict, where: str = ""):
    assert set(weights) == set(expected), where
    for name, w in weights.items():
        got = np.array(w.delta(base[name]))
        np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-5, err_msg=f"{where} {name}")


# ---------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("kind", TYPES)
def test_every_naming_reads_every_type(base, naming, kind):
    if naming.startswith("peft") and kind in ("lokr", "loha"):
        pytest.skip("PEFT/diffusers files hold LoRA and DoRA")
    tensors, expected, split = _file(naming, kind, base)
    weights, unknown = parse_lora(tensors, source=naming)
    assert unknown == []
    _check(weights, expected, base, f"{naming}/{kind}")
    for name, w in weights.items():
        if name in split and kind in ("lokr", "loha"):  # a kron/Hadamard product of three is not one
            assert isinstance(w, SplitWeights) and [r for r, _ in w.parts] == [(0, 32), (32, 64), (64, 96)]
            assert all(type(p) is CLASSES[kind] for _, p in w.parts)
        else:  # split LoRA and DoRA fuse exactly
            assert type(w) is CLASSES[kind], (name, type(w))


def test_split_dora_fuses_exactly(base):
    """DoRA on to_q/to_k/to_v with independent A's and magnitudes becomes one DoRAWeights on the fused
    qkv (A stacked, B block-diagonal, magnitudes concatenated): the norm is per output row, so its
    delta on the fused base equals the three parts' deltas on their rows."""
    tensors, expected, _ = _file("peft", "dora", base, seed=3)
    weights, _ = parse_lora(tensors)
    w = weights["double_blocks.1.txt_attn.qkv"]
    assert type(w) is DoRAWeights and w.rank == 9 and w.magnitude.shape == (96,)
    np.testing.assert_allclose(np.array(w.delta(base["double_blocks.1.txt_attn.qkv"])), expected["double_blocks.1.txt_attn.qkv"],
                               rtol=1e-4, atol=1e-5)
    # a missing part leaves its rows unchanged: the others stay DoRA on their own rows
    partial = {k: v for k, v in tensors.items() if ".add_v_proj." not in k}
    w = parse_lora(partial)[0]["double_blocks.1.txt_attn.qkv"]
    assert isinstance(w, SplitWeights) and [r for r, _ in w.parts] == [(0, 32), (32, 64)]
    d = np.array(w.delta(base["double_blocks.1.txt_attn.qkv"]))
    np.testing.assert_allclose(d[:64], expected["double_blocks.1.txt_attn.qkv"][:64], rtol=1e-4, atol=1e-5)
    assert not d[64:].any()


def test_unreadable_keys_are_reported_in_one_line(base, tmp_path):
    tensors, _, _ = _file("kohya", "lokr", base)
    tensors["lora_unet_single_blocks_0_linear1.lokr_t2"] = mx.ones((2, 2, 1, 1))  # Tucker (conv) core
    tensors["lora_unet_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = mx.ones((2, 8))
    mx.save_safetensors(str(tmp_path / "x.safetensors"), tensors)
    with pytest.raises(LoRAError) as e:
        read_lora(tmp_path / "x.safetensors")
    assert "\n" not in str(e.value) and "2 key(s) not understood" in str(e.value) and "lokr_t2" in str(e.value)
    with pytest.warns(UserWarning, match="skipping 2 key"):
        assert len(read_lora(tmp_path / "x.safetensors", strict=False)[0]) == len(base)

    # DoRA normalising input columns (LyCORIS wd_on_out=False, OneTrainer's default): another adapter
    col = {"lora_unet_img_in.lora_down.weight": mx.ones((2, 16)), "lora_unet_img_in.lora_up.weight": mx.ones((32, 2)),
           "lora_unet_img_in.dora_scale": mx.ones((1, 16))}
    with pytest.raises(LoRAError, match=r"lora_unet_img_in.dora_scale has shape \(1, 16\); mflux2 reads DoRA with one magnitude per output row"):
        parse_lora(col, source="col")


# ---------------------------------------------------------------------------------------------
# Writing, reading back, converting


def _weights(kind: str, base: dict, naming: str = "kohya", seed: int = 1) -> dict:
    return parse_lora(_file(naming, kind, base, seed)[0])[0]


@pytest.mark.parametrize("kind", TYPES + ("split-lokr", "split-loha", "mixed"))
def test_write_read_convert(base, tmp_path, kind):
    if kind.startswith("split-"):
        weights = _weights(kind[6:], base, "lycoris")
        assert any(isinstance(w, SplitWeights) for w in weights.values())
    elif kind == "mixed":  # several adapter types in one file
        per = {t: _weights(t, base, seed=i) for i, t in enumerate(TYPES)}
        weights = {n: per[TYPES[j % 4]][n] for j, n in enumerate(base)}
    else:
        weights = _weights(kind, base)
    want = {n: np.array(w.delta(base[n])) for n, w in weights.items()}
    leaf = kind.removeprefix("split-")
    for fmt in ("bfl", "kohya", "diffusers"):
        path = tmp_path / f"{fmt}.safetensors"
        if fmt == "diffusers" and leaf in ("lokr", "loha", "mixed"):
            with pytest.raises(LoRAError, match="cannot be written in the diffusers/PEFT layout"):
                write_lora(path, weights, fmt)
            continue
        if fmt != "diffusers" and leaf in ("dora", "mixed"):
            with pytest.raises(LoRAError, match="dora_scale, which is relative to the base model's weights: pass base="):
                write_lora(path, weights, fmt)
        write_lora(path, weights, fmt, base=base)
        got, meta = read_lora(path, base=base)
        assert meta["adapter_type"] == ("mixed" if kind == "mixed" else leaf)
        assert meta["lora_format"] == fmt
        if leaf == "lokr":
            assert meta["lokr_factor"] == "4"
        _check(got, want, base, f"{kind}/{fmt}")
        if fmt != "diffusers" and leaf in ("dora", "mixed"):
            with pytest.raises(LoRAError, match="written for ComfyUI relative to the base model's weights; read it with base="):
                read_lora(path)
        # convert to every other layout that holds the type, and back
        for to in ("bfl", "kohya", "diffusers"):
            if to == "diffusers" and leaf in ("lokr", "loha", "mixed"):
                continue
            out = convert_lora(path, tmp_path / f"{fmt}_to_{to}.safetensors", to, base=base)
            _check(read_lora(out, base=base)[0], want, base, f"{kind}/{fmt}->{to}")


def test_dora_diffusers_metadata(base, tmp_path):
    weights = _weights("dora", base, "peft")
    path = write_lora(tmp_path / "d.safetensors", weights, "diffusers")
    tensors, meta = mx.load(str(path), return_metadata=True)
    cfg = {k.removeprefix("transformer."): v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
    assert cfg["use_dora"] is True and cfg["r"] == 3 and cfg["lora_alpha"] == 3
    # the split q/k/v of a fused DoRA of rank 9 (stacked independent A's) are rank 9 each: in rank_pattern
    assert cfg["rank_pattern"]["transformer_blocks.0.attn.to_q"] == 9 == cfg["alpha_pattern"]["transformer_blocks.0.attn.to_q"]
    assert tensors["transformer.transformer_blocks.0.attn.to_k.lora_magnitude_vector"].shape == (32,)
    assert "transformer.norm_out.linear.lora_magnitude_vector" in tensors


# ---------------------------------------------------------------------------------------------
# ComfyUI. A faithful, minimal transcription of what ComfyUI's own LoRA loader does with FLUX.2 keys,
# read from comfyanonymous/ComfyUI (its GPL code is not copied into this repository):
#   comfy/lora.py::model_lora_keys_unet (stored version at 41444b5236c6): for every model weight
#     `diffusion_model.<k>.weight`: keys `lora_unet_<k with _>` and `diffusion_model.<k>`; for Flux
#     models, comfy/utils.py::flux_to_diffusers names with prefixes `transformer.`, `lycoris_` (dots as
#     '_') and `lora_transformer_`, the double blocks' q/k/v as row slices (offset) of the fused qkv.
#   comfy/lora.py::load_lora: per mapped key x, `x.alpha` and `x.dora_scale`, then each adapter's load;
#     every file key no adapter took is logged "lora key not loaded".
#   comfy/weight_adapter/lora.py (0323d8746da9), lokr.py (179c2d35c84b), loha.py (17adbb5cacc2):
#     calculate_weight; comfy/weight_adapter/base.py::weight_decompose as of tag v0.3.77 (output-axis
#     dora_scale, i.e. [out, 1], divides by the norm of the *base* weight's rows, + eps; Comfy-Org/ComfyUI
#     PR #15458 (open, 2026-08) describes this as current and proposes dividing by ‖W + ΔW‖ instead).
# Only the parts FLUX.2 files reach are transcribed (no conv/Tucker, no GLoRA/OFT, strength 1).
# test_real_comfyui_* check it against ComfyUI's own code (run against commit a125cd84b054).


def _comfy_key_map(base: dict, hidden: int) -> dict:
    key_map = {}
    for name in base:
        k = f"diffusion_model.{name}.weight"
        key_map["lora_unet_" + name.replace(".", "_")] = k
        key_map[f"diffusion_model.{name}"] = k
    n_double = 1 + max(int(n.split(".")[1]) for n in base if n.startswith("double_blocks."))
    for i in range(n_double):  # flux_to_diffusers: the q/k/v rows of the fused projections
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for j, n in enumerate(names):
                to = (f"diffusion_model.double_blocks.{i}.{stream}_attn.qkv.weight", (0, j * hidden, hidden))
                d = f"transformer_blocks.{i}.attn.{n}"
                key_map[f"transformer.{d}"] = key_map["lycoris_" + d.replace(".", "_")] = to
    return key_map


def _comfy_load_lora(lora: dict, to_load: dict) -> tuple[dict, list]:
    patches, loaded = {}, set()
    for x, target in to_load.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        loaded.update({f"{x}.alpha"} & lora.keys())
        dora_scale = lora.get(f"{x}.dora_scale")
        loaded.update({f"{x}.dora_scale"} & lora.keys())
        for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            if f"{x}.{up}" in lora:
                patches[target] = ("lora", lora[f"{x}.{up}"], lora[f"{x}.{down}"], alpha, dora_scale)
                loaded.update({f"{x}.{up}", f"{x}.{down}"})
                break
        hada = [f"{x}.hada_w{i}_{s}" for i in (1, 2) for s in "ab"]
        if hada[0] in lora:
            patches[target] = ("loha", *(lora[k] for k in hada), alpha, dora_scale)
            loaded.update(hada)
        lokr = {s: lora.get(f"{x}.lokr_{s}") for s in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b")}
        loaded.update(f"{x}.lokr_{s}" for s, v in lokr.items() if v is not None)
        if any(lokr[s] is not None for s in ("w1", "w2", "w1_a", "w2_a")):
            patches[target] = ("lokr", lokr, alpha, dora_scale)
    return patches, [k for k in lora if k not in loaded]


def _comfy_weight_decompose(dora_scale, weight, lora_diff, alpha):
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:  # output axis: the norm of the base weight
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        weight_norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm)


def _comfy_calculate_weight(patch, weight):
    kind, dora_scale = patch[0], patch[-1]
    if kind == "lora":
        _, up, down, alpha, _ = patch
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = up @ down
    elif kind == "loha":
        _, w1a, w1b, w2a, w2b, alpha, _ = patch
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        diff = (w1a @ w1b) * (w2a @ w2b)
    else:
        _, t, alpha, _ = patch
        dim = None
        if t["w1"] is None:
            dim, w1 = t["w1_b"].shape[0], t["w1_a"] @ t["w1_b"]
        else:
            w1 = t["w1"]
        if t["w2"] is None:
            dim, w2 = t["w2_b"].shape[0], t["w2_a"] @ t["w2_b"]
        else:
            w2 = t["w2"]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2)
    diff = diff.reshape(weight.shape)
    if dora_scale is not None:
        return _comfy_weight_decompose(dora_scale, weight, diff, scale)
    return weight + scale * diff


def comfy_apply(path, base: dict) -> tuple[dict, list]:
    """ComfyUI's result for the file at `path` on the model `base`: ({BFL module: new weight}, keys not loaded)."""
    from safetensors.torch import load_file

    lora = load_file(str(path))
    sd = {f"diffusion_model.{n}.weight": torch.tensor(np.array(w)) for n, w in base.items()}
    hidden = base["double_blocks.0.img_attn.proj"].shape[0]
    patches, not_loaded = _comfy_load_lora(lora, _comfy_key_map(base, hidden))
    for target, patch in patches.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        w = sd[key]
        if offset is not None:  # comfy/lora.py::calculate_weight narrows the weight to the slice
            w[offset[1] : offset[1] + offset[2]] = _comfy_calculate_weight(patch, w[offset[1] : offset[1] + offset[2]].clone())
        else:
            sd[key] = _comfy_calculate_weight(patch, w)
    return {k.removeprefix("diffusion_model.").removesuffix(".weight"): v.numpy() for k, v in sd.items()}, not_loaded


def _kind_weights(kind: str, base):
    """A file's weights: one type on every layer, LyCORIS's split q/k/v parts ("split-TYPE"), or the
    four types taking turns over the layers ("mixed")."""
    if kind.startswith("split-"):
        return _weights(kind[6:], base, "lycoris")
    if kind == "mixed":
        per = {t: _weights(t, base, seed=i) for i, t in enumerate(TYPES)}
        return {n: per[TYPES[j % 4]][n] for j, n in enumerate(base)}
    return _weights(kind, base)


@pytest.mark.parametrize("kind", TYPES + ("split-lokr", "split-loha", "mixed"))
@pytest.mark.parametrize("fmt", ("kohya", "bfl"))
def test_comfyui_loads_what_we_write(base, tmp_path, kind, fmt):
    """Every key of every file mflux2 writes for ComfyUI (every type, every block type) is loaded by
    ComfyUI's loader and gives the weight change of mflux2's delta()."""
    weights = _kind_weights(kind, base)
    path = write_lora(tmp_path / "c.safetensors", weights, fmt, base=base)
    new, not_loaded = comfy_apply(path, base)
    assert not_loaded == []
    for name, w in weights.items():
        want = np.array(base[name]) + np.array(w.delta(base[name]))
        np.testing.assert_allclose(new[name], want, rtol=1e-4, atol=2e-5, err_msg=name)


def test_comfyui_dora_scale_is_relative_to_the_base(base, tmp_path):
    """Why the ComfyUI form of DoRA needs the base weights: LyCORIS's own dora_scale (= m) is applied
    by ComfyUI with the base weight's row norms, which is not DoRA once the adapter changes the rows."""
    tensors, expected, _ = _file("kohya", "dora", base)
    mx.save_safetensors(str(tmp_path / "lycoris.safetensors"), tensors)
    new, not_loaded = comfy_apply(tmp_path / "lycoris.safetensors", base)
    assert not_loaded == []
    name = "single_blocks.0.linear1"
    ours = np.array(base[name]) + expected[name]
    assert np.abs(new[name] - ours).max() > 1e-2 * np.abs(ours).max()


def _import_comfy():
    """ComfyUI's own modules from the checkout at COMFYUI_PATH, on the CPU. comfy.model_base imports
    torchvision (for comfy/ldm/cosmos, not for LoRAs): a stand-in is put in when it is not installed."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    argv, sys.argv = sys.argv, sys.argv[:1] + ["--cpu"]  # comfy.cli_args reads the command line
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        try:
            import torchvision  # noqa: F401
        except ModuleNotFoundError:
            from unittest import mock

            sys.modules["torchvision"] = mock.MagicMock(__path__=[], __spec__=None)
        import comfy.lora
        import comfy.model_base
    finally:
        sys.argv = argv
    return comfy


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run its own loader")
@pytest.mark.parametrize("kind", TYPES + ("split-lokr", "split-loha", "mixed"))
@pytest.mark.parametrize("fmt", ("kohya", "bfl"))
def test_real_comfyui_matches_transcription(base, tmp_path, kind, fmt, caplog):
    """The same files through ComfyUI's own comfy.lora.model_lora_keys_unet (on a stand-in Flux2, or
    Flux, model object holding the base weights), load_lora and calculate_weight: every key loaded,
    and the weights equal the transcription's and base + mflux2's delta()."""
    import logging

    from safetensors.torch import load_file

    comfy = _import_comfy()
    weights = _kind_weights(kind, base)
    path = write_lora(tmp_path / "c.safetensors", weights, fmt, base=base)
    sd = {f"diffusion_model.{n}.weight": torch.tensor(np.array(w)) for n, w in base.items()}
    flux = getattr(comfy.model_base, "Flux2", comfy.model_base.Flux)
    model = flux.__new__(flux)
    torch.nn.Module.__init__(model)
    object.__setattr__(model, "state_dict", lambda: sd)
    hidden = base["double_blocks.0.img_attn.proj"].shape[0]
    model.model_config = types.SimpleNamespace(unet_config={"image_model": "flux2", "depth": 2, "depth_single_blocks": 2,
                                                            "hidden_size": hidden})
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(load_file(str(path)), key_map)
    assert "not loaded" not in caplog.text
    for target, patch in patches.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        sd[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, offset, None)], sd[key], key)
    ours, _ = comfy_apply(path, base)
    for name, w in weights.items():
        got = sd[f"diffusion_model.{name}.weight"].numpy()
        np.testing.assert_allclose(got, ours[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got, np.array(base[name]) + np.array(w.delta(base[name])), rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run its own loader")
def test_real_comfyui_lycoris_dora_scale(base, tmp_path):
    """ComfyUI's own weight_decompose on a LyCORIS-form dora_scale (= m): the transcription's result
    (base-weight norm), which is not DoRA's — why mflux2 writes the base-relative form."""
    comfy = _import_comfy()
    tensors, expected, _ = _file("kohya", "dora", base)
    name = "single_blocks.0.linear1"
    k = "lora_unet_" + name.replace(".", "_")
    t = {s: torch.tensor(np.array(tensors[f"{k}.{s}"])) for s in ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")}
    w = torch.tensor(np.array(base[name]))
    patches = comfy.lora.load_lora({f"{k}.{s}": v for s, v in t.items()}, {k: f"diffusion_model.{name}.weight"})
    got = comfy.lora.calculate_weight([(1.0, patches[f"diffusion_model.{name}.weight"], 1.0, None, None)], w.clone(), name).numpy()
    mx.save_safetensors(str(tmp_path / "l.safetensors"), {f"{k}.{s}": mx.array(v.numpy()) for s, v in t.items()})
    ours, _ = comfy_apply(tmp_path / "l.safetensors", base)
    np.testing.assert_allclose(got, ours[name], rtol=1e-5, atol=1e-6)
    dora = np.array(base[name]) + expected[name]
    assert np.abs(got - dora).max() > 1e-2 * np.abs(dora).max()


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT, run: the transformer output with the file loaded by diffusers equals mflux2's
# transformer with `delta(base)` added to its weights (float32, rel. err <= 1e-4).


def _diffusers_vs_mflux2(tmp_path, weights: dict, fmt: str, base_model) -> float:
    import diffusers
    from mlx.utils import tree_unflatten

    from mflux2.models.transformer import load_transformer
    from test_transformer import make_inputs, make_reference, mlx_output, reference_output, rel_err

    path = write_lora(tmp_path / f"{fmt}.safetensors", weights, fmt)
    model = load_transformer(base_model, dtype=mx.float32)
    params = dict(tree_flatten(model.parameters()))
    model.update(tree_unflatten([(f"{n}.weight", params[f"{n}.weight"] + w.delta(params[f"{n}.weight"]))
                                 for n, w in weights.items()]))
    pipe = diffusers.Flux2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                   tokenizer=None, transformer=make_reference(True))
    inputs, guidance = make_inputs(), np.array([3.5, 1.0], np.float32)
    plain = reference_output(pipe.transformer, *inputs, guidance=guidance)
    pipe.load_lora_weights(str(path))
    theirs = reference_output(pipe.transformer, *inputs, guidance=guidance)
    ours = mlx_output(model, *inputs, guidance=guidance)
    assert rel_err(ours, plain) > 1e-2  # the adapter changes the output
    return rel_err(ours, theirs)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    from test_transformer import make_reference

    root = tmp_path_factory.mktemp("dev_model")
    make_reference(True).save_pretrained(root / "transformer")
    return root


def test_diffusers_loads_our_dora(base, dev_folder, tmp_path):
    """DoRA written in the diffusers layout (split q/k/v from a fused DoRA with independent A's, the
    final adaLN's halves swapped, PEFT metadata with use_dora) through Flux2Pipeline.load_lora_weights."""
    pytest.importorskip("peft")
    weights = _weights("dora", base, "peft", seed=4)
    assert rel_err_ok(_diffusers_vs_mflux2(tmp_path, weights, "diffusers", dev_folder))


def test_diffusers_loads_our_lokr(base, dev_folder, tmp_path):
    """LoKr in the bfl layout (ai-toolkit's `diffusion_model.` + BFL names), which diffusers 0.42.1
    converts onto its fused to_qkv projections. Without the final adaLN layer: diffusers maps it
    without swapping its [shift; scale] halves (as for LoRA; see docs/lora.md), and only layers whose
    W1 is whole (LyCORIS's usual layout): PEFT's LoKr has no factored W1 beside a whole W2."""
    pytest.importorskip("peft")
    weights = {n: w for n, w in _weights("lokr", base, seed=5).items()
               if n != "final_layer.adaLN_modulation.1" and w.w1 is not None}
    assert {w.w2 is None for w in weights.values()} == {True, False}  # W2 factored and whole
    assert rel_err_ok(_diffusers_vs_mflux2(tmp_path, weights, "bfl", dev_folder))


def rel_err_ok(err: float) -> bool:
    assert err <= 1e-4, err
    return True


# ---------------------------------------------------------------------------------------------
# --lora from the Hugging Face hub, through a fake offline cache (no network)


def test_lora_from_hub_cache(base, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from test_hub import add_to_cache

    from mflux2.lora_formats import resolve_lora_file

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lokr = write_lora(tmp_path / "lokr.safetensors", _weights("lokr", base), "kohya").read_bytes()
    dora = write_lora(tmp_path / "dora.safetensors", _weights("dora", base, "peft"), "diffusers").read_bytes()
    one = add_to_cache(cache, "someone/style-lokr", {"style.safetensors": lokr, "README.md": b"# style"})
    add_to_cache(cache, "someone/two", {"a.safetensors": lokr, "sub/b.safetensors": dora})

    path = resolve_lora_file("someone/style-lokr")  # exactly one .safetensors: that one
    assert path == one / "style.safetensors"
    assert type(read_lora(path)[0]["single_blocks.0.linear1"]) is LoKrWeights
    assert resolve_lora_file("someone/two/sub/b.safetensors").read_bytes() == dora
    assert resolve_lora_file(tmp_path / "lokr.safetensors") == tmp_path / "lokr.safetensors"  # local files first
    with pytest.raises(LoRAError, match=r"^someone/two: .*has 2 .safetensors files \(a.safetensors, sub/b.safetensors\) in someone/two; "
                                        r"name one as someone/two/<file>.safetensors$"):
        resolve_lora_file("someone/two")
    with pytest.raises(LoRAError, match=r"^someone/two/c.safetensors: c.safetensors is not in the Hugging Face cache .* \(offline mode is on\)"):
        resolve_lora_file("someone/two/c.safetensors")
    with pytest.raises(LoRAError, match=r"^someone/absent: someone/absent is not in the Hugging Face cache"):
        resolve_lora_file("someone/absent")
    (tmp_path / "loras").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoRAError, match=r"^loras/style.safetensors: no such file"):  # a local folder: a typo, not a repo
        resolve_lora_file("loras/style.safetensors")

    # the generate CLI and the pipeline components take the same names
    from mflux2 import cli

    args = cli.generate_parser().parse_args(["--model", "klein-4b", "--prompt", "x", "--lora", "someone/style-lokr:0.7"])
    assert cli._resolve_loras(args.lora) == [(str(one / "style.safetensors"), 0.7)]
    with pytest.raises(LoRAError, match="^--lora someone/two: "):  # the error names the option
        cli._resolve_loras(["someone/two"])
    # the resolver lora.init_from uses too: an mflux2 output folder (lora_final.safetensors beside checkpoints)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lora_final.safetensors").write_bytes(lokr)
    (tmp_path / "run" / "other.safetensors").write_bytes(lokr)
    assert cli._resolve_loras([f"{tmp_path / 'run'}:0.5"]) == [(str(tmp_path / "run" / "lora_final.safetensors"), 0.5)]
    assert resolve_lora_file("someone/absent", local_only=True) is None  # the dry run: the cache only


def test_convert_script_with_base(base, dev_folder, tmp_path):
    """scripts/convert_lora.py: DoRA from the diffusers layout to ComfyUI's kohya layout needs --base."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    weights = _weights("dora", base, "peft")
    src = write_lora(tmp_path / "d.safetensors", weights, "diffusers")
    run = lambda *a: subprocess.run([sys.executable, str(root / "scripts" / "convert_lora.py"), str(src), *a],  # noqa: E731
                                    capture_output=True, text=True)
    r = run(str(tmp_path / "k.safetensors"), "--format", "kohya")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pass base=" in r.stderr
    r = run(str(tmp_path / "k.safetensors"), "--format", "kohya", "--base", str(dev_folder))
    assert r.returncode == 0, r.stderr
    want = {n: np.array(w.delta(base[n])) for n, w in weights.items()}
    _check(read_lora(tmp_path / "k.safetensors", base=base)[0], want, base)
    new, not_loaded = comfy_apply(tmp_path / "k.safetensors", base)
    assert not not_loaded and np.allclose(new["img_in"], np.array(base["img_in"]) + want["img_in"], rtol=1e-4, atol=2e-5)


def test_lone_alpha_and_missing_tensors(base):
    t = {"lora_unet_img_in.alpha": mx.array(4.0), "lora_unet_txt_in.hada_w1_a": mx.ones((32, 2)),
         "lora_unet_txt_in.hada_w1_b": mx.ones((2, 24)), "lora_unet_txt_in.hada_w2_a": mx.ones((32, 2))}
    with pytest.raises(LoRAError, match="^f: LoHa module lora_unet_txt_in has no hada_w2_b tensor$"):
        parse_lora(t, source="f")
    t["lora_unet_txt_in.hada_w2_b"] = mx.ones((2, 24))
    weights, unknown = parse_lora(t)
    assert unknown == ["lora_unet_img_in.alpha"] and list(weights) == ["txt_in"]
    assert weights["txt_in"].alpha == 2.0  # no alpha: scale 1


def test_lora_from_hub_online_paths(tmp_path, monkeypatch):
    """Online (no network: huggingface_hub's calls replaced): the repo's file list picks the file, and
    huggingface_hub's errors become one line naming the id."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    from test_hub import http_response

    from mflux2.lora_formats import resolve_lora_file

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    files = {"someone/one": ["README.md", "lora.safetensors"], "someone/none": ["README.md"]}
    got = []

    def list_repo_files(repo, **kw):
        if repo == "someone/absent":
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=http_response(404, "u"))
        if repo == "someone/gated":
            raise GatedRepoError("401 Client Error. Cannot access gated repo", response=http_response(401, "u"))
        return files[repo]

    def hf_hub_download(repo, filename, **kw):
        if filename == "missing.safetensors":
            raise EntryNotFoundError("404 Client Error. Entry Not Found")
        got.append((repo, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert resolve_lora_file("someone/one") == tmp_path / "lora.safetensors" and got == [("someone/one", "lora.safetensors")]
    with pytest.raises(LoRAError, match=r"^someone/none: the Hugging Face hub has no .safetensors file in someone/none"):
        resolve_lora_file("someone/none")
    with pytest.raises(LoRAError, match=r"^someone/absent: no such local file, and no repo someone/absent on the Hugging Face hub"):
        resolve_lora_file("someone/absent")
    with pytest.raises(LoRAError, match=r"^someone/gated: someone/gated is gated"):
        resolve_lora_file("someone/gated")
    with pytest.raises(LoRAError, match=r"^someone/one/missing.safetensors: the hub repo someone/one has no file missing.safetensors$"):
        resolve_lora_file("someone/one/missing.safetensors")


def test_lycoris_lokr_reads_as_diffusers_does(base, dev_folder, tmp_path):
    """A LyCORIS LoKr file (SimpleTuner's layout: lycoris_ + diffusers names, q/k/v split) read by
    mflux2 (split q/k/v -> SplitWeights) gives the transformer output diffusers gives when it loads
    the same file. Block layers only, W1 whole: what diffusers' LyCORIS converter and PEFT's LoKr hold."""
    pytest.importorskip("peft")
    import diffusers
    from mlx.utils import tree_unflatten

    from mflux2.models.transformer import load_transformer
    from test_transformer import make_inputs, make_reference, mlx_output, reference_output, rel_err

    g = np.random.default_rng(8)
    tensors = {}
    for d, (b, part) in _DIFFUSERS_NAMES.items():
        if "{i}" not in d:
            continue
        for i in (0, 1):
            w = np.array(base[b.replace("{i}", str(i))])
            rows = w.shape[0] // 3 if part in (0, 1, 2) else w.shape[0]
            t = _adapter("lokr", rows, w.shape[1], g, variant=(i + (part or 0)) % 2)
            tensors.update(_emit("lycoris", d.replace("{i}", str(i)), t))
    path = tmp_path / "lycoris.safetensors"
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in tensors.items()})
    weights, _ = read_lora(path)
    assert isinstance(weights["double_blocks.0.img_attn.qkv"], SplitWeights)

    model = load_transformer(dev_folder, dtype=mx.float32)
    params = dict(tree_flatten(model.parameters()))
    model.update(tree_unflatten([(f"{n}.weight", params[f"{n}.weight"] + w.delta(params[f"{n}.weight"])) for n, w in weights.items()]))
    pipe = diffusers.Flux2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                   tokenizer=None, transformer=make_reference(True))
    pipe.load_lora_weights(str(path))
    inputs, guidance = make_inputs(), np.array([3.5, 1.0], np.float32)
    theirs = reference_output(pipe.transformer, *inputs, guidance=guidance)
    ours = mlx_output(model, *inputs, guidance=guidance)
    assert rel_err(ours, mlx_output(load_transformer(dev_folder, dtype=mx.float32), *inputs, guidance=guidance)) > 1e-2
    assert rel_err(ours, theirs) <= 1e-4


def test_peft_dora_reads_as_peft_applies(dev_folder, tmp_path):
    """A DoRA trained the diffusers way (PEFT use_dora on the split q/k/v and other layers, lora_alpha
    != r, magnitudes moved off their initial norms) saved by save_lora_weights: mflux2's DoRAWeights
    deltas give PEFT's transformer output."""
    pytest.importorskip("peft")
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from test_transformer import make_reference

    ref = make_reference(True)
    config = LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False, target_modules=(
        r".*(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_qkv_mlp_proj)"
        r"|single_transformer_blocks\.\d+\.attn\.to_out|ff\.linear_in|x_embedder|norm_out\.linear)$"))
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    diffusers.Flux2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                              transformer_lora_adapter_metadata=config.to_dict())
    weights, _ = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert {type(w) for w in weights.values()} == {DoRAWeights} and len(weights) == 2 * 4 + 2 * 2 + 2

    _assert_base_plus_delta_matches(dev_folder, weights, ref)


def _assert_base_plus_delta_matches(dev_folder, weights, ref):
    """mflux2's transformer with each layer's delta(base) added equals the reference model carrying
    the adapter (float32, rel <= 1e-4), and the adapter changes the output (> 1e-2)."""
    from mlx.utils import tree_unflatten

    from mflux2.models.transformer import load_transformer
    from test_transformer import make_inputs, make_reference, mlx_output, reference_output, rel_err

    model = load_transformer(dev_folder, dtype=mx.float32)
    params = dict(tree_flatten(model.parameters()))
    model.update(tree_unflatten([(f"{n}.weight", params[f"{n}.weight"] + w.delta(params[f"{n}.weight"])) for n, w in weights.items()]))
    inputs, guidance = make_inputs(), np.array([3.5, 1.0], np.float32)
    theirs = reference_output(ref, *inputs, guidance=guidance)
    assert rel_err(theirs, reference_output(make_reference(True), *inputs, guidance=guidance)) > 1e-2
    assert rel_err(mlx_output(model, *inputs, guidance=guidance), theirs) <= 1e-4


LYCORIS_CONFIGS = {  # (algo, kwargs) for lycoris.create_lycoris; expected mflux2 class on a fused qkv
    "lokr": ("lokr", dict(factor=4), SplitWeights),
    "lokr-full": ("lokr", dict(factor=4, full_matrix=True), SplitWeights),  # both halves whole: alpha ignored
    "loha": ("loha", {}, SplitWeights),
    "locon": ("locon", {}, LoRAWeights),
    "dora": ("locon", dict(dora_wd=True), DoRAWeights),  # wd_on_out (LyCORIS's default): dora_scale [out, 1]
}


@pytest.mark.parametrize("config", list(LYCORIS_CONFIGS))
def test_lycoris_library_files(dev_folder, tmp_path, config):
    """Files saved by the LyCORIS library itself (lycoris-lora, wrapping diffusers' FLUX.2 transformer
    as SimpleTuner does), with random non-zero weights: mflux2's deltas give LyCORIS's own forward."""
    lycoris = pytest.importorskip("lycoris")
    from test_transformer import make_reference

    algo, kw, cls = LYCORIS_CONFIGS[config]
    ref = make_reference(True)
    lycoris.LycorisNetwork.apply_preset({"target_module": [], "use_fnmatch": False,
                                         "target_name": [r".*transformer_blocks.*attn.*", r".*\.ff.*", "x_embedder", "proj_out"]})
    net = lycoris.create_lycoris(ref, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_(p + torch.randn(p.shape, generator=g) * 0.2)  # dora_scale: near its initial row norms
    net.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    weights, _ = read_lora(tmp_path / "l.safetensors")
    assert len(weights) == 2 * 8 + 2 * 2 + 2 and type(weights["double_blocks.1.img_attn.qkv"]) is cls

    _assert_base_plus_delta_matches(dev_folder, weights, ref)
