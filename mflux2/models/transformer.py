"""The FLUX.2 MM-DiT transformer (klein-4b, klein-9b, dev): config, blocks, model and key rules.

Read top to bottom in the order data flows: the config and presets, the embeddings of the inputs,
the modulations, attention, the two kinds of block, the model, then the rules that map checkpoint
keys onto it. Layout follows BFL's `flux2/model.py`, so parameter paths equal the official
checkpoint keys (`double_blocks.0.img_attn.qkv.weight`, `single_blocks.3.linear1.weight`, ...) and
LoRA files in BFL names (ai-toolkit, ComfyUI) address our modules directly. q/k/v stay fused in one
matmul and the single blocks keep the fused qkv+MLP weight (run as two GEMMs on its row slices).
Diffusers checkpoints are mapped on load (`sanitize`). The facts and their public sources:
docs/architecture.md ("Transformer sizes", "Embeddings, RoPE and blocks", "Weight layouts").
The fast paths (RoPE, SwiGLU, split views, the GEMMs of `linear`, the modulation's LayerNorm) live in mflux2.ops, each beside
its plain-MLX fallback; quantization in mflux2.models.quantization. Why: docs/performance.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mflux2.models.quantization import load_weights, quant_settings
from mflux2.ops import (apply_rope, attention_tokens, linear, linear_concat, modulate, norm_rope, norm_rope_fused, qkv_split, rms_norm_frozen, rope_table,
                        split_views, swiglu)
from mflux2.weights import WeightsError, check_keys, iter_tensors, read_config, resolve_component, safetensors_files


@dataclass
class TransformerConfig:
    num_layers: int = 5  # double-stream blocks
    num_single_layers: int = 20
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 7680  # context dim = 3 x text-encoder hidden size
    in_channels: int = 128
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    timestep_guidance_channels: int = 256
    guidance_embeds: bool = False
    eps: float = 1e-6

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From a diffusers `config.json` (unknown keys such as `_class_name` are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


PRESETS = {
    "klein-4b": TransformerConfig(),
    "klein-9b": TransformerConfig(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
    "dev": TransformerConfig(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                             guidance_embeds=True),
}
PRESETS["klein-base-4b"] = PRESETS["klein-4b"]
PRESETS["klein-base-9b"] = PRESETS["klein-9b"]


def preset(name: str) -> TransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX.2 variant {name!r}; choose one of {', '.join(PRESETS)}")
    return TransformerConfig(**asdict(PRESETS[name]))


# ---- Embeddings: timestep (and guidance) -> vec; position ids -> RoPE tables (mflux2.ops.rope_table)


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of t·1000, cos half first, in float32 [BFL `timestep_embedding`]."""
    half = dim // 2
    # Frequencies rounded once from float64: t·1000 (and guidance·1000 up to ~4000) amplifies any
    # ulp difference in exp() into the angle.
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / half
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = (t.astype(mx.float32) * 1000.0)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def __call__(self, x):
        return self.out_layer(nn.silu(self.in_layer(x)))


# ---- Modulation: vec -> shift, scale and gate of every block


class Modulation(nn.Module):
    """One of the three shared modulation heads: SiLU, Linear D -> n·D, split into n [B, 1, D]."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim, bias=False)

    def __call__(self, vec):
        return mx.split(self.lin(nn.silu(vec))[:, None, :], self.n, axis=-1)


# ---- Attention and MLP


class RMSNormScale(nn.Module):
    """RMSNorm whose weight is called `scale` (BFL's name)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        if "scale" in self.trainable_parameters():  # (never under LoRA training)
            return mx.fast.rms_norm(x, self.scale, self.eps)
        return rms_norm_frozen(x, self.scale, self.eps)  # no gradient for the frozen scale (switch "rms_frozen")


class QKNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.query_norm = RMSNormScale(dim, eps)
        self.key_norm = RMSNormScale(dim, eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x, rope=None):
        """[B, N, D] -> normalised q, k and v, each [B, N, H, d]: one GEMM each on row slices of the
        fused weight (contiguous, so the norms copy nothing), or views of one fused GEMM (switch
        "qkv_parts" off)."""
        q, k, v = qkv_split(self.qkv, x, x.shape[-1], heads=self.heads)
        if rope is not None:  # RoPE right after the norms (one CUDA kernel each: ops.norm_rope)
            return _norm_rope(self.norm, q, k, rope) + (v,)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _norm_rope(norm: QKNorm, q, k, rope) -> tuple:
    return (norm_rope(q, norm.query_norm.scale, norm.query_norm.eps, rope),
            norm_rope(k, norm.key_norm.scale, norm.key_norm.eps, rope))


def attention(q: mx.array, k: mx.array, v: mx.array, rope) -> mx.array:
    """RoPE on q/k, SDPA, heads merged back: [B, N, H, d] -> [B, N, H·d].

    q/k/v stay in the token-major layout of the projections; SDPA reads them through transposed
    views and (on CUDA) writes its output in the same layout, so merging the heads is free."""
    if rope is not None:  # (None: q and k rotated already)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = attention_tokens(q, k, v, scale=q.shape[-1] ** -0.5)  # [B, N, H, d] (mflux2.ops.attention)
    b, n, h, d = out.shape
    return out.reshape(b, n, h * d)


class SwiGLU(nn.Module):
    """silu(first half) · second half. Parameter-free; sits at index 1 of the MLP list so the
    linears keep BFL's `mlp.0` / `mlp.2` names."""

    def __call__(self, x):
        return swiglu(x)


def _mlp(layers, x):
    return linear(layers[2], layers[1](linear(layers[0], x)))


# ---- Blocks


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, m, h = cfg.hidden_size, cfg.mlp_hidden, cfg.num_attention_heads
        self.eps = cfg.eps
        self.img_attn = SelfAttention(d, h, cfg.eps)
        self.txt_attn = SelfAttention(d, h, cfg.eps)
        self.img_mlp = [nn.Linear(d, 2 * m, bias=False), SwiGLU(), nn.Linear(m, d, bias=False)]
        self.txt_mlp = [nn.Linear(d, 2 * m, bias=False), SwiGLU(), nn.Linear(m, d, bias=False)]

    def __call__(self, img, txt, mod_img, mod_txt, rope):
        sh1_i, sc1_i, g1_i, sh2_i, sc2_i, g2_i = mod_img
        sh1_t, sc1_t, g1_t, sh2_t, sc2_t, g2_t = mod_txt
        cat = lambda a, b: mx.concatenate([a, b], axis=1)  # noqa: E731
        if norm_rope_fused(img.dtype, self.img_attn.norm.query_norm.scale.shape[0]):
            # each stream's norm and RoPE in one kernel, on its part of the tables ([text; image])
            n_txt = txt.shape[1]
            qi, ki, vi = self.img_attn.qkv_heads(modulate(img, sh1_i, sc1_i, self.eps), tuple(a[:, n_txt:] for a in rope))
            qt, kt, vt = self.txt_attn.qkv_heads(modulate(txt, sh1_t, sc1_t, self.eps), tuple(a[:, :n_txt] for a in rope))
            attn = attention(cat(qt, qi), cat(kt, ki), cat(vt, vi), None)
        else:  # joint attention over [text; image], RoPE applied once to the joint q/k
            qi, ki, vi = self.img_attn.qkv_heads(modulate(img, sh1_i, sc1_i, self.eps))
            qt, kt, vt = self.txt_attn.qkv_heads(modulate(txt, sh1_t, sc1_t, self.eps))
            attn = attention(cat(qt, qi), cat(kt, ki), cat(vt, vi), rope)
        attn_txt, attn_img = split_views(attn, (txt.shape[1], img.shape[1]), axis=1)

        img = img + g1_i * linear(self.img_attn.proj, attn_img)
        img = img + g2_i * _mlp(self.img_mlp, modulate(img, sh2_i, sc2_i, self.eps))
        txt = txt + g1_t * linear(self.txt_attn.proj, attn_txt)
        txt = txt + g2_t * _mlp(self.txt_mlp, modulate(txt, sh2_t, sc2_t, self.eps))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: linear1 -> [q|k|v|gate|up], linear2 <- [attn|silu(gate)·up]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.mlp_hidden
        self.heads, self.dim, self.mlp_dim, self.eps = cfg.num_attention_heads, d, m, cfg.eps
        self.linear1 = nn.Linear(d, 3 * d + 2 * m, bias=False)
        self.linear2 = nn.Linear(d + m, d, bias=False)
        self.norm = QKNorm(cfg.attention_head_dim, cfg.eps)
        self.mlp_act = SwiGLU()

    def __call__(self, x, mod, rope):
        shift, scale, gate = mod
        # linear1's q, k, v rows and MLP rows as separate GEMMs (no slicing copies of the wide output,
        # q/k/v contiguous for the norms and attention; switch "qkv_parts": q/k/v as one GEMM, split
        # into views); linear2's concatenated input only a temporary (its LoRA reads the attention part).
        q, k, v, mlp = qkv_split(self.linear1, modulate(x, shift, scale, self.eps), self.dim, (2 * self.mlp_dim,), heads=self.heads)
        if norm_rope_fused(q.dtype, q.shape[-1]):
            attn = attention(*_norm_rope(self.norm, q, k, rope), v, None)
        else:
            attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rope)
        return x + gate * linear_concat(self.linear2, [attn, self.mlp_act(mlp)])


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False)]
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def __call__(self, x, vec):
        shift, scale = mx.split(self.adaLN_modulation[1](self.adaLN_modulation[0](vec))[:, None, :], 2, axis=-1)  # BFL order
        return linear(self.linear, modulate(x, shift, scale, self.eps))


# ---- The model


class Flux2Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d, bias=False)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, d, bias=False)
        self.time_in = MLPEmbedder(cfg.timestep_guidance_channels, d)
        if cfg.guidance_embeds:
            self.guidance_in = MLPEmbedder(cfg.timestep_guidance_channels, d)
        self.double_stream_modulation_img = Modulation(d, 6)
        self.double_stream_modulation_txt = Modulation(d, 6)
        self.single_stream_modulation = Modulation(d, 3)
        self.double_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.final_layer = LastLayer(d, cfg.in_channels, cfg.eps)
        self.checkpoint_every = 0  # gradient checkpointing: every n-th block recomputed in backward (0 = off)

    def set_gradient_checkpointing(self, every: int | bool = 1) -> None:
        """Recompute every n-th block's activations during the backward pass (True = every block).
        Uses `mlx.nn.utils.checkpoint`, which keeps the gradients of trainable parameters; the
        training step can instead run its block-by-block backward (`mflux2.training.step`)."""
        self.checkpoint_every = int(every)

    @property
    def dtype(self) -> mx.Dtype:
        first = self.img_in  # a quantized layer keeps its scales in the weights' dtype
        return first.scales.dtype if isinstance(first, nn.QuantizedLinear) else first.weight.dtype

    @property
    def num_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    # The forward pass in three parts — embed, one block at a time, head — so the training step
    # can run the blocks itself (checkpointed block-by-block backward). __call__ chains them.

    def embed(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
        """Inputs -> (state, ctx): state = (img, txt) streams [B, N|L, D]; ctx = the arrays every
        block reads: (vec, 6 double-img, 6 double-txt and 3 single modulations, 2 RoPE tables)."""
        cfg, dtype, b = self.config, hidden_states.dtype, hidden_states.shape[0]
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (b,))
        # Like the reference pipelines, the timestep is quantised to the activation dtype first.
        vec = self.time_in(timestep_embedding(timestep.astype(dtype), cfg.timestep_guidance_channels).astype(dtype))
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX.2 model is guidance-distilled (dev): pass guidance=[B] (e.g. 4.0)")
            guidance = mx.broadcast_to(mx.array(guidance).reshape(-1), (b,))
            vec = vec + self.guidance_in(timestep_embedding(guidance.astype(dtype)).astype(dtype))

        mods = (*self.double_stream_modulation_img(vec), *self.double_stream_modulation_txt(vec),
                *self.single_stream_modulation(vec))
        img = self.img_in(hidden_states)
        txt = self.txt_in(encoder_hidden_states.astype(dtype))
        ids = mx.concatenate([_batched(txt_ids, b), _batched(img_ids, b)], axis=1)  # text first
        rope = rope_table(ids, cfg.axes_dims_rope, cfg.rope_theta)
        return (img, txt), (vec, *mods, *rope)

    def block(self, i: int, state: tuple, ctx: tuple, checkpoint: bool = False) -> tuple:
        """Block i of all (double blocks, then single blocks): state (img, txt) -> (img, txt) for a
        double block; the first single block joins the streams ([txt; img]) into (x,)."""
        mod_img, mod_txt, mod_single, rope = ctx[1:7], ctx[7:13], ctx[13:16], ctx[16:18]
        nd = len(self.double_blocks)
        if i < nd:
            blk = self.double_blocks[i]
            fn = nn.utils.checkpoint(blk) if checkpoint else blk
            return fn(*state, mod_img, mod_txt, rope)
        if len(state) == 2:
            state = (mx.concatenate([state[1], state[0]], axis=1),)
        blk = self.single_blocks[i - nd]
        fn = nn.utils.checkpoint(blk) if checkpoint else blk
        return (fn(state[0], mod_single, rope),)

    def head(self, state: tuple, ctx: tuple, n_img: int) -> mx.array:
        """The final layer on the image tokens of the last block's state."""
        img = state[0] if len(state) == 2 else state[0][:, -n_img:]
        return self.final_layer(img, ctx[0])

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array, timestep: mx.array,
                 img_ids: mx.array, txt_ids: mx.array, guidance: mx.array | None = None) -> mx.array:
        """Velocity prediction [B, N, 128] (diffusers' `Flux2Transformer2DModel` conventions).

        hidden_states [B, N, 128] packed latents; encoder_hidden_states [B, L, ctx]; timestep [B]
        sigma in [0, 1]; img_ids [B, N, 4] / txt_ids [B, L, 4] (or without the batch dim);
        guidance [B] for dev (guidance-distilled), ignored by klein.
        """
        state, ctx = self.embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance)
        n, nd = self.checkpoint_every, len(self.double_blocks)
        for i in range(self.num_blocks):
            j = i if i < nd else i - nd  # every n-th block of each kind, as nn.utils.checkpoint per list
            state = self.block(i, state, ctx, checkpoint=bool(n) and j % n == 0)
            if BLOCK_OUTPUTS is not None:
                BLOCK_OUTPUTS.append(state[0])
        return self.head(state, ctx, hidden_states.shape[1])


# A list while a training step is traced (mflux2.training.step): every block's output, in order,
# so the step can be evaluated block by block.
BLOCK_OUTPUTS: list | None = None


def _batched(ids: mx.array, b: int) -> mx.array:
    ids = mx.array(ids)
    return mx.broadcast_to(ids[None], (b, *ids.shape)) if ids.ndim == 2 else ids


def count_parameters(model: nn.Module) -> int:
    """Counts from shapes only; a lazily built model is never materialised."""
    return sum(v.size for _, v in tree_flatten(model.parameters()))


# ---- Key rules: checkpoint names -> ours (BFL's), the architecture from the shapes, and the load
# diffusers -> BFL: plain renames are regex rules; two transforms remain: q/k/v concatenated into
# one qkv weight, and the final adaLN halves swapped (diffusers [scale; shift]).

_DIFFUSERS_RULES = [
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
    (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.", r"\1.lin."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^proj_out\.", "final_layer.linear."),
]
# diffusers split projections that are fused in BFL: (pattern, fused name, part index)
_DIFFUSERS_QKV = re.compile(r"^transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.weight$")
_QKV_PART = {"to_q": ("img", 0), "to_k": ("img", 1), "to_v": ("img", 2), "add_q_proj": ("txt", 0), "add_k_proj": ("txt", 1), "add_v_proj": ("txt", 2)}
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map a BFL (optionally prefixed) or diffusers state dict to our (BFL) parameter names."""
    if not is_diffusers_layout(weights):
        strip = lambda k: next((k[len(p) :] for p in _BFL_PREFIXES if k.startswith(p)), k)  # noqa: E731
        return {strip(k): v for k, v in weights.items()}
    out, qkv_parts = {}, {}
    for k, v in weights.items():
        m = _DIFFUSERS_QKV.match(k)
        if m:
            stream, i = _QKV_PART[m.group(2)]
            qkv_parts.setdefault(f"double_blocks.{m.group(1)}.{stream}_attn.qkv.weight", [None] * 3)[i] = v
            continue
        for pattern, repl in _DIFFUSERS_RULES:
            new, n = re.subn(pattern, repl, k)
            if n:
                k = new
                break
        if k == "final_layer.adaLN_modulation.1.weight":
            scale, shift = mx.split(v, 2, axis=0)
            v = mx.concatenate([shift, scale], axis=0)
        out[k] = v
    for k, parts in qkv_parts.items():
        if any(p is None for p in parts):
            raise WeightsError(f"diffusers checkpoint has only part of the q/k/v projections for {k}")
        out[k] = mx.concatenate(parts, axis=0)
    return out


def config_from_weights(shapes: dict[str, tuple]) -> TransformerConfig:
    """Infer the architecture of a BFL-named state dict from its tensor shapes."""
    try:
        d, in_ch = shapes["img_in.weight"]
        ctx = shapes["txt_in.weight"][1]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        temb = shapes["time_in.in_layer.weight"][1]
        mlp2 = shapes["double_blocks.0.img_mlp.0.weight"][0]
    except KeyError as e:
        raise WeightsError(f"not a FLUX.2 transformer checkpoint: key {e.args[0]} missing") from None
    depth = lambda prefix: len({int(k.split(".")[1]) for k in shapes if k.startswith(prefix)})  # noqa: E731
    return TransformerConfig(
        num_layers=depth("double_blocks."),
        num_single_layers=depth("single_blocks."),
        num_attention_heads=d // head_dim,
        attention_head_dim=head_dim,
        joint_attention_dim=ctx,
        in_channels=in_ch,
        mlp_ratio=mlp2 / 2 / d,
        axes_dims_rope=(head_dim // 4,) * 4,
        timestep_guidance_channels=temb,
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
    )


def variant_of(config: TransformerConfig) -> str | None:
    """The preset name whose shapes match `config` (klein-base-* share klein's shapes)."""
    return next((name for name in ("klein-4b", "klein-9b", "dev") if PRESETS[name] == config), None)


def load_transformer(path: str | Path, variant: str | None = None, dtype: mx.Dtype = mx.bfloat16,
                     quantize: str | None = None, group_size: int | None = None) -> Flux2Transformer:
    """Load a FLUX.2 transformer from a BFL single file, a diffusers `transformer/` folder, or a
    model folder holding `transformer/`. Tensors are converted one at a time (mx.load is lazy) and,
    with `quantize` ('int8'/'int4'), each block is quantised as soon as it is loaded, so peak memory
    stays near the final model's size. `group_size`: QUANT_GROUP_SIZE's for `quantize` unless given."""
    src = resolve_component(path, "transformer")
    if src.is_dir() and not (src / "config.json").exists():
        singles = [f for f in src.glob("*.safetensors") if not f.name.startswith(("ae", "diffusion_pytorch_model", "model-"))]
        if len(singles) == 1:  # a BFL folder: one transformer file (+ ae.safetensors)
            src = singles[0]
    weights = sanitize({k: v for k, v, _ in iter_tensors(safetensors_files(src))})
    shapes = {k: tuple(v.shape) for k, v in weights.items()}

    cfg_json = read_config(src) if src.is_dir() else None
    config = TransformerConfig.from_dict(cfg_json) if cfg_json else config_from_weights(shapes)
    if variant is not None and preset(variant) != config:
        found = variant_of(config) or "a custom architecture"
        raise WeightsError(f"{src}: you asked for variant {variant!r} but the weights are {found}")

    model = Flux2Transformer(config)  # lazily initialised: nothing is allocated until replaced
    check_keys({k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}, shapes, src)
    bits, group_size = quant_settings(quantize, group_size, dtype)
    load_weights(model, weights, dtype, bits, group_size)  # module by module, each quantised once loaded
    model.eval()
    model.quantization = quantize  # recorded for LoRA files and the converter
    return model
