"""`mflux2-regset`: a regularisation (prior-preservation) set from the base model, before training.

    mflux2-regset --model klein-4b --prompt "a photo of a woman" --prompt "a portrait of a woman" \
        --count 100 --size 512 --output data/woman_reg

writes, per prompt, `count` images with seeds seed, seed+1, ... (`<prompt slug>_<seed>.png`) and a
caption file beside each holding its prompt — a folder to give as a `datasets:` entry with
`is_regularization: true`. Images come from `Flux2Pipeline.generate` (the sampling code the
validation images use: same noise for a seed, same schedule, same guidance rules); steps and guidance
default to the validation defaults of the model (mflux2.training.config.MODEL_DEFAULTS). Files already
there are kept, so an interrupted command continues where it stopped."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40] or "prompt"


def make_regset(pipe, prompts: list[str], count: int, size: int, output: Path, steps: int | None = None,
                guidance: float | None = None, seed: int = 0, log=print) -> list[Path]:
    """Generate `count` images per prompt into `output` with their caption files; returns the images."""
    from mflux2.training.config import MODEL_DEFAULTS

    d = MODEL_DEFAULTS.get(pipe.variant or "")
    steps = steps if steps is not None else (d.validation_steps if d else None)
    guidance = guidance if guidance is not None else (d.validation_guidance if d else None)
    output.mkdir(parents=True, exist_ok=True)
    names = [slug(p) for p in prompts]
    if len(set(names)) < len(names):
        raise SystemExit("mflux2-regset: two prompts give the same file name; make them differ in their words")
    written = []
    for prompt, name in zip(prompts, names):
        for k in range(count):
            png = output / f"{name}_{seed + k:04d}.png"
            if not png.exists():
                image = pipe.generate(prompt, size, size, num_inference_steps=steps, guidance_scale=guidance,
                                      seed=seed + k, progress=False)[0]
                tmp = png.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(png)
            png.with_suffix(".txt").write_text(prompt + "\n")
            written.append(png)
        log(f"{prompt!r}: {count} image(s) in {output}")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mflux2-regset", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model name (klein-4b, ...), hub id or local folder: the BASE model")
    p.add_argument("--prompt", action="append", required=True, help="a class prompt (repeat for several)")
    p.add_argument("--count", type=int, default=50, help="images per prompt (default 50)")
    p.add_argument("--size", type=int, default=512, help="width and height in pixels (a multiple of 16; default 512)")
    p.add_argument("--output", required=True, help="folder to write the images and captions into")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="the transformer's precision")
    args = p.parse_args(argv)
    if args.count < 1 or args.size % 16 or args.size < 64:
        p.error("--count must be >= 1 and --size a multiple of 16, at least 64")
    from mflux2.pipeline import Flux2Pipeline

    # both stay loaded between images (low_memory would reload them for each)
    pipe = Flux2Pipeline.from_pretrained(args.model, quantize=args.quantize, low_memory=False)
    make_regset(pipe, args.prompt, args.count, args.size, Path(args.output), args.steps, args.guidance, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
