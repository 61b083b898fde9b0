"""FLUX.2 text encoders on mlx-lm: Qwen3 (klein-4b/9b) and Mistral Small 3.x (dev).

A prompt becomes `prompt_embeds [B, 512, 3·H]` and `text_ids [B, 512, 4]` exactly as diffusers'
Flux2KleinPipeline (`_get_qwen3_prompt_embeds`) and Flux2Pipeline (`_get_mistral_3_small_prompt_embeds`)
make them:

1. chat template — klein: one user message, `add_generation_prompt=True, enable_thinking=False`;
   dev: the FLUX.2 system message + the user message (text blocks, `[IMG]` removed), no generation prompt;
2. tokenize to exactly `max_length` (512) tokens: truncate longer prompts (with a warning), pad
   shorter ones on the tokenizer's own side (Qwen3: right, Mistral: left);
3. run the language model with a causal + key-padding mask, and take the hidden states after layers
   (9, 18, 27) (Qwen3) or (10, 20, 30) (Mistral) — index 0 is the embedding output, index k the output
   of layer k before the final norm — concatenated per token in that order.

All 512 positions are returned, padding included: the FLUX.2 transformer attends to every one of
them, so the padded rows must match the reference too. How a fully-masked query row (a left-pad
position attends to no key) is computed depends on the PyTorch kernel; `masked_rows` picks which
behaviour to reproduce, see `TextEncoderConfig` and docs/text-encoders.md.

The model code, key sanitising and rotary embeddings are mlx-lm's (`qwen3`, `mistral3` → `llama`).
Only the layers up to the deepest one used are built and loaded (27 of 36, 30 of 40); the LM head and
Mistral3's vision tower are never read from disk (mx.load is lazy).
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mflux2.weights import WeightsError, check_keys, iter_tensors, read_config, resolve_component, safetensors_files

MAX_LENGTH = 512
QWEN3_LAYERS = (9, 18, 27)
MISTRAL_LAYERS = (10, 20, 30)
# diffusers `pipelines/flux2/system_messages.py` SYSTEM_MESSAGE (= BFL's), newline included.
SYSTEM_MESSAGE = """You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object
attribution and actions without speculation."""

# variant (or model name) -> encoder family
VARIANTS = {
    "qwen3": "qwen3",
    "klein-4b": "qwen3",
    "klein-9b": "qwen3",
    "klein-base-4b": "qwen3",
    "klein-base-9b": "qwen3",
    "klein-9b-kv": "qwen3",
    "mistral": "mistral",
    "dev": "mistral",
}
DEFAULT_LAYERS = {"qwen3": QWEN3_LAYERS, "mistral": MISTRAL_LAYERS}
QUANT_BITS = {"int8": 8, "int4": 4}
MASKED_ROWS = ("zero", "uniform")


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than `max_length` tokens (chat template included) and loses its end."""


@dataclass(frozen=True)
class TextEncoderConfig:
    family: str  # "qwen3" (klein) or "mistral" (dev)
    hidden_layers: tuple[int, ...]  # hidden-state indices taken, in concatenation order
    max_length: int = MAX_LENGTH
    # What a query row with no visible key (left padding) computes:
    #   "zero"    — attention output 0: torch SDPA's math, memory-efficient and CPU kernels, i.e.
    #               transformers' default "sdpa" attention on CPU, and in float32 on CUDA;
    #   "uniform" — equal weights on all keys: transformers' "eager" attention, and the cuDNN SDPA
    #               kernel torch 2.11 picks for bf16 on an H100 (measured).
    masked_rows: str = "zero"
    system_message: str = SYSTEM_MESSAGE  # Mistral only

    def __post_init__(self):
        if self.family not in DEFAULT_LAYERS:
            raise ValueError(f"text encoder family {self.family!r}: choose qwen3 or mistral")
        if self.masked_rows not in MASKED_ROWS:
            raise ValueError(f"masked_rows={self.masked_rows!r}: choose one of {', '.join(MASKED_ROWS)}")
        if not self.hidden_layers or any(i < 0 for i in self.hidden_layers):
            raise ValueError(f"hidden_layers={self.hidden_layers!r}: give one or more indices >= 0")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length}: must be >= 1")


# ----------------------------------------------------------------------------------------------
# Encoder


def padding_masks(valid: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """The additive causal + key-padding mask [B, 1, L, L] (0 = visible, dtype's min = hidden, as
    transformers' eager mask) and, per query row, whether it sees any key [B, 1, L, 1]."""
    pos = mx.arange(valid.shape[1])
    visible = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # [B, q, k]
    additive = mx.where(visible, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))
    return additive[:, None], visible.any(axis=-1)[:, None, :, None]


class TextEncoder:
    """Prompts -> (prompt_embeds [B, L, len(layers)·H], text_ids [B, L, 4]). Call `release()` once
    the embeddings are cached to free the weights."""

    def __init__(
        self, model: nn.Module, tokenizer, config: TextEncoderConfig, num_layers: int, quantization: str | None = None
    ):
        self.model = model  # mlx-lm backbone (embed_tokens, layers[:deepest], norm)
        self.tokenizer = tokenizer
        self.config = config
        self.num_layers = num_layers  # layers of the checkpoint (the built model may have fewer)
        self.quantization = quantization  # None, "int8" or "int4"

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.config.hidden_layers

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @property
    def hidden_size(self) -> int:
        return self._model().args.hidden_size

    @property
    def joint_attention_dim(self) -> int:
        """Width of prompt_embeds (= the transformer's `joint_attention_dim`)."""
        return len(self.hidden_layers) * self.hidden_size

    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("this text encoder was released; load it again with load_text_encoder()")
        return self.model

    # -- tokens ---------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str] | str, _stacklevel: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both [B, max_length] int32, as the diffusers pipelines make them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode() takes a non-empty list of prompt strings")
        tok, n = self.tokenizer, self.max_length
        if self.config.family == "qwen3":
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
                for p in prompts
            ]
            full = tok(texts)["input_ids"]
            enc = tok(texts, padding="max_length", truncation=True, max_length=n)
        else:
            convs = [
                [
                    {"role": "system", "content": [{"type": "text", "text": self.config.system_message}]},
                    # Pixtral's processor would count a literal [IMG] as an image placeholder
                    {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
                ]
                for p in prompts
            ]
            kw = dict(add_generation_prompt=False, tokenize=True, return_dict=True)
            full = tok.apply_chat_template(convs, **kw)["input_ids"]
            enc = tok.apply_chat_template(convs, **kw, padding="max_length", truncation=True, max_length=n)
        for i, (p, ids) in enumerate(zip(prompts, full)):
            if len(ids) > n:
                warnings.warn(
                    f"prompt {i} is {len(ids)} tokens with the chat template, more than max_length={n}; "
                    f"its end is cut off: {p[:80]!r}{'...' if len(p) > 80 else ''}",
                    PromptTruncatedWarning,
                    stacklevel=_stacklevel + 1,
                )
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        mask = np.asarray(enc["attention_mask"], dtype=np.int32)
        if ids.shape != (len(prompts), n) or mask.shape != ids.shape:
            raise ValueError(f"tokenizer returned shape {ids.shape}, expected {(len(prompts), n)}")
        return ids, mask

    # -- model ----------------------------------------------------------------------------------

    def hidden_states(self, input_ids, attention_mask) -> list[mx.array]:
        """The hidden states at `hidden_layers` ([B, L, H] each) for token ids and a 0/1 padding mask."""
        model = self._model()
        h = model.embed_tokens(mx.array(input_ids))
        mask, sees_a_key = padding_masks(mx.array(attention_mask).astype(mx.bool_), h.dtype)
        want, out = set(self.hidden_layers), {}
        if 0 in want:
            out[0] = h
        for i, layer in enumerate(model.layers, start=1):
            # mlx-lm's TransformerBlock.__call__ spelled out, to zero fully-masked rows if asked
            r = layer.self_attn(layer.input_layernorm(h), mask)
            if self.config.masked_rows == "zero":
                r = r * sees_a_key[:, 0]  # o_proj has no bias, so this is SDPA's zero output
            h = h + r
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i in want:
                # transformers replaces the last hidden state by the final-normed output
                out[i] = model.norm(h) if i == self.num_layers else h
        return [out[k] for k in self.hidden_layers]

    def encode(self, prompts: list[str] | str) -> tuple[mx.array, mx.array]:
        """prompt_embeds [B, max_length, len(hidden_layers)·H] in the model dtype and
        text_ids [B, max_length, 4] int32 = (0, 0, 0, l)."""
        ids, mask = self.tokenize(prompts, _stacklevel=3)  # warnings point at the caller of encode()
        hs = self.hidden_states(ids, mask)
        b, n, h = hs[0].shape
        embeds = mx.stack(hs, axis=2).reshape(b, n, len(hs) * h)  # per token: layers in order
        text_ids = mx.zeros((b, n, 4), dtype=mx.int32)
        text_ids[..., 3] = mx.arange(n, dtype=mx.int32)
        mx.eval(embeds, text_ids)
        return embeds, text_ids

    __call__ = encode

    def release(self) -> None:
        """Drop the weights and return their memory to the system (the tokenizer stays)."""
        self.model = None
        gc.collect()
        mx.clear_cache()

    unload = release


# ----------------------------------------------------------------------------------------------
# Loading

_LM_HEAD = re.compile(r"(^|\.)lm_head\.")
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json", "vocab.json")


def family_of(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown text encoder variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _lm_config(cfg: dict, family: str, src: Path) -> dict:
    """The language model's config with every field filled in by transformers' defaults (older
    checkpoints store only non-default values) and rope_theta lifted out of `rope_parameters`."""
    from transformers import AutoConfig

    model_type = cfg.get("model_type")
    allowed = {"qwen3": ("qwen3",), "mistral": ("mistral3", "mistral", "llama")}[family]
    if model_type not in allowed:
        raise WeightsError(
            f"{src}/config.json: model_type {model_type!r} is not a {family} text encoder (expected {' or '.join(allowed)})"
        )
    hf = AutoConfig.for_model(**cfg)
    d = (hf.text_config if model_type == "mistral3" else hf).to_dict()
    if d.get("model_type") not in ("qwen3", "mistral", "llama"):
        raise WeightsError(f"{src}/config.json: language model type {d.get('model_type')!r} is not supported")
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise WeightsError(f"{src}/config.json: only bias-free SiLU language models are supported")
    rope = d.get("rope_parameters") or {}
    if d.get("rope_theta") is None:
        d["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = rope
    return d


def _check_window(d: dict, depth: int, max_length: int, src: Path) -> None:
    """We give every layer the full causal mask; a sliding window shorter than the prompt would
    differ (transformers: Mistral slides when `sliding_window` is set, Qwen3 on "sliding_attention" layers)."""
    if d["model_type"] == "qwen3":
        window = d.get("sliding_window") if "sliding_attention" in (d.get("layer_types") or [])[:depth] else None
    else:
        window = d.get("sliding_window") if d["model_type"] == "mistral" else None
    if window is not None and window < max_length:
        raise WeightsError(f"{src}/config.json: sliding_window={window} < max_length={max_length} is not supported")


def _build(family: str, lm: dict, depth: int) -> tuple[nn.Module, nn.Module]:
    """(mlx-lm model to load weights into, its backbone) with `depth` layers and no LM head."""
    from mlx_lm.models import mistral3, qwen3  # here: importing mlx-lm costs seconds, which weighing a model need not pay

    lm = {**lm, "num_hidden_layers": depth, "tie_word_embeddings": True, "layer_types": None}
    if family == "qwen3":
        model = qwen3.Model(qwen3.ModelArgs.from_dict(lm))
        return model, model.model
    model = mistral3.Model(mistral3.ModelArgs(model_type="mistral3", text_config=lm))
    return model, model.language_model.model


class QuantizationError(WeightsError):
    """A text encoder that cannot be quantized at the precision asked (a layer's width is not a
    multiple of any group size MLX offers)."""


def _quant_predicate(bits: int):
    """Affine quantisation of every Linear and Embedding, group size 64 (32 where the width needs it)."""

    def predicate(path, m):
        if not hasattr(m, "to_quantized"):
            return False
        width = m.weight.shape[-1]
        for group in (64, 32):
            if width % group == 0:
                return {"group_size": group, "bits": bits}
        raise QuantizationError(f"the text encoder cannot be quantized to int{bits}: its layer {path} has width {width}, "
                                f"not a multiple of 32 — use model.quantization: bf16 (or auto)")

    return predicate


# The language models of the released FLUX.2 text encoders (config.json fields that set shapes):
# Qwen/Qwen3-4B (klein-4b), Qwen/Qwen3-8B (klein-9b), mistralai/Mistral-Small-3.2-24B-Instruct-2506's
# text_config (dev). What a plan weighs before any file is downloaded.
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              rope_theta=1_000_000, rms_norm_eps=1e-6, max_position_embeddings=40960, hidden_act="silu")
PRESET_CONFIGS = {
    "qwen3-4b": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "tie_word_embeddings": False},
    "mistral-small-24b": dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                              rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                              sliding_window=None, hidden_act="silu", tie_word_embeddings=False),
}
PRESET_OF = {"klein-4b": "qwen3-4b", "klein-base-4b": "qwen3-4b", "klein-9b": "qwen3-8b", "klein-base-9b": "qwen3-8b",
             "klein-9b-kv": "qwen3-8b", "dev": "mistral-small-24b"}


def loaded_bytes(variant: str, quantize: str | None, dtype: mx.Dtype = mx.bfloat16, *, folder: str | Path | None = None,
                 hidden_layers: tuple[int, ...] | None = None) -> dict:
    """What `load_text_encoder(folder, variant, dtype, quantize)` holds once loaded, from the
    architecture alone (its config.json, or PRESET_CONFIGS for a released model's variant when no
    folder is given): {"weights": bytes, "largest": bytes of its largest tensor in `dtype`, the one
    quantisation holds beside its quantized copy}. The loader's model (only the layers up to the
    deepest hidden state; no LM head) and its quantisation rule (`_quant_predicate`), counted on the
    shapes of a Llama-style layer (tests/test_text_encoder.py checks them against a loaded model):
    nothing is read, and mlx-lm is not imported. Raises QuantizationError where `quantize` cannot apply."""
    family = family_of(variant)
    prequant = None
    if folder is not None:
        te_dir = resolve_component(Path(folder).expanduser(), "text_encoder")
        cfg = read_config(te_dir)
        if cfg is None:
            raise WeightsError(f"{te_dir}: no config.json — not a transformers/mlx-lm model folder")
        prequant = cfg.get("quantization") or (cfg.get("text_config") or {}).get("quantization")
        lm = cfg.get("text_config") or cfg if cfg.get("model_type") == "mistral3" else cfg
    else:
        lm = PRESET_CONFIGS[PRESET_OF[variant]]
    h, inter = lm["hidden_size"], lm["intermediate_size"]
    heads = lm.get("num_attention_heads", 32)
    kv = lm.get("num_key_value_heads") or heads
    hd = lm.get("head_dim") or h // heads
    depth = min(max(hidden_layers or DEFAULT_LAYERS[family]), lm["num_hidden_layers"])
    # (path, out, in) of every Linear/Embedding the loader builds; the rest are norm vectors
    layer = [("self_attn.q_proj", heads * hd, h), ("self_attn.k_proj", kv * hd, h), ("self_attn.v_proj", kv * hd, h),
             ("self_attn.o_proj", h, heads * hd), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
             ("mlp.down_proj", h, inter)]
    mats = [("embed_tokens", lm["vocab_size"], h)] + [(f"layers.{i}.{n}", o, w) for i in range(max(depth, 1)) for n, o, w in layer]
    norms = h + max(depth, 1) * (2 * h + (2 * hd if family == "qwen3" else 0))  # final, per layer (+ Qwen3's q/k norms)
    bits = prequant["bits"] if prequant else (QUANT_BITS[quantize] if quantize else None)
    predicate = _quant_predicate(bits) if bits else None
    weights = norms * dtype.size
    for path, out, width in mats:
        n = out * width
        if predicate is None:
            weights += n * dtype.size
            continue
        group = predicate(path, _Shape((out, width)))["group_size"]
        if prequant:
            group = prequant.get("group_size", group)
        weights += n * bits / 8 + n / group * 2 * dtype.size  # packed weights + a scale and a bias per group
    return {"weights": weights, "largest": max(o * w for _, o, w in mats) * dtype.size}


class _Shape:
    """A stand-in module for `_quant_predicate` (it looks at the weight's width only)."""

    def __init__(self, shape):
        self.weight = type("W", (), {"shape": shape})()
        self.to_quantized = None


def _prequantized_predicate(q: dict, weights: dict):
    """mlx-lm's rule for checkpoints it quantised: a module is quantised where its `.scales` exist."""

    def predicate(path, m):
        if path in q and isinstance(q[path], dict):
            return q[path]
        return hasattr(m, "to_quantized") and f"{path}.scales" in weights

    return predicate


def _find_tokenizer(path: Path, te_dir: Path) -> Path:
    for folder in (path / "tokenizer", te_dir, te_dir.parent / "tokenizer"):
        if folder.is_dir() and any((folder / f).exists() for f in _TOKENIZER_FILES):
            return folder
    raise WeightsError(f"{path}: no tokenizer found (looked in tokenizer/, {te_dir.name}/ and beside it)")


def load_tokenizer(folder: str | Path):
    """`AutoTokenizer` of a `tokenizer/` folder, with the chat template of a processor-style
    `chat_template.jinja`/`chat_template.json` when the tokenizer files carry none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds; keep the first line
        raise WeightsError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if not tok.chat_template:
        if (folder / "chat_template.jinja").exists():
            tok.chat_template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").exists():
            tok.chat_template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    if not tok.chat_template:
        raise WeightsError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json, chat_template.jinja/json)")
    if tok.pad_token is None:
        raise WeightsError(f"{folder}: the tokenizer has no pad token")
    return tok


def load_text_encoder(
    path: str | Path,
    variant: str,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: str | None = None,
    *,
    max_length: int = MAX_LENGTH,
    hidden_layers: tuple[int, ...] | None = None,
    masked_rows: str = "zero",
    tokenizer_path: str | Path | None = None,
) -> TextEncoder:
    """Load the FLUX.2 text encoder of `variant` ("klein-4b", "klein-9b", "klein-base-*", "dev", or
    the family "qwen3"/"mistral").

    `path`: a model folder holding `text_encoder/` and `tokenizer/` (a diffusers FLUX.2 repo), the
    `text_encoder/` folder itself (tokenizer beside it), or a plain HF / mlx-lm model folder (tokenizer
    inside). Weights may be sharded; Mistral3ForConditionalGeneration checkpoints may use either key
    prefix (`language_model.model.*` or `model.language_model.*`), and their vision tower is skipped
    unread. `quantize` = "int8" | "int4" quantises every Linear and the embedding (MLX affine, group 64).
    `hidden_layers` defaults to (9, 18, 27) for Qwen3 and (10, 20, 30) for Mistral.
    """
    family = family_of(variant)
    config = TextEncoderConfig(
        family=family,
        hidden_layers=tuple(hidden_layers) if hidden_layers is not None else DEFAULT_LAYERS[family],
        max_length=max_length,
        masked_rows=masked_rows,
    )
    if quantize is not None and quantize not in QUANT_BITS:
        raise ValueError(f"quantize={quantize!r}: choose int8 or int4 (or None for {dtype})")
    path = Path(path).expanduser()
    te_dir = resolve_component(path, "text_encoder")
    if te_dir.is_file():
        raise WeightsError(f"{te_dir}: a text encoder is a folder (config.json + safetensors), not a single file")
    cfg = read_config(te_dir)
    if cfg is None:
        raise WeightsError(f"{te_dir}: no config.json — not a transformers/mlx-lm model folder")
    lm = _lm_config(cfg, family, te_dir)
    total = lm["num_hidden_layers"]
    depth = max(config.hidden_layers)
    if depth > total:
        raise ValueError(f"hidden_layers={config.hidden_layers}: the model in {te_dir} has only {total} layers")
    _check_window(lm, depth, max_length, te_dir)

    built = max(depth, 1)  # layers to build and load: none past the deepest hidden state taken
    model, backbone = _build(family, lm, built)
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else _find_tokenizer(path, te_dir)
    # The tokenizer loads while the weights are read (mx.eval releases the GIL; neither needs the
    # other): its vocabulary's JSON takes ~1 s, as long as reading a few GB from the page cache.
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
    tokenizer_loaded = pool.submit(load_tokenizer, tok_dir)
    pool.shutdown(wait=False)  # if the weights fail, their error is raised and this one dropped
    weights = {k: v for k, v, _ in iter_tensors(safetensors_files(te_dir))}  # lazy: nothing read yet
    weights = model.sanitize(weights)  # mlx-lm: Mistral3 prefixes, drops vision tower + projector
    weights = {
        k: v
        for k, v in weights.items()
        if not _LM_HEAD.search(k) and not ((m := _LAYER.search(k)) and int(m.group(2)) >= built)
    }
    prequant = cfg.get("quantization") or (cfg.get("text_config") or {}).get("quantization")
    if prequant:
        if quantize:
            raise ValueError(f"{te_dir} is already quantised ({prequant.get('bits')}-bit); pass quantize=None")
        nn.quantize(
            model,
            group_size=prequant["group_size"],
            bits=prequant["bits"],
            mode=prequant.get("mode", "affine"),
            class_predicate=_prequantized_predicate(prequant, weights),
        )
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_keys(expected, {k: tuple(v.shape) for k, v in weights.items()}, te_dir)

    cast = [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()]
    model.load_weights(cast)
    del weights, cast  # the modules now hold the only (lazy) references
    if quantize:
        nn.quantize(model, class_predicate=_quant_predicate(QUANT_BITS[quantize]))
    # Evaluate module by module: one layer's full-precision weights are in memory at a time.
    for unit in (backbone.embed_tokens, *backbone.layers, backbone.norm):
        mx.eval(unit.parameters())
    backbone.eval()

    tokenizer = tokenizer_loaded.result()  # re-raises its WeightsError
    if len(tokenizer) > lm["vocab_size"]:
        raise WeightsError(f"{tok_dir}: tokenizer has {len(tokenizer)} tokens but the model only {lm['vocab_size']} embeddings")
    return TextEncoder(backbone, tokenizer, config, total, quantize or (f"int{prequant['bits']}" if prequant else None))
