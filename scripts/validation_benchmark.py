"""Where a validation image's time goes, piece by piece (why: in the cat-toy job on an H100, four 512²
validation images took 5.6 s, ten times the transformer's share; docs/performance.md, "Whole job").

    python scripts/validation_benchmark.py                  # klein-4b + the FLUX.2 VAE, random weights
    python scripts/validation_benchmark.py --tiny           # this machine's CPU (tests/test_benchmark.py)

Times, after one untimed warm-up of each (first-use kernel compilation is not the steady cost):
the transformer forward at each size (as sampling.denoise calls it: uncompiled, one evaluation per
step), 4 steps of sampling.denoise itself (its memory bound on the run-ahead included: run it with
MFLUX2_SAMPLING_RUN_AHEAD=none for the time without the bound), the VAE decode and encode at each size, and the PNG write. Prints one JSON line (seconds per
call, peak GB per piece) and what four validation images of the job would cost from those figures.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mflux2 from this checkout


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median seconds, peak GB) of `fn()` after one warm-up call; fn evaluates what it computes."""
    import mlx.core as mx

    fn()
    times = []
    mx.reset_peak_memory()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mx.get_peak_memory() / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a smoke test)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sizes (default 512 1024; 64 with --tiny)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    import mlx.core as mx

    from mflux2 import sampling
    from mflux2.images import array_to_pil
    from mflux2.models.transformer import Flux2Transformer, TransformerConfig, preset
    from mflux2.models.vae import Flux2VAE, VAEConfig, image_ids

    sizes = args.sizes or ([64] if args.tiny else [512, 1024])
    if args.tiny:
        tcfg = TransformerConfig(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                                 joint_attention_dim=48, axes_dims_rope=(8, 8, 8, 8))
        vcfg = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
        text_len = 16
    else:
        tcfg, vcfg, text_len = preset("klein-4b"), VAEConfig(), 512
    model = Flux2Transformer(tcfg)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    model.eval()
    vae = Flux2VAE(vcfg)
    vae.set_dtype(mx.bfloat16)
    mx.eval(vae.parameters())
    embeds = mx.random.normal((1, text_len, tcfg.joint_attention_dim)).astype(mx.bfloat16)
    txt_ids = mx.zeros((text_len, 4))

    result = {"model": "tiny" if args.tiny else "klein-4b", "date": time.strftime("%Y-%m-%d"),
              "device": mx.device_info().get("device_name", str(mx.default_device())), "sizes": {}}
    for s in sizes:
        n = sampling.image_seq_len(s, s)
        x = sampling.initial_noise(0, 1, s, s).astype(mx.bfloat16)
        ids = image_ids(s, s)
        t = mx.array([0.5])

        def forward():
            mx.eval(model(x, embeds, t, ids, txt_ids))

        latents = vae.unpack(x.astype(mx.float32), s, s)

        def decode():
            mx.eval(vae.decode(latents))

        pixels = mx.clip(vae.decode(latents).astype(mx.float32), -1, 1)
        mx.eval(pixels)

        def encode():
            mx.eval(vae.pack(vae.encode(pixels)))

        def png():
            array_to_pil(pixels[0]).save(io.BytesIO(), format="PNG")

        def denoise4():  # the job's validation: 4 Euler steps through sampling.denoise (its run-ahead bound)
            mx.eval(sampling.denoise(model, x, embeds, txt_ids, ids, [1.0, 0.75, 0.5, 0.25, 0.0]))

        row = {}
        for name, fn in (("forward", forward), ("denoise_4_steps", denoise4), ("vae_decode", decode),
                         ("vae_encode", encode), ("png", png)):
            sec, peak = timed(fn, args.repeat)
            row[f"{name}_s"], row[f"{name}_peak_gb"] = round(sec, 4), round(peak, 3)
        row["tokens"] = n
        result["sizes"][str(s)] = row
    # the cat-toy job's validation: 4 images at 512², 4 steps each (distilled, no CFG)
    r = result["sizes"].get("512") or result["sizes"][str(sizes[0])]
    result["four_images_4_steps_s"] = round(4 * (4 * r["forward_s"] + r["vae_decode_s"] + r["png_s"]), 3)
    result["sampling_run_ahead"] = sampling.RUN_AHEAD  # MFLUX2_SAMPLING_RUN_AHEAD (None: no bound)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
