#!/usr/bin/env python3
"""Convert a FLUX.2 checkpoint (BFL files, a diffusers folder, or a hub repo) into an MLX-ready folder.

    python scripts/convert.py klein-4b ~/models/klein-4b-mlx
    python scripts/convert.py black-forest-labs/FLUX.2-dev ~/models/dev-int4 --quantize int4 --text-encoder-quantize int4
    python scripts/convert.py ./flux-2-klein-base-4b.safetensors ./klein-base-4b-mlx --variant klein-base-4b

The output holds the weights in mflux2's internal layout — the transformer with BFL names (fused
q/k/v, the final adaLN in BFL order), the VAE with NHWC convolutions, the text encoder as an mlx-lm
model cut after its deepest used layer — optionally pre-quantised (int8/int4, MLX affine, group
size 64) for the transformer and the text encoder, plus the tokenizer and `mflux2.json`, which records
the source, variant, dtype and quantisation. `Flux2Pipeline.from_pretrained(OUTPUT)` (and
`mflux2-generate --model OUTPUT`) load it with no conversion and no quantisation pass.

The output is written to a temporary folder beside OUTPUT, verified by reloading every component
from disk and comparing per-tensor checksums with what was converted, and only then moved into place.
An existing OUTPUT is never replaced without --force, and --force only replaces an earlier
mflux2 conversion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mflux2 import __version__  # noqa: E402
from mflux2.hub import ModelLoadError  # noqa: E402
from mflux2.models.quantization import QUANT_GROUP_SIZE  # noqa: E402
from mflux2.model_files import MFLUX2_CONFIG, MFLUX2_FORMAT_VERSION, SAMPLING_FILE, save_component  # noqa: E402
from mflux2.pipeline import Flux2Pipeline  # noqa: E402
from mflux2.weights import WeightsError  # noqa: E402

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
GROUP_SIZE = 64  # the text encoder's (mlx-lm's default); the transformer's: QUANT_GROUP_SIZE
# files of a text-encoder folder that are not tokenizer files (when the tokenizer lives inside it)
_NOT_TOKENIZER = ("config.json", "generation_config.json", "model.safetensors.index.json")


class ConvertError(RuntimeError):
    """The conversion cannot proceed. One line."""


def _checksums(named: list[tuple[str, mx.array]]) -> dict[str, list]:
    """Per-tensor fingerprint: dtype, shape and a hash of the bytes in logical (row-major) order —
    independent of how the array happens to be laid out in memory (a transposed view, say)."""
    import hashlib

    import numpy as np

    uint = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
    out = {}
    for k, v in named:
        raw = np.ascontiguousarray(np.array(v.view(uint[v.itemsize])))
        out[k] = [str(v.dtype), list(v.shape), hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()]
    return out


def _quant_record(name: str | None, group_size: int = GROUP_SIZE) -> dict | None:
    return None if not name else {"name": name, "bits": int(name[3:]), "group_size": group_size}


def _text_encoder_prefix(family: str) -> str:
    """Key prefix of the backbone inside the mlx-lm model (what `model.sanitize` expects back)."""
    return "model." if family == "qwen3" else "language_model.model."


def _te_quantization(encoder, bits: int, prefix: str) -> dict:
    """mlx-lm's `quantization` config entry, with per-layer overrides where a layer's group size differs."""
    import mlx.nn as nn

    q = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for path, m in encoder.model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and (m.group_size, m.bits) != (GROUP_SIZE, bits):
            q[prefix + path] = {"group_size": m.group_size, "bits": m.bits}
    return q


def _copy_tokenizer(src: Path, dst: Path, inside_text_encoder: bool) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        if inside_text_encoder and (f.suffix == ".safetensors" or f.name in _NOT_TOKENIZER or f.name.endswith(".index.json")):
            continue
        shutil.copy2(f, dst / f.name)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, leave=False)


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def convert(source: str, output: str | Path, variant: str | None = None, quantize: str | None = None,
            text_encoder_quantize: str | None = None, dtype: str = "bfloat16", force: bool = False,
            progress: bool = True, revision: str | None = None, **pipeline_kwargs) -> Path:
    """Convert `source` (anything `Flux2Pipeline.from_pretrained` takes) to an mflux2 folder at
    `output`. Returns the output path. `pipeline_kwargs` go to from_pretrained (e.g. the text
    encoder's `max_sequence_length` / `text_encoder_out_layers` for tiny test models; they are
    recorded so that the converted folder behaves the same)."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(output).expanduser().resolve()
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not force:
            raise ConvertError(f"{out} already exists: choose another output or pass --force to replace it")
        if out.is_file() or not (out / MFLUX2_CONFIG).is_file():
            raise ConvertError(f"{out} exists and is not an mflux2 conversion; --force only replaces those — remove it yourself")
    src_path = Path(source).expanduser()
    if src_path.exists() and out in (src_path.resolve(), *src_path.resolve().parents):
        raise ConvertError(f"{out}: the output must not be the source folder or contain it")

    pipe = Flux2Pipeline.from_pretrained(source, variant=variant, dtype=DTYPES[dtype], quantize=quantize,
                                         text_encoder_quantize=text_encoder_quantize, low_memory=True,
                                         revision=revision, **pipeline_kwargs)
    src = pipe.source
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        sums = {}
        say = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)

        say(f"transformer: loading from {src.transformer}")
        model = pipe.transformer
        with _bar(_nbytes(model), "transformer", progress) as bar:
            save_component(model, tmp / "transformer", model.config.to_dict(), progress=bar)
        quant = getattr(model, "quantization", None)
        tr_quant = _quant_record(quant, QUANT_GROUP_SIZE.get(quant))
        sums["transformer"] = _checksums(tree_flatten(model.parameters()))
        pipe.release("transformer")
        del model

        say(f"vae: loading from {src.vae}")
        vae = pipe.vae
        with _bar(_nbytes(vae), "vae", progress) as bar:
            save_component(vae, tmp / "vae", asdict(vae.config), progress=bar)
        sums["vae"] = _checksums(tree_flatten(vae.parameters()))
        pipe.release("vae")
        del vae

        say(f"text encoder: loading from {src.text_encoder}")
        te = pipe.text_encoder
        prefix = _text_encoder_prefix(te.config.family)
        te_cfg = json.loads((Path(src.text_encoder) / "config.json").read_text())
        te_quant = _quant_record(getattr(te, "quantization", None))
        if te_quant:
            te_cfg["quantization"] = _te_quantization(te, te_quant["bits"], prefix)
        else:
            te_cfg.pop("quantization", None)
        te_params = [(prefix + k, v) for k, v in tree_flatten(te.model.parameters())]
        with _bar(sum(v.nbytes for _, v in te_params), "text encoder", progress) as bar:
            save_component(te_params, tmp / "text_encoder", te_cfg, progress=bar)
        sums["text_encoder"] = _checksums(te_params)
        te_options = {"max_length": te.config.max_length, "hidden_layers": list(te.config.hidden_layers),
                      "masked_rows": te.config.masked_rows}
        pipe.release("text_encoder")
        del te, te_params

        _copy_tokenizer(Path(src.tokenizer), tmp / "tokenizer", Path(src.tokenizer) == Path(src.text_encoder))

        record = {
            "format": "mflux2",
            "version": MFLUX2_FORMAT_VERSION,
            "family": src.family,
            "variant": src.variant,
            "source": str(source),
            "source_layout": src.layout,
            "dtype": dtype,
            "transformer": {"quantization": tr_quant},
            "text_encoder": {"quantization": te_quant},
            "vae": {"quantization": None},
            "text_encoder_options": te_options,
            "converted_by": f"mflux2 {__version__} scripts/convert.py",
        }
        (tmp / MFLUX2_CONFIG).write_text(json.dumps(record, indent=2))
        if src.sampling:  # the model's own generation defaults travel with it
            (tmp / SAMPLING_FILE).write_text(json.dumps(src.sampling) + "\n")

        say("verifying: reloading every component from the written files")
        _verify(tmp, sums, src.variant, DTYPES[dtype])

        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _verify(folder: Path, sums: dict, variant: str | None, dtype: mx.Dtype) -> None:
    pipe = Flux2Pipeline.from_pretrained(folder, dtype=dtype, low_memory=True)
    if pipe.source.variant != variant:
        raise ConvertError(f"verification failed: the written folder reads as {pipe.source.variant}, not {variant}")
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, name)
        params = tree_flatten((module.model if name == "text_encoder" else module).parameters())
        if name == "text_encoder":
            prefix = _text_encoder_prefix(module.config.family)
            params = [(prefix + k, v) for k, v in params]
        got = _checksums(params)
        if got != sums[name]:
            bad = sorted(k for k in set(got) | set(sums[name]) if got.get(k) != sums[name].get(k))
            raise ConvertError(f"verification failed: {name} tensor(s) differ after reloading: {', '.join(bad[:3])}")
        pipe.release(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a FLUX.2 checkpoint (BFL, diffusers or a hub repo) to an MLX-ready mflux2 folder.",
    )
    p.add_argument("source", help="short name (klein-4b, ...), Hugging Face repo id, local folder or transformer file")
    p.add_argument("output", help="folder to create")
    p.add_argument("--variant", help="klein-4b, klein-9b, dev, klein-base-4b or klein-base-9b, where the files cannot tell")
    p.add_argument("--quantize", choices=("int8", "int4"), help="pre-quantise the transformer")
    p.add_argument("--text-encoder-quantize", choices=("int8", "int4"), help="pre-quantise the text encoder")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="precision of the unquantised weights (default bfloat16)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--force", action="store_true", help="replace an existing mflux2 folder at OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = p.parse_args(argv)
    try:
        out = convert(args.source, args.output, variant=args.variant, quantize=args.quantize,
                      text_encoder_quantize=args.text_encoder_quantize, dtype=args.dtype, force=args.force,
                      progress=not args.quiet, revision=args.revision)
    except (ConvertError, ModelLoadError, WeightsError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"convert.py: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
