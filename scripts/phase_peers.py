"""The phases around the training steps, ours beside their peers, one JSON line per
measurement as it goes:

    python scripts/phase_peers.py vae-peer [--sizes 512 1024]   # diffusers AutoencoderKLFlux2, torch bf16:
                                                                #   eager, cudnn.benchmark, torch.compile
    python scripts/phase_peers.py te-peer [--folder F]          # transformers Qwen3 encoding the job's prompts
                                                                #   (F: a klein folder's text_encoder; else random
                                                                #   Qwen3-4B weights); load, per prompt, batched
    python scripts/phase_peers.py load-peer --folder F          # safetensors / diffusers / transformers loads of F
    python scripts/phase_peers.py ours --folder F               # mflux2's loads and text encoding of the same folder,
                                                                #   split: file read, load, first prompt, the rest
    python scripts/phase_peers.py ours --tiny                   # the CPU smoke run (the toy model)
    python scripts/phase_peers.py load-cpu --size-gb 2          # any machine: ours against the read floor on
                                                                #   one random folder (--work W; written once)

The prompts are cat-toy's (configs/cat-toy.yaml, no captions: the trigger word stands for them):
7 unique prompts, each padded to 512 tokens, one at a time as the trainer embeds them. `--drop-caches`
(root, Linux): the page cache is emptied before the first read, so that read is the disk's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["sks", "sks toy", "a sks toy sitting on a beach", "a sks toy in a garden, golden hour",
           "a toy sitting on a beach", "a toy in a garden, golden hour", ""]
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, rope_theta=1_000_000, rms_norm_eps=1e-6, max_position_embeddings=40960,
                tie_word_embeddings=True)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_files(files) -> tuple[float, float]:
    """(seconds, GB) to read the files' bytes (16 MB reads)."""
    t, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                n += len(chunk)
    return time.perf_counter() - t, n / 1e9


def shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------
# torch peers


def _dev() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of this script


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else 0.0


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def _name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _torch_timed(fn, warmup=2, reps=5):
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync()
    first = time.perf_counter() - t0
    _reset_peak()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 5), _peak_gb(), round(first, 2)


def vae_peer(sizes, variants, tiny_cfg=None):
    import diffusers
    import torch

    torch.manual_seed(0)
    dev = _dev()
    base = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": _name()}
    for variant in variants:
        torch.backends.cudnn.benchmark = variant != "eager"
        vae = diffusers.AutoencoderKLFlux2(**(tiny_cfg or {})).to(dev, torch.bfloat16).eval()
        dec, enc = vae.decoder, vae.encoder
        if variant == "compile":
            vae.decoder, vae.encoder = torch.compile(dec), torch.compile(enc)
        for s in sizes:
            z = torch.randn(1, 32, s // 8, s // 8, device=dev, dtype=torch.bfloat16)
            img = torch.rand(1, 3, s, s, device=dev, dtype=torch.bfloat16) * 2 - 1
            with torch.no_grad():
                d = _torch_timed(lambda: vae.decode(z).sample)
                e = _torch_timed(lambda: vae.encode(img).latent_dist.mode())
            emit({"what": "vae peer", "variant": variant, "size": s, "decode_s": d[0], "decode_peak_gb": d[1],
                  "decode_warmup_s": d[2], "encode_s": e[0], "encode_peak_gb": e[1], "encode_warmup_s": e[2], **base})
        del vae, dec, enc
        gc.collect()
        _reset_peak()
        torch._dynamo.reset()


def _qwen3_inputs(folder: Path | None, n_tokens=512):
    """Token ids and masks of PROMPTS: the folder's tokenizer through mflux2's own tokenize (the same
    tokens ours embeds), else random ids with ~10-token prompts (the compute is the padded length's)."""
    import numpy as np

    if folder is not None:
        from mflux2.models.text_encoder import TextEncoder, TextEncoderConfig, load_tokenizer

        te = TextEncoder(None, load_tokenizer(folder / "tokenizer"), TextEncoderConfig("qwen3", (9, 18, 27)), 36)
        return [te.tokenize([p]) for p in PROMPTS]
    g = np.random.default_rng(0)
    out = []
    for p in PROMPTS:
        ids = g.integers(0, 151643, (1, n_tokens))
        mask = np.zeros((1, n_tokens), np.int64)
        mask[:, : 10 + len(p.split())] = 1
        out.append((ids, mask))
    return out


def te_peer(folder: Path | None):
    import torch
    import transformers

    dev = _dev()
    base = {"torch": torch.__version__, "transformers": transformers.__version__, "device": _name(),
            "weights": str(folder) if folder else "random Qwen3-4B"}
    inputs = _qwen3_inputs(folder)
    _reset_peak()
    t0 = time.perf_counter()
    if folder is not None:
        model = transformers.Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16, device_map=dev)
    else:
        with torch.device(dev):
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_4B)).to(torch.bfloat16)
    model.eval()
    _sync()
    load_s = time.perf_counter() - t0

    def run(ids, mask):
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids, device=dev), attention_mask=torch.as_tensor(mask, device=dev),
                        output_hidden_states=True, use_cache=False)
            hs = torch.stack([out.hidden_states[k] for k in (9, 18, 27)], dim=2)
            return hs.flatten(2).to("cpu")  # what a cache writes

    per = []
    for ids, mask in inputs:  # one at a time, as the trainer does; the first includes the warm-up
        t = time.perf_counter()
        run(ids, mask)
        per.append(time.perf_counter() - t)
    import numpy as np

    ids = np.concatenate([i for i, _ in inputs])
    mask = np.concatenate([m for _, m in inputs])
    peak = _peak_gb()
    batched = _torch_timed(lambda: run(ids, mask), warmup=1, reps=3)[0]
    steady = _torch_timed(lambda: run(*inputs[2]), warmup=1, reps=5)[0]
    t = time.perf_counter()
    del model
    gc.collect()
    _reset_peak()
    free_s = time.perf_counter() - t
    emit({"what": "text encoder peer", "load_s": round(load_s, 3), "first_prompt_s": round(per[0], 4),
          "other_prompts_s": round(sum(per[1:]), 4), "per_prompt_steady_s": steady, "batched_7_s": batched,
          "free_s": round(free_s, 3), "phase_s": round(load_s + sum(per) + free_s, 3),
          "peak_gb": peak, **base})


def load_peer(folder: Path):
    import safetensors.torch
    import torch

    dev = _dev()
    base = {"device": _name(), "folder": str(folder)}
    for comp in ("transformer", "text_encoder"):
        files = shards(folder / comp)
        secs, gb = read_files(files)
        emit({"what": "file read (page cache warm)", "component": comp, "s": round(secs, 3), "gb": round(gb, 3),
              "gb_per_s": round(gb / secs, 2)})
        t = time.perf_counter()
        tensors = [safetensors.torch.load_file(str(f), device=dev) for f in files]
        _sync()
        emit({"what": "load peer", "how": "safetensors.torch.load_file(device=cuda)", "component": comp,
              "s": round(time.perf_counter() - t, 3), "gb": round(gb, 3), **base})
        del tensors
        gc.collect()
        _reset_peak()
    import diffusers

    t = time.perf_counter()
    m = diffusers.Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16, device_map=dev)
    _sync()
    emit({"what": "load peer", "how": "diffusers Flux2Transformer2DModel.from_pretrained(device_map=cuda)",
          "component": "transformer", "s": round(time.perf_counter() - t, 3), **base})
    del m
    gc.collect()
    _reset_peak()


# ------------------------------------------------------------------------------------------------
# ours


def ours(folder: Path, variant: str, drop: bool):
    import mlx.core as mx

    from mflux2.models.text_encoder import load_text_encoder
    from mflux2.models.transformer import load_transformer

    base = {"device": mx.device_info().get("device_name", str(mx.default_device())), "mlx": mx.__version__, "folder": str(folder)}
    mx.eval(mx.zeros(1) + 1)  # the device's start-up, outside every timing below
    dropped = drop and drop_caches()
    te_files = shards(folder / "text_encoder")
    secs, gb = read_files(te_files)
    emit({"what": "file read", "component": "text_encoder", "page_cache": "dropped (disk)" if dropped else "as found",
          "s": round(secs, 3), "gb": round(gb, 3), "gb_per_s": round(gb / secs, 2), **base})
    secs, gb = read_files(te_files)
    emit({"what": "file read", "component": "text_encoder", "page_cache": "warm", "s": round(secs, 3), "gb": round(gb, 3),
          "gb_per_s": round(gb / secs, 2)})

    # MLX's own floor on the same files (mx.load + mx.eval, all kept): what our load can approach;
    # on the default stream (ours) and on the CPU stream (on CUDA: no host buffer + copy per tensor)
    emit({"what": "mx.load + mx.eval floor", "component": "text_encoder", **_timed_floor(te_files)})
    emit({"what": "mx.load(stream=mx.cpu) + mx.eval floor", "component": "text_encoder", **_timed_floor(te_files, mx.cpu)})
    # the load's imports (mlx-lm's models bring transformers and torch), which the peers do before
    # their timers
    t = time.perf_counter()
    import mlx_lm.models.qwen3  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    emit({"what": "import mlx-lm and transformers (torch with them), before the load", "s": round(time.perf_counter() - t, 3)})

    # the text-encoder phase, split as the trainer runs it: load, each prompt, release
    mx.reset_peak_memory()
    t = time.perf_counter()
    te = load_text_encoder(folder, variant)
    load_s = time.perf_counter() - t
    per = []
    for p in PROMPTS:
        t = time.perf_counter()
        te.encode([p])
        per.append(time.perf_counter() - t)
    steady = statistics.median(_mx_times(lambda: te.encode([PROMPTS[2]]), 5))
    batched = statistics.median(_mx_times(lambda: te.encode(PROMPTS), 2))
    t = time.perf_counter()
    te.release()
    free_s = time.perf_counter() - t
    emit({"what": "text encoder ours", "load_s": round(load_s, 3), "first_prompt_s": round(per[0], 4),
          "other_prompts_s": round(sum(per[1:]), 4), "per_prompt_steady_s": round(steady, 4), "batched_7_s": round(batched, 4),
          "free_s": round(free_s, 3), "phase_s": round(load_s + sum(per) + free_s, 3),
          "peak_gb": round(mx.get_peak_memory() / 1e9, 3), **base})
    del te
    gc.collect()
    mx.clear_cache()

    # the transformer: MLX's floor, the training load and the validation model's (the same files again)
    emit({"what": "mx.load + mx.eval floor", "component": "transformer", **_timed_floor(shards(folder / "transformer"))})
    emit({"what": "mx.load(stream=mx.cpu) + mx.eval floor", "component": "transformer",
          **_timed_floor(shards(folder / "transformer"), mx.cpu)})
    for what in ("transformer load (first)", "transformer load (again: the validation model's)"):
        mx.reset_peak_memory()
        t = time.perf_counter()
        model = load_transformer(folder, dtype=mx.bfloat16)
        mx.eval(model.parameters())
        emit({"what": what, "s": round(time.perf_counter() - t, 3), "peak_gb": round(mx.get_peak_memory() / 1e9, 3)})
        del model
        gc.collect()
        mx.clear_cache()


# ------------------------------------------------------------------------------------------------
# the loads on any machine (the CPU here): ours against the floor on the same files


def mx_load_floor(files, stream=None) -> list:
    """MLX's floor for a load: `mx.load` and one `mx.eval` a file, every array kept as a model keeps
    them (freed ones would be reused by the next file: no new pages, a floor too low). `stream`:
    mx.load's (None: the default device's; on CUDA that Load reads each tensor into a host buffer and
    copies it to the device, on the CPU stream it reads into unified memory on MLX's I/O threads)."""
    import mlx.core as mx

    arrays = []
    for f in files:
        arrays.append(mx.load(str(f), stream=stream))
        mx.eval(arrays[-1])
    return arrays


def _timed_floor(files, stream=None) -> dict:
    import mlx.core as mx

    mx.reset_peak_memory()
    t = time.perf_counter()
    arrays = mx_load_floor(files, stream)
    out = {"s": round(time.perf_counter() - t, 3), "peak_gb": round(mx.get_peak_memory() / 1e9, 3)}
    del arrays
    gc.collect()
    mx.clear_cache()
    return out


def write_load_folder(work: Path, size_gb: float) -> tuple[int, int]:
    """A folder in the diffusers klein layout with ~size_gb of random bf16 weights per component:
    transformer/ at klein-4b's widths (k double and 4k single blocks, klein-4b's ratio) and
    text_encoder/ at Qwen3-4B's (L layers), tokenizer/ at the real vocabulary size. Returns (k, L)."""
    from job_benchmark import _qwen3_config, _qwen3_tokenizer, _shapes_qwen3, _shapes_transformer, _write_shards

    from mflux2.models.transformer import preset

    k = max(1, round((size_gb - 0.39) / 1.47))  # klein-4b: 0.39 GB outside the blocks, 1.47 GB per (1 + 4)
    layers = max(3, round((size_gb - 0.78) / 0.2))  # Qwen3-4B: 0.78 GB of embeddings, 0.2 GB a layer
    done = work / "done.json"
    if done.exists() and json.loads(done.read_text()) == [k, layers]:
        return k, layers
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    tcfg = {**preset("klein-4b").to_dict(), "num_layers": k, "num_single_layers": 4 * k}
    qcfg = {**_qwen3_config("klein-4b"), "num_hidden_layers": layers}
    for comp, shapes, stem, config in (
            ("transformer", _shapes_transformer(tcfg), "diffusion_pytorch_model", {"_class_name": "Flux2Transformer2DModel", **tcfg}),
            ("text_encoder", _shapes_qwen3(qcfg), "model", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **qcfg})):
        # 1 GB shards, so that even a small folder has several files, as the real ones do
        _write_shards(work / comp, shapes, stem, f"{stem}.safetensors.index.json", shard_gb=1.0)
        (work / comp / "config.json").write_text(json.dumps(config))
    _qwen3_tokenizer(work / "tokenizer")
    done.write_text(json.dumps([k, layers]))
    return k, layers


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def load_cpu(work: Path, size_gb: float, reps: int, keep: bool):
    """Each load `reps` times, interleaved (a shared machine's noise hits all alike): the files' read
    (page cache warm), `mx.load` + one `mx.eval` a file (MLX's floor: every byte read once into MLX
    memory), `safetensors.torch.load_file` + `clone` (the CPU analogue of the peers' copy to cuda),
    and ours; wall and CPU seconds (the process's user + system, every thread) and MLX's peak."""
    import mlx.core as mx

    from mflux2.models.text_encoder import load_text_encoder, load_tokenizer
    from mflux2.models.transformer import load_transformer

    import mlx_lm.models.qwen3  # noqa: F401 (imported here: their seconds of import are no load's)
    import transformers  # noqa: F401
    t0 = time.perf_counter()
    k, layers = write_load_folder(work, size_gb)
    base = {"mlx": mx.__version__, "device": str(mx.default_device()), "cpus": os.cpu_count()}
    emit({"what": "folder", "work": str(work), "transformer_blocks": [k, 4 * k], "text_encoder_layers": layers,
          "ready_s": round(time.perf_counter() - t0, 1), **base})

    def torch_clone(files):
        import safetensors.torch

        return [{n: t.clone() for n, t in safetensors.torch.load_file(str(f)).items()} for f in files]

    loads = {
        "transformer": {
            "ours: load_transformer": lambda: load_transformer(work, dtype=mx.bfloat16),
            "ours: load_transformer(quantize=int8)": lambda: load_transformer(work, dtype=mx.bfloat16, quantize="int8"),
        },
        "text_encoder": {
            "ours: load_tokenizer alone": lambda: load_tokenizer(work / "tokenizer"),
            "ours: load_text_encoder (with the tokenizer)": lambda: load_text_encoder(
                work, "klein-4b", hidden_layers=(layers - 2, layers - 1, layers)),
        },
    }
    # Unrecorded: the first load after the folder was written pays the kernel's reclaim of the page
    # cache it filled (5 s instead of 1 s for the first floor here)
    for comp in loads:
        warm = mx_load_floor(shards(work / comp))
        del warm
        gc.collect()
        mx.clear_cache()
    rows = {}
    for rep in range(reps):
        for comp, ours_loads in loads.items():
            files = shards(work / comp)
            gb = sum(f.stat().st_size for f in files) / 1e9
            read_files(files)  # warm the page cache
            cases = {"file read (page cache)": lambda: read_files(files), "mx.load + mx.eval (a file at a time, all kept)":
                     lambda: mx_load_floor(files), "safetensors.torch.load_file + clone": lambda: torch_clone(files),
                     **ours_loads}
            for how, fn in cases.items():
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
                c, t = _cpu_s(), time.perf_counter()
                out = fn()  # our loaders return everything evaluated
                wall, cpu = time.perf_counter() - t, _cpu_s() - c
                del out
                rows.setdefault((comp, how), []).append((wall, cpu, mx.get_peak_memory() / 1e9, gb))
    for (comp, how), runs in rows.items():
        walls = sorted(r[0] for r in runs)
        gb = runs[0][3]
        emit({"what": "load cpu", "component": comp, "how": how, "gb": round(gb, 3),
              "wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(walls[0], 3),
              "cpu_s_median": round(statistics.median(r[1] for r in runs), 3),
              "gb_per_s_median": round(gb / statistics.median(walls), 2),
              "peak_gb": round(max(r[2] for r in runs), 3), "reps": len(runs)})
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _mx_times(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["vae-peer", "te-peer", "load-peer", "ours", "load-cpu"])
    ap.add_argument("--folder", type=Path, help="a klein model folder (diffusers layout), e.g. job_benchmark.py's")
    ap.add_argument("--variant", default="klein-4b")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--vae-variants", nargs="+", default=["eager", "cudnn_benchmark", "compile"])
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the toy model / a small VAE (CPU smoke run)")
    ap.add_argument("--size-gb", type=float, default=2.0, help="load-cpu: GB of weights per component")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mflux2-load-cpu"), help="load-cpu: the folder to write")
    ap.add_argument("--reps", type=int, default=3, help="load-cpu: runs of each load")
    ap.add_argument("--keep", action="store_true", help="load-cpu: keep the folder (deleted otherwise)")
    args = ap.parse_args(argv)
    folder = ROOT / "models" / "toy" if args.tiny else args.folder
    if args.what == "vae-peer":
        vae_peer([64] if args.tiny else args.sizes, args.vae_variants,
                 dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1) if args.tiny else None)
    elif args.what == "te-peer":
        te_peer(folder)
    elif args.what == "load-peer":
        load_peer(folder)
    elif args.what == "load-cpu":
        load_cpu(args.work, args.size_gb, args.reps, args.keep)
    else:
        ours(folder, args.variant, args.drop_caches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
