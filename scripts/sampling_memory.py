"""What a sampling forward holds beyond the weights (issue 34): a reduced FLUX.2 at the real widths
of a variant (dev: hidden 6144, 48 heads, MLP ×3, context 15,360), few blocks, quantized on load as
the trainer's loader quantizes it, with the run's LoRA, sampled by `sampling.denoise` (the function
the trainer's validation and the pipeline call).

Each mode prints one JSON line: the peak (`mx.get_peak_memory`) minus what was allocated when it
began — the model and the inputs, and whatever else the process holds (`excess_gb`) — beside the
analytical live set of one forward (`sampling.model_live_bytes`):
  forward       one eager forward, one evaluation at the end, no memory limit
  serial        the same with MLX's memory limit at 1 byte: each operation waits for those before it
                (the graph's live set without run-ahead; on the CPU MLX still runs ~10 operations ahead)
  denoise       `sampling.denoise` for --steps steps with dev's guidance, as the validation calls it
On a GPU `forward` minus `serial` is the host's run-ahead (buffers held by command buffers in
flight); on the CPU MLX lets ~100 operations run ahead. --before: the code before issue 34's fix
(tiles dequantised as the graph allows, no memory limit while sampling).

  python scripts/sampling_memory.py --variant dev --double 1 --single 2 --size 512 --text 512
(the CPU figures in docs/performance.md, "Whole job", used --size 64 --text 16 --min-rows 1: a
512² forward of this model takes about an hour on a shared 2-core CPU.)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

GB = 1e9


def reduced_model(variant: str, double: int, single: int, quantize: str | None, rank: int, targets: str, seed: int = 0,
                  dtype=mx.bfloat16, **widths):
    """The variant's widths with `double` + `single` blocks, random weights materialised (and
    quantized) block by block as `load_transformer` loads a checkpoint (benchmark.random_transformer),
    the LoRA applied as the trainer does."""
    from benchmark import random_transformer

    from mflux2 import lora as lora_mod
    from mflux2.models.transformer import TransformerConfig, preset

    mx.random.seed(seed)
    cfg = TransformerConfig(**{**preset(variant).to_dict(), "num_layers": double, "num_single_layers": single, **widths})
    model = random_transformer(cfg, dtype, base=quantize or "bf16")
    model.eval()
    if rank:
        lora_mod.apply_lora(model, rank=rank, alpha=float(rank), targets=targets)
        lora_mod.freeze_for_lora(model)
    mx.eval(model.parameters())
    return model


def model_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def inputs(cfg, size: int, text: int, seed: int = 0, dtype=mx.bfloat16):
    from mflux2 import sampling
    from mflux2.models.vae import image_ids

    x = sampling.initial_noise(seed, 1, size, size)
    emb = 0.1 * mx.random.normal((1, text, cfg.joint_attention_dim), key=mx.random.key(seed + 1)).astype(dtype)
    txt_ids = mx.concatenate([mx.zeros((text, 3)), mx.arange(text, dtype=mx.float32)[:, None]], axis=1)  # (0, 0, 0, i): the trainer's
    ids = (txt_ids, image_ids(size, size))
    mx.eval(x, emb, *ids)
    return x, emb, *ids


def measure(mode: str, model, x, emb, tids, iids, steps: int, guidance: float | None) -> dict:
    from mflux2 import sampling

    held = model_bytes(model) + sum(a.nbytes for a in (x, emb, tids, iids))
    b = x.shape[0]
    t = mx.full((b,), 1.0, dtype=mx.float32)
    g = mx.full((b,), guidance, dtype=mx.float32) if guidance is not None else None
    limit = None
    # The excess is counted above what is allocated now, not above `held`: in a test worker, arrays
    # earlier tests left alive (1-3 MB after the training tests) would otherwise count as sampling's.
    # Garbage goes first so that none of it is freed mid-measurement.
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    if mode == "forward":
        out = model(x.astype(model.dtype), emb, t, iids, tids, g)
    elif mode == "serial":
        limit = mx.set_memory_limit(1)
        out = model(x.astype(model.dtype), emb, t, iids, tids, g)
    elif mode == "denoise":
        sig = sampling.get_sigmas(steps, x.shape[1])
        out = sampling.denoise(model, x, emb[0][None], tids, iids, sig, guidance=guidance)
    else:
        raise ValueError(mode)
    mx.eval(out)
    if limit is not None:
        mx.set_memory_limit(limit)
    return {"mode": mode, "s": round(time.perf_counter() - t0, 2), "held_gb": round(held / GB, 4),
            "peak_gb": round(mx.get_peak_memory() / GB, 4), "excess_gb": round((mx.get_peak_memory() - base) / GB, 4),
            "others_gb": round((base - held) / GB, 4)}


def main(argv=None) -> None:
    from mflux2 import sampling
    from mflux2.ops import gemm
    from mflux2.training import memory

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="dev")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--quantize", default="int8", help="int8 | int4 | none")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (0: none)")
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--size", type=int, default=512, help="image side (px)")
    ap.add_argument("--text", type=int, default=memory.TEXT_TOKENS, help="text tokens")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--min-rows", type=int, default=None,
                    help="dequantise tiles from this many tokens on (gemm.DEQUANTIZE_MIN_ROWS; lower it to run the "
                         "512² path at a few tokens)")
    ap.add_argument("--modes", default="forward,serial,denoise")
    ap.add_argument("--before", action="store_true", help="the code before issue 34's fix")
    a = ap.parse_args(argv)
    if a.before:
        gemm.ORDERED_TILES, sampling.RUN_AHEAD = False, None
    if a.min_rows is not None:
        gemm.DEQUANTIZE_MIN_ROWS = a.min_rows
    t0 = time.perf_counter()
    model = reduced_model(a.variant, a.double, a.single, None if a.quantize == "none" else a.quantize, a.rank, a.targets)
    cfg = model.config
    x, emb, tids, iids = inputs(cfg, a.size, a.text)
    tokens = x.shape[1] + a.text
    head = {"variant": a.variant, "double": a.double, "single": a.single, "quantize": a.quantize, "rank": a.rank,
            "size": a.size, "tokens": tokens, "min_rows": gemm.DEQUANTIZE_MIN_ROWS, "build_s": round(time.perf_counter() - t0, 1),
            "weights_gb": round(model_bytes(model) / GB, 4), "device": str(mx.default_device()), "mlx": mx.__version__,
            "before_fix": a.before, "analytical_gb": round(sampling.model_live_bytes(model, tokens) / GB, 4)}
    print(json.dumps(head), flush=True)
    for mode in a.modes.split(","):
        print(json.dumps(measure(mode, model, x, emb, tids, iids, a.steps, a.guidance if cfg.guidance_embeds else None)),
              flush=True)


if __name__ == "__main__":
    main()
