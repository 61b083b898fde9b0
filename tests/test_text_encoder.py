"""FLUX.2 text encoders (mflux2.models.text_encoder) against diffusers + transformers.

References are diffusers' own prompt-embedding helpers (`Flux2KleinPipeline._get_qwen3_prompt_embeds`,
`Flux2Pipeline._get_mistral_3_small_prompt_embeds`) run on tiny random transformers models
(Qwen3ForCausalLM, Mistral3ForConditionalGeneration with a small Pixtral vision tower) saved as
sharded `text_encoder/` folders, with the tiny tokenizers of tests/tiny_tokenizers.py. Every position
is compared, padding included, in float32 with relative error <= 1e-4.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import save_file
from safetensors.torch import load_file, save_file as save_torch
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PixtralVisionConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mflux2.models.text_encoder import (
    MISTRAL_LAYERS,
    QWEN3_LAYERS,
    SYSTEM_MESSAGE,
    PromptTruncatedWarning,
    family_of,
    load_text_encoder,
)
from mflux2.weights import WeightsError
from tiny_tokenizers import TINY_VOCAB, build_mistral_tokenizer, build_qwen3_tokenizer

SHORT = "a cat"
MEDIUM = "an oil painting of a lighthouse at dusk, dramatic clouds, warm light"
LONG = (
    "A close-up portrait of an old fisherman with a grey beard and a blue hat, standing on a wooden pier "
    "at sunrise; behind him the sea, small boats, gulls and a red lighthouse. "
) * 2
PROMPTS = [MEDIUM, SHORT, LONG]  # different lengths in one batch; LONG is truncated at these lengths
QWEN3_L, MISTRAL_L = 64, 128  # max_length for the small-model tests (SHORT/MEDIUM fit, LONG does not)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random, non-degenerate weights: norms 1 ± 0.1, embeddings N(0, 1), matrices N(0, 1/fan_in).
    (The default init zeroes the pad token's embedding, which would hide padding bugs.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def qwen3_model(layers=4, hidden=32, intermediate=64, heads=4, kv=2, head_dim=8):
    cfg = Qwen3Config(
        vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_theta=1e6,
        tie_word_embeddings=False, max_position_embeddings=1024,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg).eval()
    randomize(model)
    return model


def mistral3_model(layers=4, hidden=32, intermediate=64, heads=4, kv=2, head_dim=8):
    text = MistralConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_theta=1e9, pad_token_id=11,
        max_position_embeddings=1024,
    )  # fmt: skip
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8, image_size=28, patch_size=14
    )
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, image_token_index=10)).eval()
    randomize(model)
    return model


def save_model_folder(root, model, build_tokenizer):
    """A diffusers-style model folder: sharded text_encoder/ (+ index) and tokenizer/."""
    model.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    return build_tokenizer(root / "tokenizer")


def reference(family, model, tokenizer, prompts, max_length, layers, attn="sdpa"):
    """prompt_embeds as diffusers computes them (float32, CPU)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    model.set_attn_implementation(attn)
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), max_sequence_length=max_length, hidden_states_layers=layers)
    with torch.no_grad():
        if family == "qwen3":
            out = Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tokenizer, prompts, **kw)
        else:
            out = Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, tokenizer, prompts, **kw)
    return out.numpy()


def encode(encoder, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        embeds, ids = encoder.encode(prompts)
    return np.array(embeds.astype(mx.float32)), np.array(ids)


def assert_close(ours, ref, tol=1e-4):
    """Relative error <= tol at EVERY position (each token row against its own scale)."""
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max(axis=-1)
    scale = np.abs(ref).max(axis=-1)
    worst = np.unravel_index(np.argmax(err / scale), err.shape)
    assert (err <= tol * scale).all(), f"rel. error {(err / scale)[worst]:.2e} at (batch, position) {worst}"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    model = qwen3_model()
    tok = save_model_folder(root, model, build_qwen3_tokenizer)
    return root, model, tok


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    model = mistral3_model()
    tok = save_model_folder(root, model, build_mistral_tokenizer)
    return root, model, tok


# ----------------------------------------------------------------------------------------------
# Parity


def test_qwen3_right_padding_truncation_and_batch(qwen3):
    root, model, tok = qwen3
    enc = load_text_encoder(root, "klein-4b", dtype=mx.float32, max_length=QWEN3_L, hidden_layers=(1, 2, 3))
    assert enc.padding_side == "right" and enc.joint_attention_dim == 3 * 32
    with pytest.warns(PromptTruncatedWarning, match=r"prompt 2 is \d+ tokens.*A close-up portrait"):
        embeds, ids = enc.encode(PROMPTS)
    with pytest.warns(PromptTruncatedWarning):
        _, mask = enc.tokenize(PROMPTS)
    assert mask[1, 0] == 1 and mask[1, -1] == 0 and mask[2].all()  # SHORT right-padded, LONG full
    assert_close(np.array(embeds), reference("qwen3", model, tok, PROMPTS, QWEN3_L, (1, 2, 3)))
    assert ids.dtype == mx.int32 and ids.shape == (3, QWEN3_L, 4)


def test_qwen3_left_padding(qwen3):
    root, model, tok = qwen3
    enc = load_text_encoder(root, "qwen3", dtype=mx.float32, max_length=QWEN3_L, hidden_layers=(1, 3))
    enc.tokenizer.padding_side = tok.padding_side = "left"
    try:
        ref = reference("qwen3", model, tok, PROMPTS, QWEN3_L, (1, 3))
    finally:
        tok.padding_side = "right"
    assert_close(encode(enc, PROMPTS)[0], ref)


def test_mistral3_left_padding_truncation_and_batch(mistral):
    root, model, tok = mistral
    enc = load_text_encoder(root, "dev", dtype=mx.float32, max_length=MISTRAL_L, hidden_layers=(1, 2, 3))
    assert enc.padding_side == "left"
    with pytest.warns(PromptTruncatedWarning, match="prompt 2"):
        embeds, _ = enc.encode(PROMPTS)
    with pytest.warns(PromptTruncatedWarning):
        ids, mask = enc.tokenize(PROMPTS)
    assert mask[1, 0] == 0 and mask[1, -1] == 1 and ids[1, 0] == tok.pad_token_id  # pads come first
    assert_close(np.array(embeds), reference("mistral", model, tok, PROMPTS, MISTRAL_L, (1, 2, 3)))


def test_mistral3_right_padding(mistral):
    root, model, tok = mistral
    enc = load_text_encoder(root, "mistral", dtype=mx.float32, max_length=MISTRAL_L, hidden_layers=(2, 3))
    enc.tokenizer.padding_side = tok.padding_side = "right"
    try:
        ref = reference("mistral", model, tok, PROMPTS, MISTRAL_L, (2, 3))
    finally:
        tok.padding_side = "left"
    assert_close(encode(enc, PROMPTS)[0], ref)


def test_fully_masked_rows_zero_matches_sdpa_uniform_matches_eager(mistral):
    """Left-pad query rows see no key. torch SDPA (CPU) outputs 0 there, eager attention (and cuDNN)
    spreads equal weights over all keys; each mode reproduces its reference and not the other."""
    root, model, tok = mistral
    layers, prompts = (1, 2, 3), [SHORT, MEDIUM]
    kw = dict(dtype=mx.float32, max_length=MISTRAL_L, hidden_layers=layers)
    sdpa = reference("mistral", model, tok, prompts, MISTRAL_L, layers, attn="sdpa")
    eager = reference("mistral", model, tok, prompts, MISTRAL_L, layers, attn="eager")
    zero = encode(load_text_encoder(root, "dev", masked_rows="zero", **kw), prompts)[0]
    uniform = encode(load_text_encoder(root, "dev", masked_rows="uniform", **kw), prompts)[0]
    assert_close(zero, sdpa)
    assert_close(uniform, eager)
    pads = slice(0, 10)  # SHORT has more than 10 pad positions at this length
    assert np.abs(sdpa[0, pads] - eager[0, pads]).max() > 1e-2 * np.abs(sdpa[0, pads]).max()
    assert np.allclose(sdpa[:, -20:], eager[:, -20:], rtol=1e-4, atol=1e-4)  # real tokens agree


def test_last_layer_is_final_normed_like_transformers(qwen3):
    """transformers' hidden_states[num_layers] is the final-normed output."""
    root, model, tok = qwen3
    enc = load_text_encoder(root, "klein-9b", dtype=mx.float32, max_length=QWEN3_L, hidden_layers=(4, 0, 2))
    assert_close(encode(enc, PROMPTS)[0], reference("qwen3", model, tok, PROMPTS, QWEN3_L, (4, 0, 2)))


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_real_layers_and_512_tokens(tmp_path, family):
    """The real defaults — (9, 18, 27) / (10, 20, 30) and 512 tokens — on deep, narrow models; only
    the layers up to the deepest one are built."""
    if family == "qwen3":
        model, variant, layers, n = qwen3_model(layers=28, hidden=16, intermediate=32, heads=2, kv=1), "klein-4b", QWEN3_LAYERS, 28
        tok = save_model_folder(tmp_path, model, build_qwen3_tokenizer)
    else:
        model, variant, layers, n = mistral3_model(layers=31, hidden=16, intermediate=32, heads=2, kv=1), "dev", MISTRAL_LAYERS, 31
        tok = save_model_folder(tmp_path, model, build_mistral_tokenizer)
    enc = load_text_encoder(tmp_path, variant, dtype=mx.float32)
    assert enc.max_length == 512 and enc.hidden_layers == layers and enc.num_layers == n
    assert len(enc.model.layers) == max(layers)
    embeds, ids = encode(enc, [SHORT, LONG])
    assert embeds.shape == (2, 512, 3 * 16)
    assert_close(embeds, reference(family, model, tok, [SHORT, LONG], 512, layers))
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    assert np.array_equal(ids, Flux2Pipeline._prepare_text_ids(torch.from_numpy(embeds)).numpy())


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts


def _rewrite_keys(src_dir, dst_dir, rename):
    """Copy a sharded checkpoint, renaming every key (shards and index)."""
    dst_dir.mkdir(parents=True)
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    index = json.loads((src_dir / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        save_torch({rename(k): v for k, v in load_file(src_dir / shard).items()}, dst_dir / shard)
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def _new_prefix(key: str) -> str:
    """transformers' in-memory Mistral3 names: model.language_model.*, model.vision_tower.*, lm_head."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    if key.startswith("language_model.lm_head."):
        return key.removeprefix("language_model.")
    if key.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + key
    return key


def test_mistral_key_prefixes_and_folder_forms(mistral, tmp_path):
    root, model, tok = mistral
    kw = dict(dtype=mx.float32, max_length=MISTRAL_L, hidden_layers=(1, 3))
    expected = encode(load_text_encoder(root, "dev", **kw), PROMPTS)[0]
    saved = set(json.loads((root / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"])
    assert any(k.startswith("language_model.model.") for k in saved) and any("vision_tower" in k for k in saved)

    # newer prefix, and the text_encoder/ folder given directly (tokenizer/ beside it)
    _rewrite_keys(root / "text_encoder", tmp_path / "new" / "text_encoder", _new_prefix)
    shutil.copytree(root / "tokenizer", tmp_path / "new" / "tokenizer")
    assert np.array_equal(encode(load_text_encoder(tmp_path / "new" / "text_encoder", "dev", **kw), PROMPTS)[0], expected)

    # a plain MistralForCausalLM folder with its tokenizer inside
    plain = MistralForCausalLM(model.config.text_config).eval()
    plain.model.load_state_dict(model.model.language_model.state_dict())
    plain.save_pretrained(tmp_path / "plain")
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, tmp_path / "plain" / f.name)
    assert np.array_equal(encode(load_text_encoder(tmp_path / "plain", "mistral", **kw), PROMPTS)[0], expected)


def test_unused_weights_are_never_read(mistral, tmp_path):
    """Vision tower, LM head and layers past the deepest one stay on disk (mx.load is lazy)."""
    root, _, _ = mistral
    shutil.copytree(root, tmp_path / "m")
    te = tmp_path / "m" / "text_encoder"
    big = np.ones((2048, 2048), np.float32)  # 16 MiB each
    extra = {"vision_tower.big.weight": big, "language_model.lm_head.big": big, "language_model.model.layers.3.big.weight": big}
    save_file(extra, te / "model-extra.safetensors")
    index = json.loads((te / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    (te / "model.safetensors.index.json").write_text(json.dumps(index))
    mx.clear_cache()
    mx.reset_peak_memory()
    enc = load_text_encoder(tmp_path / "m", "dev", dtype=mx.float32, max_length=MISTRAL_L, hidden_layers=(1, 3))
    # the tiny model itself is ~0.2 MiB; each unused tensor 16 MiB, so reading any one would exceed this
    # (4 MiB was exceeded once by 0.35 MiB in a full-suite run, with a state left by an earlier test)
    assert mx.get_peak_memory() < 8 * 2**20
    assert len(enc.model.layers) == 3


def test_release_frees_the_weights(qwen3):
    root, _, _ = qwen3
    enc = load_text_encoder(root, "klein-4b", dtype=mx.float32, max_length=QWEN3_L, hidden_layers=(1, 3))
    embeds, _ = enc.encode([SHORT])
    nbytes = sum(v.nbytes for _, v in tree_flatten(enc.model.parameters()))
    before = mx.get_active_memory()
    enc.release()
    assert enc.model is None and before - mx.get_active_memory() >= nbytes
    with pytest.raises(RuntimeError, match="released"):
        enc.encode([SHORT])
    assert embeds.shape == (1, QWEN3_L, 2 * 32)  # outputs stay valid


def test_load_errors(qwen3, mistral, tmp_path):
    root, _, _ = qwen3
    kw = dict(max_length=QWEN3_L, hidden_layers=(1, 2))
    with pytest.raises(ValueError, match="unknown text encoder variant 'klein-5b'"):
        load_text_encoder(root, "klein-5b")
    with pytest.raises(WeightsError, match="model_type 'qwen3' is not a mistral"):
        load_text_encoder(root, "dev", **kw)
    with pytest.raises(WeightsError, match="model_type 'mistral3' is not a qwen3"):
        load_text_encoder(mistral[0], "klein-4b", **kw)
    with pytest.raises(ValueError, match="has only 4 layers"):
        load_text_encoder(root, "klein-4b")  # (9, 18, 27) on a 4-layer model
    with pytest.raises(ValueError, match="quantize='int3'"):
        load_text_encoder(root, "klein-4b", quantize="int3", **kw)

    # a missing tensor / a wrongly shaped one: one line naming the folder and the key
    weights = {}
    for f in (root / "text_encoder").glob("*.safetensors"):
        weights.update(load_file(f))
    for name, edit, match in [
        ("missing", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), "missing key.*model.layers.1.mlp.up_proj.weight"),
        (
            "shape",
            lambda w: w.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(7)}),
            r"shape mismatch for model.layers.0.self_attn.q_norm.weight: checkpoint \(7,\), model \(8,\)",
        ),
    ]:
        bad = tmp_path / name
        (bad / "text_encoder").mkdir(parents=True)
        shutil.copy(root / "text_encoder" / "config.json", bad / "text_encoder")
        shutil.copytree(root / "tokenizer", bad / "tokenizer")
        w = dict(weights)
        edit(w)
        save_torch(w, bad / "text_encoder" / "model.safetensors")
        with pytest.raises(WeightsError, match=match) as e:
            load_text_encoder(bad, "klein-4b", **kw)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)

    no_tok = tmp_path / "no_tok"
    shutil.copytree(root / "text_encoder", no_tok / "text_encoder")
    with pytest.raises(WeightsError, match="no tokenizer found"):
        load_text_encoder(no_tok, "klein-4b", **kw)


def test_variants():
    import mflux2

    assert mflux2.load_text_encoder is load_text_encoder
    for v in ("klein-4b", "klein-9b", "klein-base-4b", "klein-base-9b", "qwen3"):
        assert family_of(v) == "qwen3"
    assert family_of("dev") == family_of("mistral") == "mistral"
    assert "object relationships, object\nattribution" in SYSTEM_MESSAGE


# ----------------------------------------------------------------------------------------------
# Quantisation

# Measured on this model (docs/text-encoders.md): relative Frobenius error of prompt_embeds over all
# positions. Bounds are about twice the measured values.
QUANT_BOUNDS = {("bf16", "fp32"): 0.025, ("int8", "bf16"): 0.08, ("int8-fp32", "fp32"): 0.03, ("int4", "bf16"): 0.45}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def quant_folder(tmp_path_factory):
    """hidden 128, MLP 352 (down_proj falls back to group size 32), 6 layers."""
    root = tmp_path_factory.mktemp("quant")
    model = qwen3_model(layers=6, hidden=128, intermediate=352, heads=4, kv=2, head_dim=32)
    save_model_folder(root, model, build_qwen3_tokenizer)
    return root


QUANT_KW = dict(max_length=128, hidden_layers=(2, 4, 6))
QUANT_PROMPTS = [MEDIUM, LONG]


def test_quantization_error_within_bounds(quant_folder):
    def run(dtype, quantize=None):
        enc = load_text_encoder(quant_folder, "klein-4b", dtype=dtype, quantize=quantize, **QUANT_KW)
        return enc, encode(enc, QUANT_PROMPTS)[0].astype(np.float32)

    _, fp32 = run(mx.float32)
    _, bf16 = run(mx.bfloat16)
    enc8, int8 = run(mx.bfloat16, "int8")
    _, int8_fp32 = run(mx.float32, "int8")
    enc4, int4 = run(mx.bfloat16, "int4")
    errors = {
        ("bf16", "fp32"): _rel(bf16, fp32),
        ("int8", "bf16"): _rel(int8, bf16),
        ("int8-fp32", "fp32"): _rel(int8_fp32, fp32),
        ("int4", "bf16"): _rel(int4, bf16),
    }
    print({f"{a} vs {b}": round(e, 4) for (a, b), e in errors.items()})
    for key, bound in QUANT_BOUNDS.items():
        assert errors[key] <= bound, f"{key}: {errors[key]:.4f} > {bound}"
    assert errors[("int4", "bf16")] > 2 * errors[("int8", "bf16")]  # 4 bits really are coarser
    layer = enc8.model.layers[0]
    assert isinstance(enc8.model.embed_tokens, nn.QuantizedEmbedding) and enc8.quantization == "int8"
    assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (8, 64)
    assert (layer.mlp.down_proj.group_size, enc4.model.layers[0].mlp.down_proj.bits) == (32, 4)  # 352 = 11·32


def test_prequantized_mlx_lm_folder(quant_folder, tmp_path):
    """An mlx-lm folder saved already quantised (per-module group sizes in `quantization`) loads to
    exactly the model that quantize='int8' makes on the fly."""
    enc = load_text_encoder(quant_folder, "klein-4b", dtype=mx.float32, quantize="int8", **QUANT_KW)
    cfg = json.loads((quant_folder / "text_encoder" / "config.json").read_text())
    q = {"group_size": 64, "bits": 8}
    for path, m in enc.model.named_modules():
        if hasattr(m, "group_size") and m.group_size != 64:
            q[f"model.{path}"] = {"group_size": m.group_size, "bits": 8}
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**cfg, "quantization": q}))
    mx.save_safetensors(str(out / "model.safetensors"), {f"model.{k}": v for k, v in tree_flatten(enc.model.parameters())})
    for f in (quant_folder / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    pre = load_text_encoder(out, "qwen3", dtype=mx.float32, **QUANT_KW)
    assert pre.quantization == "int8"
    assert np.array_equal(encode(pre, QUANT_PROMPTS)[0], encode(enc, QUANT_PROMPTS)[0])
    with pytest.raises(ValueError, match="already quantised"):
        load_text_encoder(out, "qwen3", quantize="int4", **QUANT_KW)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_loaded_bytes_is_what_the_loader_holds(quantize):
    """The plan weighs the text encoder from its config alone; the loaded model holds exactly that."""
    from mlx.utils import tree_flatten

    from mflux2.models.text_encoder import load_text_encoder, loaded_bytes

    from pathlib import Path

    toy = Path(__file__).resolve().parents[1] / "models" / "toy"
    te = load_text_encoder(toy, "qwen3", quantize=quantize)
    held = sum(v.nbytes for _, v in tree_flatten(te.model.parameters()))
    planned = loaded_bytes("qwen3", quantize, folder=toy)
    assert planned["weights"] == held
    if quantize is None:
        assert planned["largest"] == max(v.nbytes for _, v in tree_flatten(te.model.parameters()))
