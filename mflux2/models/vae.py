"""The FLUX.2 autoencoder ("AutoencoderKLFlux2", BFL `ae.safetensors`) in MLX.

A FLUX.1-style KL autoencoder with 32 latent channels, plus the FLUX.2 latent normalisation:
2x2 patchify of the 32-channel latent to 128 channels, then a batch-norm with the stored running
statistics (eps 1e-4, no affine). Everything is NHWC inside; the public API is NHWC too:

    encode(images [B,H,W,3] in [-1,1]) -> latents [B,H/8,W/8,32]      (the posterior mean)
    decode(latents [B,H/8,W/8,32])      -> images  [B,H,W,3]          (not clamped)
    pack(latents)                       -> tokens  [B,H/16*W/16,128]  (patchify, normalise, flatten)
    unpack(tokens, height, width)       -> latents [B,H/8,W/8,32]     (exact inverse)
    image_ids(height, width)            -> ids     [H/16*W/16,4]      ((0,row,col,0), row-major)

To bound memory, encode/decode evaluate as they go (GroupNorm statistics and attention chunks,
see GroupNorm below): intermediate results are evaluated eagerly, so they cannot run inside `mx.compile`. For very
large images, `tile=` runs them over overlapping tiles.

Internal parameter names follow the BFL layout (`encoder.down.0.block.0.conv1`, `decoder.up.3...`,
`mid.attn_1.q`); diffusers `vae/` folders are mapped onto it by `sanitize`. Sources:
black-forest-labs/flux2 `autoencoder.py`, diffusers `autoencoder_kl_flux2.py` and
`pipelines/flux2/pipeline_flux2.py` (see docs/vae.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mflux2.ops import conv as ops_conv
from mflux2.weights import WeightsError, check_keys, iter_tensors, read_config, resolve_component, safetensors_files

PATCH = 2  # latent patchify size; FLUX.2 tokens are 2x2 latent patches = 16x16 pixels
SCALE = 8  # pixels per latent cell (three stride-2 downsamples)


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    decoder_block_out_channels: tuple[int, ...] | None = None  # FLUX.2-small-decoder: (96, 192, 384, 384)
    batch_norm_eps: float = 1e-4
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            self.decoder_block_out_channels = tuple(self.decoder_block_out_channels)
        if len(self.block_out_channels) != 4 or len(self.decoder_channels) != 4:
            # image_ids/pack assume 8 pixels per latent cell, i.e. exactly three downsamples
            raise ValueError(f"FLUX.2 VAE needs 4 levels, got block_out_channels={self.block_out_channels}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @classmethod
    def from_diffusers(cls, cfg: dict, source) -> VAEConfig:
        if tuple(cfg.get("patch_size", (2, 2))) != (PATCH, PATCH):
            raise WeightsError(f"{source}: patch_size {cfg['patch_size']} is not supported (FLUX.2 uses [2, 2])")
        if cfg.get("act_fn", "silu") != "silu":
            raise WeightsError(f"{source}: act_fn {cfg['act_fn']!r} is not supported (FLUX.2 uses 'silu')")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in cfg.items() if k in known})
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{source}: unusable VAE config ({e})") from None


# ---------------------------------------------------------------------------------------------
# Modules (BFL names)


# GroupNorm and the convolutions are mflux2.ops' (conv.py): each a fast path beside its plain-MLX
# fallback, chosen per backend. GroupNorm's fallback (the CPU's default) evaluates its float32
# statistics chunk by chunk to bound memory (a 1024x1024 bf16 decode: 10 GiB -> 1.4 GiB, docs/vae.md),
# so encode/decode evaluate as they go and cannot run inside mx.compile.


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (groups = contiguous channel ranges), float32 statistics;
    `silu=True` in the call applies SiLU in the same pass."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-6):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.groups = groups
        self.eps = eps

    def __call__(self, x, silu: bool = False):
        return ops_conv.group_norm(x, self.weight, self.bias, self.groups, self.eps, silu=silu)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters) through mflux2.ops.conv2d: GEMMs where MLX's convolution is slow."""

    def __call__(self, x):
        if self.groups != 1 or tuple(self.dilation if isinstance(self.dilation, tuple) else (self.dilation,) * 2) != (1, 1):
            return super().__call__(x)
        return ops_conv.conv2d(x, self.weight, self.get("bias"), self.stride, self.padding)


def _norm(config: VAEConfig, channels: int) -> GroupNorm:
    return GroupNorm(config.norm_num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, config: VAEConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(config, cin)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(config, cout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv2d(cin, cout, 1)

    def __call__(self, x):
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        if "nin_shortcut" in self:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions. BFL stores q/k/v/proj_out as 1x1 convs;
    they are Linear layers here (the loader squeezes them)."""

    # Queries run in chunks, each evaluated before the next, so that at most `max_scores` attention
    # scores exist at once (N x N is 16384^2 for a 1024x1024 image: 1 GiB in float32; no fused
    # kernel takes head_dim 512, so the scores are materialised).
    max_scores = 1 << 26

    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(config, channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.q(h), self.k(h), self.v(h)
        n, scale = H * W, C**-0.5
        chunk = max(1, self.max_scores // (B * n))
        if chunk >= n:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            parts = []
            for i in range(0, n, chunk):
                parts.append(mx.fast.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, scale=scale))
                mx.eval(parts[-1])
            out = mx.concatenate(parts, axis=2)
        return x + self.proj_out(out).reshape(B, H, W, C)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x):
        # asymmetric padding: one zero row/column at the bottom/right only (as BFL and diffusers)
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)  # nearest x2
        return self.conv(x)


class Level(nn.Module):
    """One resolution level: `block` resnets, then an optional down/upsample."""

    def __init__(self, config, cin, cout, n_blocks, resample=None):
        super().__init__()
        self.block = [ResnetBlock(config, cin if i == 0 else cout, cout) for i in range(n_blocks)]
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def __call__(self, x):
        for b in self.block:
            x = b(x)
        if "downsample" in self:
            x = self.downsample(x)
        if "upsample" in self:
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        if config.mid_block_add_attention:
            self.attn_1 = AttnBlock(config, channels)
        self.block_2 = ResnetBlock(config, channels, channels)

    def __call__(self, x):
        x = self.block_1(x)
        if "attn_1" in self:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch = config.block_out_channels
        n = len(ch)
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down = [
            Level(config, ch[max(i - 1, 0)], ch[i], config.layers_per_block, "down" if i < n - 1 else None)
            for i in range(n)
        ]
        self.mid = MidBlock(config, ch[-1])
        self.norm_out = _norm(config, ch[-1])
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)
        if config.use_quant_conv:  # BFL keeps it inside the encoder; diffusers at the top level
            self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        x = self.conv_out(self.norm_out(x, silu=True))
        if "quant_conv" in self:
            x = self.quant_conv(x)
        return x  # moments: [mean | logvar]


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch = config.decoder_channels
        n = len(ch)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.conv_in = Conv2d(config.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(config, ch[-1])
        # up[i] produces the resolution of encoder level i, so it runs in reverse order (BFL indexing;
        # diffusers' up_blocks count the other way)
        self.up = [
            Level(config, ch[min(i + 1, n - 1)], ch[i], config.layers_per_block + 1, "up" if i > 0 else None)
            for i in range(n)
        ]
        self.norm_out = _norm(config, ch[0])
        self.conv_out = Conv2d(ch[0], config.out_channels, 3, padding=1)

    def __call__(self, z):
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(self.norm_out(x, silu=True))


class LatentNorm(nn.Module):
    """Batch-norm (eval mode, no affine) over the 128 patchified channels with the stored running
    statistics. The statistics stay float32 whatever the VAE dtype."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.eps = eps
        self.freeze()

    def _std(self):
        return mx.sqrt(self.running_var.astype(mx.float32) + self.eps)

    def normalize(self, x):
        return (x - self.running_mean.astype(mx.float32)) / self._std()

    def denormalize(self, x):
        return x * self._std() + self.running_mean.astype(mx.float32)


def _check_image_size(height: int, width: int, what: str = "image") -> None:
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(
            f"{what} size {height}x{width} (HxW) is not a multiple of 16: FLUX.2 needs height and width "
            "divisible by 16 — resize or crop the image"
        )


def _check_tile(tile: int) -> None:
    if tile % 16 or tile < 64:
        raise ValueError(f"tile {tile} must be a multiple of 16 pixels and at least 64")


def image_ids(height: int, width: int, batch: int | None = None, t: int = 0) -> mx.array:
    """Position ids (t, row, col, l=0) of the image tokens of a `height`x`width`-pixel image, in
    the row-major order of `pack`. t = 0 for the image being generated; reference image j (editing)
    gets t = 10·(j+1) on its own grid (docs/architecture.md, "Embeddings, RoPE and blocks"; diffusers
    `_prepare_image_ids`). float32 (never bf16: it cannot hold integers > 256 exactly). Shape [N, 4],
    or [batch, N, 4] when `batch` is given."""
    _check_image_size(height, width)
    h, w = height // 16, width // 16
    rows = mx.broadcast_to(mx.arange(h)[:, None], (h, w)).reshape(-1)
    cols = mx.broadcast_to(mx.arange(w)[None, :], (h, w)).reshape(-1)
    zeros = mx.zeros_like(rows)
    ids = mx.stack([zeros + t, rows, cols, zeros], axis=-1).astype(mx.float32)
    return ids if batch is None else mx.broadcast_to(ids[None], (batch, h * w, 4))


class Flux2VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.bn = LatentNorm(PATCH * PATCH * self.config.latent_channels, self.config.batch_norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

    def set_dtype(self, dtype, predicate=lambda t: mx.issubdtype(t, mx.floating)):
        # the batch-norm statistics stay float32 (they are applied in float32 by pack/unpack)
        self.encoder.set_dtype(dtype, predicate)
        self.decoder.set_dtype(dtype, predicate)

    # -- pixels <-> latents ----------------------------------------------------------------

    def encode(self, images: mx.array, tile: int | None = None) -> mx.array:
        """images [B,H,W,3] in [-1,1] -> latent mean [B,H/8,W/8,latent_channels] (model dtype).
        `tile` (pixels, multiple of 16): encode in overlapping tiles of that size to bound memory."""
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"encode expects images [B,H,W,{self.config.in_channels}] (NHWC), got shape {tuple(images.shape)}")
        _check_image_size(images.shape[1], images.shape[2])
        images = images.astype(self.dtype)
        if tile is not None:
            _check_tile(tile)
            return _tiled(self._encode, images, tile, up=False)
        return self._encode(images)

    def _encode(self, x):
        return self.encoder(x)[..., : self.config.latent_channels]

    def decode(self, latents: mx.array, tile: int | None = None) -> mx.array:
        """latents [B,H/8,W/8,latent_channels] -> images [B,H,W,3], roughly in [-1,1] (not clamped).
        `tile` (pixels, multiple of 16): decode in overlapping tiles of that size to bound memory."""
        if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"decode expects latents [B,h,w,{self.config.latent_channels}] (NHWC), got shape {tuple(latents.shape)}"
            )
        _check_image_size(latents.shape[1] * SCALE, latents.shape[2] * SCALE, "decoded image")
        latents = latents.astype(self.dtype)
        if tile is not None:
            _check_tile(tile)
            return _tiled(self.decoder, latents, tile // SCALE, up=True)
        return self.decoder(latents)

    # -- latents <-> transformer tokens ------------------------------------------------------

    def pack(self, latents: mx.array) -> mx.array:
        """latents [B,h,w,C] -> normalised tokens [B,(h/2)*(w/2),4C] (float32). Token channel
        index = c*4 + pi*2 + pj for the 2x2 patch offset (pi, pj); tokens row-major."""
        B, h, w, C = latents.shape
        if C != self.config.latent_channels:
            raise ValueError(f"pack expects {self.config.latent_channels} latent channels, got shape {tuple(latents.shape)}")
        _check_image_size(h * SCALE, w * SCALE)
        x = latents.astype(mx.float32).reshape(B, h // 2, 2, w // 2, 2, C)
        x = x.transpose(0, 1, 3, 5, 2, 4).reshape(B, (h // 2) * (w // 2), C * 4)  # [B, i, j, (c pi pj)]
        return self.bn.normalize(x)

    def unpack(self, tokens: mx.array, height: int, width: int) -> mx.array:
        """tokens [B,N,4C] of a `height`x`width`-pixel image -> latents [B,H/8,W/8,C] (float32)."""
        _check_image_size(height, width)
        C = self.config.latent_channels
        h, w = height // 16, width // 16
        if tokens.ndim != 3 or tokens.shape[1:] != (h * w, 4 * C):
            raise ValueError(
                f"unpack: tokens of shape {tuple(tokens.shape)} do not fit a {height}x{width} image "
                f"(expected [B, {h * w}, {4 * C}])"
            )
        B = tokens.shape[0]
        x = self.bn.denormalize(tokens.astype(mx.float32))
        x = x.reshape(B, h, w, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)  # [B, i, pi, j, pj, c]
        return x.reshape(B, 2 * h, 2 * w, C)


def _tiled(fn, x: mx.array, tile: int, up: bool) -> mx.array:
    """Run a fully convolutional `fn` (x8 resolution if `up`, /8 otherwise) over overlapping
    `tile`-sized tiles of `x` (tile in input cells) and blend the outputs with linear ramps across
    the overlaps. Each tile is evaluated before the next is built, so peak memory is that of one
    tile. Not exact: GroupNorm statistics and the mid attention see one tile at a time (the same
    trade-off as diffusers' tiling); a tile covering the whole input gives the untiled result."""
    B, H, W, _ = x.shape
    cell = 2 if up else 16  # keep tile offsets on the 16-pixel grid
    overlap = max(cell, (tile // 4) // cell * cell)
    o = (lambda n: n * SCALE) if up else (lambda n: n // SCALE)

    def starts(n):
        return [0] if n <= tile else list(range(0, n - tile, tile - overlap)) + [n - tile]

    def ramp(n, first, last):  # per-row/column blend weights of one output tile (> 0 everywhere)
        k = o(overlap)
        r = (np.arange(k) + 1) / (k + 1)
        w = np.ones(n, np.float32)
        if not first:
            w[:k] = r
        if not last:
            w[-k:] = np.minimum(w[-k:], r[::-1])
        return mx.array(w)

    out = total = None
    ys, xs = starts(H), starts(W)
    for y in ys:
        for x0 in xs:
            t = fn(x[:, y : y + tile, x0 : x0 + tile]).astype(mx.float32)
            wt = ramp(t.shape[1], y == ys[0], y == ys[-1])[:, None] * ramp(t.shape[2], x0 == xs[0], x0 == xs[-1])[None]
            wt = wt[None, :, :, None]
            if out is None:
                out = mx.zeros((B, o(H), o(W), t.shape[-1]), dtype=mx.float32)
                total = mx.zeros((1, o(H), o(W), 1), dtype=mx.float32)
            sy, sx = slice(o(y), o(y) + t.shape[1]), slice(o(x0), o(x0) + t.shape[2])
            out[:, sy, sx] += t * wt
            total[:, sy, sx] += wt
            mx.eval(out, total)
    return (out / total).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Weights: one internal layout (BFL), diffusers keys mapped onto it.

# diffusers -> BFL renames, applied in order. `{up}` is the reversed up-block index.
_DIFFUSERS_RULES = [
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.", ".up.{up}.block."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", ".up.{up}.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]
_IGNORED = re.compile(r"^bn\.num_batches_tracked$")
_ATTN_1X1 = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")  # BFL 1x1 convs -> Linear


def _rename_diffusers(key: str, n_levels: int) -> str:
    for pattern, repl in _DIFFUSERS_RULES:
        if "{up}" in repl:
            repl = lambda m, r=repl: r.format(up=n_levels - 1 - int(m[1]))  # noqa: E731
        key = re.sub(pattern, repl, key)
    return key


def _detect_layout(keys, source) -> str:
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "bfl"
    raise WeightsError(
        f"{source}: not a FLUX.2 VAE checkpoint (no encoder.down.* or encoder.down_blocks.* keys; "
        f"first keys: {', '.join(sorted(keys)[:3])})"
    )


def sanitize(weights: dict[str, mx.array], layout: str) -> dict[str, mx.array]:
    """Map a checkpoint ({key: array} in PyTorch layout, BFL or diffusers names) to this model's
    parameter names and MLX shapes. Lazy arrays stay lazy."""
    n_levels = 1 + max((int(m[1]) for k in weights if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    out = {}
    for k, v in weights.items():
        if _IGNORED.match(k):
            continue
        if layout == "diffusers":
            k = _rename_diffusers(k, n_levels)
        if v.ndim == 4 and _ATTN_1X1.search(k):
            v = v.reshape(v.shape[0], v.shape[1])
        elif v.ndim == 4:
            v = v.transpose(0, 2, 3, 1)  # conv (O, I, kh, kw) -> (O, kh, kw, I)
        out[k] = v
    return out


def _infer_config(shapes: dict[str, tuple], source) -> VAEConfig:
    """Config of a checkpoint without config.json (BFL ae.safetensors), from its (MLX) shapes.
    GroupNorm groups cannot be seen in the weights: 32, as hard-coded in BFL's autoencoder."""

    def shape(k):
        if k not in shapes:
            raise WeightsError(f"{source}: missing key {k} — incomplete checkpoint or not a FLUX.2 VAE")
        return shapes[k]

    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    enc = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels)
    dec = tuple(shape(f"decoder.up.{i}.block.0.conv1.weight")[0] for i in levels)
    try:
        return VAEConfig(
            block_out_channels=enc,
            layers_per_block=len(blocks),
            latent_channels=shape("decoder.conv_in.weight")[-1],
            use_quant_conv="encoder.quant_conv.weight" in shapes,
            use_post_quant_conv="decoder.post_quant_conv.weight" in shapes,
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes,
            decoder_block_out_channels=dec if dec != enc else None,
        )
    except ValueError as e:
        raise WeightsError(f"{source}: unusable VAE weights ({e})") from None


def _vae_files(path) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "vae").is_dir() and (p / "ae.safetensors").is_file():
        return [p / "ae.safetensors"]  # BFL model folder: transformer + ae.safetensors side by side
    comp = resolve_component(p, "vae", ("config.json", "diffusion_pytorch_model.safetensors"))
    if comp.is_dir() and (comp / "diffusion_pytorch_model.safetensors").is_file():
        return [comp / "diffusion_pytorch_model.safetensors"]  # ignore .fp16 variants beside it
    return safetensors_files(comp)


def load_vae(path, dtype: mx.Dtype = mx.bfloat16) -> Flux2VAE:
    """Load the FLUX.2 VAE from a BFL `ae.safetensors` (or the small-decoder file), a diffusers
    `vae/` folder or .safetensors file, or a model folder holding `vae/` or `ae.safetensors`.
    Weights are cast to `dtype`; the batch-norm statistics stay float32. Returns the model in eval mode."""
    files = _vae_files(path)
    source = files[0] if len(files) == 1 else files[0].parent
    raw, origin = {}, {}
    for k, v, f in iter_tensors(files):  # lazy: nothing is read yet
        if k in raw:
            raise WeightsError(f"{f}: key {k} also appears in {origin[k]}")
        raw[k], origin[k] = v, f
    layout = _detect_layout(raw.keys(), source)
    weights = sanitize(raw, layout)
    del raw  # only `weights` may reference the lazy tensors, so each is freed once converted

    cfg = read_config(files[0]) if layout == "diffusers" else None
    if cfg is not None and "block_out_channels" in cfg:
        config = VAEConfig.from_diffusers(cfg, files[0].parent / "config.json")
    else:
        config = _infer_config({k: tuple(v.shape) for k, v in weights.items()}, source)
    if "bn.running_mean" not in weights and config.latent_channels == 16:
        raise WeightsError(f"{source}: this is a FLUX.1 VAE (16 latent channels, no bn.*), not the FLUX.2 VAE")

    model = Flux2VAE(config)
    expected = {k: tuple(v.shape) for k, v in nn.utils.tree_flatten(model.parameters())}
    check_keys(expected, {k: tuple(v.shape) for k, v in weights.items()}, source)

    loaded = []
    for k in list(weights):  # one tensor at a time: never a second full copy of the checkpoint
        v = weights.pop(k).astype(mx.float32 if k.startswith("bn.") else dtype)
        mx.eval(v)
        loaded.append((k, v))
    model.load_weights(loaded, strict=True)
    model.eval()
    return model
