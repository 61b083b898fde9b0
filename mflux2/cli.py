"""Command-line entry points.

`mflux2-generate` (generate_main): text-to-image with a FLUX.2 model, or editing with reference images
(`--image`), optionally with LoRAs; writes PNGs that carry the generation parameters in their text
metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from mflux2 import __version__

# ==============================================================================================
# mflux2-generate
# ==============================================================================================

GENERATE_EXAMPLES = """examples:
  mflux2-generate --model klein-4b --prompt "a red fox in the snow" --output fox.png
  mflux2-generate --model ./FLUX.2-klein-base-4B --prompt @prompts.txt --steps 30 --guidance 4 --output out/
  mflux2-generate --model dev --quantize int4 --text-encoder-quantize int4 --lora style.safetensors:0.8 \\
                  --prompt "a city at night" --width 1360 --height 768 --seed 42
  mflux2-generate --model klein-4b --image photo.jpg --prompt "make it a snowy winter day" --output edit.png
  mflux2-generate --model klein-9b --image person.png --image jacket.png --prompt "the person wears the jacket"
"""


def _parse_lora(value: str) -> tuple[str, float]:
    """PATH or PATH:SCALE (the scale is whatever follows the last colon, if it is a number)."""
    path, sep, scale = value.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


def _resolve_loras(values: list[str]) -> list[tuple[str, float]]:
    """--lora values -> [(local file, scale)]: local files or folders, or hub ids (`user/repo` with one
    .safetensors file, `user/repo/file.safetensors`) fetched through the Hugging Face cache."""
    from mflux2.lora_formats import resolve_lora_file

    return [(str(resolve_lora_file(path, label="--lora")), scale) for path, scale in map(_parse_lora, values)]


def _quant(value: str) -> str | None:
    v = value.lower()
    if v in ("none", "bf16", "bfloat16"):
        return None
    if v not in ("int8", "int4"):
        raise argparse.ArgumentTypeError(f"{value!r}: choose int8, int4 or bf16")
    return v


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mflux2-generate",
        description="Generate images with FLUX.2 (klein-4b, klein-9b, klein-base-4b, klein-base-9b, dev) on MLX.",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", "-m", required=True,
                   help="short name (klein-4b, klein-9b, dev, klein-base-4b, klein-base-9b), Hugging Face repo id, "
                        "or local folder / transformer file")
    p.add_argument("--variant", help="the variant, where the files cannot tell (a BFL klein file without 'base' in its name)")
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help="prompt text; repeat for several images, or @FILE for one prompt per non-empty line")
    p.add_argument("--negative-prompt", help="negative prompt for klein-base's CFG (default: the empty prompt)")
    p.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                   help="reference image for editing; repeat for several (they get position ids t = 10, 20, ...)")
    p.add_argument("--reference-caps", choices=("diffusers", "bfl"), default="diffusers",
                   help="pixel cap of each reference: diffusers 1024x1024 (default); bfl 2024x2024 for a single one")
    p.add_argument("--width", type=int, help="image width, a multiple of 16 (default: the first --image's, else the model folder's own, else 1024)")
    p.add_argument("--height", type=int, help="image height, a multiple of 16 (default: the first --image's, else the model folder's own, else 1024)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model folder's own (mflux2_sampling.json), else 4 for klein, 50 for klein-base and dev)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model folder's own, else 4.0 for klein-base and dev; klein ignores it)")
    p.add_argument("--seed", type=int, default=0, help="random seed; prompt i uses seed+i (default 0)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="adapter file (LoRA, DoRA, LoKr, LoHa; any common layout) with optional scale (default 1.0), or a "
                        "Hugging Face repo id: user/repo (one .safetensors file in it) or user/repo/file.safetensors; repeatable")
    p.add_argument("--quantize", "-q", type=_quant, help="transformer precision: int8 or int4 (default bf16)")
    p.add_argument("--text-encoder-quantize", type=_quant, help="text encoder precision: int8 or int4 (default bf16)")
    p.add_argument("--low-memory", action="store_true",
                   help="free the text encoder before denoising and the transformer before decoding (automatic when needed)")
    p.add_argument("--output", "-o", default="image.png",
                   help="PNG file, or a folder (existing, or ending in /); several images get _1, _2, ... (default image.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--version", action="version", version=f"mflux2 {__version__}")
    return p


def read_prompts(values: list[str]) -> list[str]:
    prompts = []
    for v in values:
        if v.startswith("@"):
            f = Path(v[1:]).expanduser()
            try:
                lines = f.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ValueError(f"{f}: cannot read the prompt file ({e.strerror})") from None
            found = [line.strip() for line in lines if line.strip()]
            if not found:
                raise ValueError(f"{f}: the prompt file has no non-empty line")
            prompts += found
        elif v.strip():
            prompts.append(v)
        else:
            raise ValueError("--prompt is empty")
    return prompts


def output_paths(output: str, n: int) -> list[Path]:
    out = Path(output).expanduser()
    blocking = first_file_in_the_way(out if output.endswith(("/", "\\")) else out.parent)
    if blocking is not None:
        raise ValueError(f"--output {output}: {blocking} is a file, not a folder; pick another --output")
    if output.endswith(("/", "\\")) or out.is_dir():
        return [out / f"image_{i + 1}.png" for i in range(n)] if n > 1 else [out / "image.png"]
    if out.suffix.lower() != ".png":
        raise ValueError(f"--output {output}: give a .png file name or a folder")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(n)]


def first_file_in_the_way(folder: Path) -> Path | None:
    """The file standing where `folder` or one of its parents should be (None: it can be made)."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def save_png(image, path: Path, parameters: dict) -> None:
    """Save with the parameters as PNG text chunks: one key each, plus all of them as JSON under
    `parameters` (what image viewers and `PIL.Image.open(path).text` show)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in parameters.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    info.add_text("parameters", json.dumps(parameters, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def _run_generate(args) -> list[Path]:
    import mlx.core as mx

    from mflux2.pipeline import Flux2Pipeline

    prompts = read_prompts(args.prompt)
    paths = output_paths(args.output, len(prompts))
    loras = _resolve_loras(args.lora)
    for path in args.image:
        if not Path(path).expanduser().is_file():
            raise ValueError(f"--image {path}: no such file")

    pipe = Flux2Pipeline.from_pretrained(
        args.model, variant=args.variant, dtype=mx.bfloat16, quantize=args.quantize,
        text_encoder_quantize=args.text_encoder_quantize, low_memory=True if args.low_memory else None,
    )
    for path, scale in loras:
        pipe.load_lora(path, scale)
    steps, guidance, cfg = pipe.sampling_settings(args.steps, args.guidance, args.negative_prompt)
    refs = [str(Path(p).expanduser()) for p in args.image]
    images = pipe.generate(
        prompts, width=args.width, height=args.height, num_inference_steps=steps, guidance_scale=guidance,
        seed=args.seed, negative_prompt=args.negative_prompt if cfg else None, progress=not args.quiet,
        image=refs or None, reference_caps=args.reference_caps,
    )
    for i, (image, path) in enumerate(zip(images, paths)):
        params = {
            "prompt": prompts[i],
            "model": args.model,
            "variant": pipe.source.name,
            "width": image.width,
            "height": image.height,
            "steps": steps,
            "guidance": guidance,
            "cfg": cfg,
            "seed": args.seed + i,
            "loras": [{"path": p, "scale": s} for p, s in loras],
            "quantize": args.quantize or "bf16",
            "text_encoder_quantize": args.text_encoder_quantize or "bf16",
            "software": f"mflux2 {__version__}",
        }
        if cfg:
            params["negative_prompt"] = args.negative_prompt or ""
        if refs:
            params["images"] = args.image
            params["reference_caps"] = args.reference_caps
        save_png(image, path, params)
        print(path)
    return paths


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    from mflux2.hub import ModelLoadError
    from mflux2.weights import WeightsError

    known = (ModelLoadError, WeightsError, ValueError, OSError)
    try:
        from mflux2.lora import LoRAError

        known += (LoRAError,)
    except ImportError:  # the LoRA module is optional for plain generation
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            _run_generate(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except known as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mflux2-generate: error: {msg}", file=sys.stderr)
        return 1
    return 0


# ==============================================================================================
# mflux2-train
# ==============================================================================================
# The training entry point lives here too (the lead adds `train_main`).


if __name__ == "__main__":  # python -m mflux2.cli: mflux2-generate without the console script
    sys.exit(generate_main())
