"""Every tensor a loader returns is, bit for bit, the file's tensor after the key mapping and the cast
(or that tensor quantised), in each real layout; and a load that casts or quantises never holds the
file's tensors beside the model's.

The expected tensors come from the files through mappings written in the tests (tests/test_transformer.py's
`to_bfl`, the prefixes below), never from mflux2's own `sanitize`, so a dropped key rule, cast or
q/k/v concatenation fails here even where the output would stay close."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.torch import load_file, save_file

import mflux2.models.quantization as qmod
from mflux2.model_files import load_component, save_component
from mflux2.models.text_encoder import _quant_predicate, load_text_encoder
from mflux2.models.transformer import Flux2Transformer, TransformerConfig, load_transformer
from tests.test_text_encoder import mistral3_model, qwen3_model, save_model_folder
from tests.test_transformer import TINY, make_reference, to_bfl
from tests.tiny_tokenizers import build_mistral_tokenizer, build_qwen3_tokenizer


def raw_bits(a: mx.array) -> np.ndarray:
    """The stored bits (so -0.0 differs from 0.0 and a NaN equals itself)."""
    return np.array(a.view({1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size]))


def assert_identical(got: dict[str, mx.array], expected: dict[str, mx.array]) -> None:
    assert got.keys() == expected.keys(), (sorted(got.keys() - expected.keys())[:3], sorted(expected.keys() - got.keys())[:3])
    for k, e in expected.items():
        g = got[k]
        assert g.dtype == e.dtype, (k, g.dtype, e.dtype)
        assert g.shape == e.shape, (k, g.shape, e.shape)
        assert np.array_equal(raw_bits(g), raw_bits(e)), k


def cast(t: torch.Tensor, dtype: mx.Dtype) -> mx.array:
    """A file tensor in `dtype`, cast by MLX as a load casts (float32 holds bf16 and fp32 exactly)."""
    return mx.array(t.float().numpy()).astype(dtype)


def params(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


# ------------------------------------------------------------------------------------------------
# transformer: diffusers folder, BFL file, BFL file with the ComfyUI prefix; file bf16 or float32


WIDE = dict(num_attention_heads=4)  # hidden 64: the blocks' layers quantise (groups of 64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_exact")
    out = {}
    for file_dtype in (torch.bfloat16, torch.float32):
        ref = make_reference(False, seed=7, **WIDE).to(file_dtype)
        name = str(file_dtype).split(".")[1]
        ref.save_pretrained(root / f"diffusers-{name}" / "transformer")
        bfl = to_bfl(ref.state_dict())
        save_file(bfl, str(root / f"bfl-{name}.safetensors"))
        save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, str(root / f"bfl-prefixed-{name}.safetensors"))
        out[name] = bfl
    return root, out


def expected_transformer(bfl: dict, dtype: mx.Dtype, quantize: str | None) -> dict[str, mx.array]:
    """The file's tensors in `dtype` under our names; quantised as the old path did: all loaded, then
    the large layers outside the blocks, then every block's Linear layers."""
    model = Flux2Transformer(TransformerConfig(**{**TINY, **WIDE}))
    model.update(tree_unflatten([(k, cast(v, dtype)) for k, v in bfl.items()]))
    if quantize:
        bits, group = qmod.quant_settings(quantize, None, dtype)
        qmod.quantize_outside_blocks(model, bits, group)
        nn.quantize(model, class_predicate=lambda p, m: p.startswith(("double_blocks", "single_blocks"))
                    and qmod.quantize_predicate(group, bits)(p, m))
    mx.eval(model.parameters())
    return params(model)


@pytest.mark.parametrize("layout", ["diffusers", "bfl", "bfl-prefixed"])
@pytest.mark.parametrize("file_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bf16", "fp32"])
def test_transformer_load_is_the_file(checkpoints, layout, file_dtype, dtype):
    root, bfl = checkpoints
    path = root / f"diffusers-{file_dtype}" if layout == "diffusers" else root / f"{layout}-{file_dtype}.safetensors"
    assert_identical(params(load_transformer(path, dtype=dtype)), expected_transformer(bfl[file_dtype], dtype, None))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
@pytest.mark.parametrize("outside_blocks", [False, True], ids=["blocks", "blocks+outside"])
def test_transformer_quantised_on_load_is_the_file_quantised(checkpoints, quantize, layout, outside_blocks, monkeypatch):
    if outside_blocks:  # the tiny layers outside the blocks are below the size floor: lower it
        monkeypatch.setattr(qmod, "OUTSIDE_BLOCKS_MIN_WEIGHTS", 0)
    root, bfl = checkpoints
    path = root / "diffusers-bfloat16" if layout == "diffusers" else root / "bfl-bfloat16.safetensors"
    model = load_transformer(path, dtype=mx.bfloat16, quantize=quantize)
    assert isinstance(model.double_blocks[0].img_attn.qkv, nn.QuantizedLinear)
    assert isinstance(model.double_stream_modulation_img.lin, nn.QuantizedLinear) == outside_blocks
    assert_identical(params(model), expected_transformer(bfl["bfloat16"], mx.bfloat16, quantize))


def test_converted_folder_load_is_the_file(checkpoints, tmp_path):
    """load_component (scripts/convert.py's folders): stored int8 + bf16, loaded in bf16 and float32."""
    root, bfl = checkpoints
    stored = load_transformer(root / "diffusers-bfloat16", dtype=mx.bfloat16, quantize="int8")
    save_component(stored, tmp_path / "transformer", {})
    files = {}
    for f in (tmp_path / "transformer").glob("*.safetensors"):
        files.update(mx.load(str(f)))
    for dtype in (mx.bfloat16, mx.float32):
        model = load_component(Flux2Transformer(TransformerConfig(**{**TINY, **WIDE})), tmp_path / "transformer", dtype,
                               {"bits": 8})
        expected = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in files.items()}
        assert_identical(params(model), expected)


# ------------------------------------------------------------------------------------------------
# text encoder: Qwen3 (klein) and Mistral3 (dev) folders, sharded, float32 files


LM_PREFIXES = ("model.language_model.", "language_model.model.", "model.")  # Mistral3 (either), Qwen3


def expected_backbone(folder, dtype, built: int) -> dict[str, mx.array]:
    out = {}
    for f in sorted((folder / "text_encoder").glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            prefix = next((p for p in LM_PREFIXES if k.startswith(p)), None)
            m = re.match(r"layers\.(\d+)\.", k[len(prefix) :]) if prefix else None
            if prefix is None or (m and int(m.group(1)) >= built):
                continue  # lm_head, the vision tower and projector, layers past the deepest taken
            out[k[len(prefix) :]] = cast(v, dtype)
    return out


@pytest.fixture(scope="module")
def te_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_exact")
    save_model_folder(root / "qwen3", qwen3_model(layers=4, hidden=64, intermediate=128, heads=4, kv=2, head_dim=16),
                      build_qwen3_tokenizer)
    save_model_folder(root / "mistral", mistral3_model(layers=4, hidden=64, intermediate=128, heads=4, kv=2, head_dim=16),
                      build_mistral_tokenizer)
    return root


@pytest.mark.parametrize("family,variant", [("qwen3", "klein-4b"), ("mistral", "dev")])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_text_encoder_load_is_the_file(te_folders, family, variant, dtype, quantize):
    folder = te_folders / family
    kw = dict(dtype=dtype, max_length=64, hidden_layers=(1, 3))
    plain = params(load_text_encoder(folder, variant, **kw).model)
    assert_identical(plain, expected_backbone(folder, dtype, 3))
    if quantize:  # the old path's result: the plain load (the file, checked above) quantised after
        enc = load_text_encoder(folder, variant, quantize=quantize, **kw)
        ref = load_text_encoder(folder, variant, **kw).model
        nn.quantize(ref, class_predicate=_quant_predicate(qmod.QUANT_BITS[quantize]))
        mx.eval(ref.parameters())
        assert isinstance(enc.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert_identical(params(enc.model), params(ref))


# ------------------------------------------------------------------------------------------------
# memory: a cast or a quantisation on load holds one module's file tensors at a time


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """Blocks hold nearly all the weights (12 of them), as in the real models."""
    root = tmp_path_factory.mktemp("deep")
    ref = make_reference(False, seed=3, num_attention_heads=8, num_layers=2, num_single_layers=10).to(torch.bfloat16)
    ref.save_pretrained(root / "transformer")
    return root, sum(p.numel() * 2 for p in ref.parameters())


@pytest.mark.parametrize("dtype,quantize", [(mx.bfloat16, "int8"), (mx.float32, None)], ids=["int8", "bf16->fp32"])
def test_load_peak_is_the_model_plus_a_module(deep_checkpoint, dtype, quantize):
    root, file_bytes = deep_checkpoint
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_transformer(root, dtype=dtype, quantize=quantize)
    peak = mx.get_peak_memory() - before
    kept = sum(v.nbytes for v in params(model).values())
    # one block is < 1/10 of the file; the file's tensors all held beside the model would be + file_bytes
    assert peak <= kept + 0.25 * file_bytes, (peak, kept, file_bytes)
