"""Where a FLUX.2 VAE decode spends its time (random weights): the whole decode as shipped, with
fewer GroupNorm statistics chunks, with MLX's own GroupNorm, in float32, and the decoder's 3x3
convolutions alone beside a GEMM of the same FLOPs. Prints one JSON line.

    python scripts/vae_profile.py [--size 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mflux2.models import vae as vae_mod  # noqa: E402


def timed(fn, reps=3):
    mx.eval(fn())  # warm-up (kernels compiled)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return round((time.perf_counter() - t) / reps, 4)


class MLXGroupNorm(nn.Module):
    def __init__(self, groups, channels, eps=1e-6):
        super().__init__()
        self.gn = nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)

    def __call__(self, x):
        return self.gn(x.astype(mx.float32)).astype(x.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    s = args.size
    out = {"size": s, "device": str(mx.default_device())}
    vae = vae_mod.Flux2VAE(vae_mod.VAEConfig())
    vae.set_dtype(mx.bfloat16)
    mx.eval(vae.parameters())
    z = mx.random.normal((1, s // 8, s // 8, 32)).astype(mx.bfloat16)
    out["decode_shipped_s"] = timed(lambda: vae.decoder(z))
    old = vae_mod._STATS_CHUNK
    vae_mod._STATS_CHUNK = 1 << 30
    out["decode_one_chunk_s"] = timed(lambda: vae.decoder(z))
    vae_mod._STATS_CHUNK = old
    # GroupNorm alone at the decoder's largest activation
    x = mx.random.normal((1, s, s, 128)).astype(mx.bfloat16)
    gn = vae_mod.GroupNorm(32, 128)
    out["groupnorm_128ch_full_res_s"] = timed(lambda: gn(x))
    out["groupnorm_mlx_128ch_full_res_s"] = timed(lambda: MLXGroupNorm(32, 128)(x))
    # the decoder's 3x3 convolutions alone, and a GEMM of the same FLOPs
    convs = {}
    for c, r in ((512, s // 8), (512, s // 4), (512, s // 2), (256, s), (128, s)):
        conv = nn.Conv2d(c, c, 3, padding=1)
        conv.set_dtype(mx.bfloat16)
        mx.eval(conv.parameters())
        xi = mx.random.normal((1, r, r, c)).astype(mx.bfloat16)
        a = mx.random.normal((r * r, 9 * c)).astype(mx.bfloat16)
        w = mx.random.normal((9 * c, c)).astype(mx.bfloat16)
        convs[f"{c}ch@{r}"] = {"conv_s": timed(lambda: conv(xi), 5), "same_flops_gemm_s": timed(lambda: a @ w, 5),
                               "gflop": round(2 * r * r * 9 * c * c / 1e9, 2)}
    out["conv3x3"] = convs
    # the whole decode with MLX's GroupNorm (fewer evaluations; more memory)
    def swap(m):
        for k, v in list(m.children().items()):
            if isinstance(v, vae_mod.GroupNorm):
                g = MLXGroupNorm(v.groups, v.weight.shape[0], v.eps)
                g.gn.weight, g.gn.bias = v.weight, v.bias
                m[k] = g
            elif isinstance(v, nn.Module):
                swap(v)
            elif isinstance(v, list):
                for item in v:
                    if isinstance(item, nn.Module):
                        swap(item)
    swap(vae.decoder)
    out["decode_mlx_groupnorm_s"] = timed(lambda: vae.decoder(z))
    out["decode_mlx_groupnorm_compiled_s"] = timed(mx.compile(lambda: vae.decoder(z)))
    vae.set_dtype(mx.float32)
    out["decode_mlx_groupnorm_f32_s"] = timed(lambda: vae.decoder(z.astype(mx.float32)))
    out["peak_gb"] = round(mx.get_peak_memory() / 1e9, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
