"""The VLM's cost in a cat-toy job: captions for 7 cat-toy-sized images (mflux2-caption's path) and
the scoring of one checkpoint's validation images (the trainer's path: load, score, free), printed
as one JSON line of seconds and peak GB.

    python scripts/vlm_benchmark.py                         # the default VLM (mlx-community/Qwen3.5-4B-MLX-4bit)
    python scripts/vlm_benchmark.py --model FOLDER_OR_ID    # another VLM
    python scripts/vlm_benchmark.py --random-4b             # the default VLM's architecture, random 4-bit weights
    python scripts/vlm_benchmark.py --tiny                  # the tests' tiny Qwen3.5 (a CPU check of this script)

What is scored is what configs/cat-toy.yaml's run scores at each checkpoint: its two trigger prompts
against references from the dataset and (DOP is on) its two no-trigger prompts for bleed, at 512².
The images are synthetic (a textured square on a gradient): the dataset's 1024² by default (--size;
diffusers/cat_toy_example's photos are 902x846 to 1167x1010), the validation images 512² (--val-size).

A random model never ends a reply: each answer runs to max_tokens (120 for a caption, 300 for a
score), so its decoding times are an upper bound; the real model stops after its sentence or its
~60-token JSON. Its captions and scores are noise; the times and memory are what count. The
synthetic tokenizer of --random-4b encodes prompts byte by byte (~4x Qwen's token count), which
lengthens the prefill too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mflux2 and tests/ from this checkout


def make_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        img = np.stack([x, y, 1 - x], -1) * 0.5 + 0.25 + 0.05 * g.standard_normal((size, size, 3))
        c = int(g.integers(size // 8, size // 2))
        img[c: c + size // 3, c: c + size // 3] = g.random(3)
        path = folder / f"{i}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        out.append(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="VLM folder, hub id or short name (default: mflux2's default VLM)")
    src.add_argument("--random-4b", action="store_true", help="the default VLM's architecture with random 4-bit weights")
    src.add_argument("--tiny", action="store_true", help="the tests' tiny Qwen3.5, whose replies end at once (CPU)")
    ap.add_argument("--images", type=int, default=7, help="images to caption (default 7)")
    ap.add_argument("--size", type=int, default=1024, help="dataset image side in pixels (default 1024)")
    ap.add_argument("--val-size", type=int, default=512, help="validation image side in pixels (default 512, cat-toy's)")
    ap.add_argument("--work", help="folder for the images (and the random model); default a temporary one")
    args = ap.parse_args(argv)

    import mlx.core as mx

    from mflux2 import vlm
    from mflux2.captions import caption_images
    from mflux2.training.config_loading import load_config
    from mflux2.training.scoring import plan_targets, score_images, select_references
    from mflux2.training.validation import validation_items

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vlm_bench_"))
    model = args.model or vlm.DEFAULT_VLM
    build_s = None
    if args.random_4b or args.tiny:
        from tests.tiny_vlm import build_random_qwen35, build_tiny_qwen35

        t0 = time.perf_counter()
        model = str(build_random_qwen35(work / "vlm") if args.random_4b else build_tiny_qwen35(work / "vlm"))
        build_s = time.perf_counter() - t0
        mx.clear_cache()

    data = make_images(work / "data", args.images, args.size, seed=0)
    mx.reset_peak_memory()
    cap = caption_images(data, model, trigger="sks", style="subject", overwrite=True, class_word="toy",
                         log=lambda *a: None, progress=False)
    caption_peak = mx.get_peak_memory() / 1e9

    cfg = load_config(ROOT / "configs" / "cat-toy.yaml")
    items = validation_items(cfg)
    refs = select_references([], data, cfg.validation.vlm_scoring.max_reference_images, log=lambda *a: None)
    targets, how = plan_targets(cfg, items, refs)
    ckpt = work / "checkpoint_000125"
    ckpt.mkdir(exist_ok=True)
    for t, img in zip(targets, make_images(work / "val", len(targets), args.val_size, seed=1)):
        img.replace(ckpt / t.file)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with vlm.loaded(model, log=lambda *a: None) as m:
        load_s = time.perf_counter() - t0
        results = score_images(m, ckpt, targets, cfg.validation.vlm_scoring.scene_weight,
                               cfg.loss.diff_output_preservation_class, log=lambda *a: None)
    score_s = time.perf_counter() - t0
    score_peak = mx.get_peak_memory() / 1e9

    folder = vlm.cached_folder(model)
    print(json.dumps({
        "model": "tiny" if args.tiny else "Qwen3.5-4B architecture (random 4-bit)" if args.random_4b else model,
        "weights_gb": round(vlm.weights_bytes(folder) / 1e9, 3) if folder else None,
        "captions": cap.written, "caption_failed": len(cap.failed), "caption_s": round(cap.seconds, 2), "caption_s_per_image": round(cap.seconds / max(len(data), 1), 2),
        "caption_peak_gb": round(caption_peak, 3),
        "scored_images": len(results), "scoring": how, "score_s": round(score_s, 2), "score_load_s": round(load_s, 2),
        "score_peak_gb": round(score_peak, 3), "unscored": sum(r["score"] is None for r in results),
        "image_size": args.size, "val_size": args.val_size, "build_s": round(build_s, 1) if build_s is not None else None,
        "device": str(mx.default_device()), "mlx": mx.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
