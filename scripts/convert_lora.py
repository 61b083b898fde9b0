#!/usr/bin/env python3
"""Convert a FLUX.2 adapter file (LoRA, LoCon, DoRA, LoKr, LoHa) between layouts (no model needed:
shapes come from the file).

    python scripts/convert_lora.py in.safetensors out.safetensors --format bfl|diffusers|kohya [--base MODEL]

Reads ai-toolkit/BFL, diffusers/PEFT, kohya/musubi, LyCORIS, OneTrainer and mflux2 files. `bfl` (the
default) writes `diffusion_model.<BFL module>.*` (LoRA: lora_A/B.weight with alpha folded into B;
LoKr/LoHa: lokr_*/hada_* with `.alpha`); `diffusers` writes `transformer.*` names with q/k/v split
(LoRA and DoRA only); `kohya` writes `lora_unet_*` (lora_down/lora_up or lokr_*/hada_*, plus `.alpha`).
DoRA to or from `bfl`/`kohya` (ComfyUI's dora_scale) needs `--base`: the model the file is for. See
docs/lora.md, "Adapter types and their files".
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import mlx.core as mx  # noqa: E402

from mflux2.hub import ModelLoadError  # noqa: E402
from mflux2.lora_formats import FORMATS  # noqa: E402
from mflux2.lora_tools import convert  # noqa: E402
from mflux2.weights import WeightsError  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="input LoRA .safetensors")
    ap.add_argument("dst", help="output .safetensors (written atomically)")
    ap.add_argument("--format", choices=FORMATS, default="bfl", help="output layout (default: bfl)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="output precision (default: that of the input)")
    ap.add_argument("--lenient", action="store_true", help="skip keys that are not FLUX.2 adapter tensors (listed as a warning)")
    ap.add_argument("--base", metavar="MODEL", help="model folder, BFL file or name whose transformer the file is for "
                                                    "(needed for DoRA to or from the bfl/kohya layouts)")
    args = ap.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            out = convert(args.src, args.dst, args.format, base=args.base, dtype=args.dtype, strict=not args.lenient, quiet=True, log=lambda *a: None)
    except (WeightsError, ModelLoadError) as e:  # LoRAError, a model that cannot be read or found
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
