"""Hugging Face hub loading without network: a fake cache laid out as huggingface_hub lays it out
(models--owner--name/{blobs,refs,snapshots}), offline mode through the real environment variables,
and every error path with the exception classes huggingface_hub itself raises."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects
from mflux2 import hub
from mflux2.hub import ModelLoadError
from mflux2.models.transformer import PRESETS
from mflux2.model_files import resolve_source
from mflux2.pipeline import Flux2Pipeline

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Store files the way huggingface_hub does: content in blobs/<hash>, snapshots/<commit>/<path>
    a relative symlink to the blob, refs/main holding the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def klein4b_skeleton() -> dict[str, bytes]:
    """What resolution reads of FLUX.2-klein-4B (configs only; weights are never touched)."""
    cfg = {"_class_name": "Flux2Transformer2DModel", **PRESETS["klein-4b"].to_dict()}
    return {
        "model_index.json": json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}).encode(),
        "transformer/config.json": json.dumps(cfg).encode(),
        "vae/config.json": b"{}",
        "text_encoder/config.json": b"{}",
        "tokenizer/tokenizer_config.json": b"{}",
    }


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty cache that huggingface_hub (already imported) uses, in offline mode."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# ----------------------------------------------------------------------------------------------


def test_short_names_and_allow_patterns():
    assert hub.repo_id_for("klein-4b") == "black-forest-labs/FLUX.2-klein-4B"
    assert hub.repo_id_for("klein-9b") == "black-forest-labs/FLUX.2-klein-9B"
    assert hub.repo_id_for("dev") == "black-forest-labs/FLUX.2-dev"
    assert hub.repo_id_for("klein-base-4b") == "black-forest-labs/FLUX.2-klein-base-4B"
    assert hub.repo_id_for("Klein-Base-9B") == "black-forest-labs/FLUX.2-klein-base-9B"
    assert hub.repo_id_for("someone/model") == "someone/model"
    # the files of a FLUX.2 repo (docs/architecture.md, "Files on the Hugging Face repos"): only the
    # diffusers folders are fetched, not the BFL copies
    repo_files = [
        "flux-2-klein-4b.safetensors", "ae.safetensors", "model_index.json", "README.md", "LICENSE.md",
        "scheduler/scheduler_config.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    kept = set(filter_repo_objects(repo_files, allow_patterns=hub.ALLOW_PATTERNS, ignore_patterns=hub.IGNORE_PATTERNS))
    assert kept == {
        "model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    }


def test_download_passes_the_patterns(monkeypatch, tmp_path):
    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.download("black-forest-labs/FLUX.2-dev", revision="main") == tmp_path
    assert seen["repo_id"] == "black-forest-labs/FLUX.2-dev" and seen["revision"] == "main"
    assert seen["allow_patterns"] == hub.ALLOW_PATTERNS and "cache_dir" not in seen and "token" not in seen


def test_short_name_resolves_from_the_offline_cache(offline_cache):
    snapshot = add_to_cache(offline_cache, "black-forest-labs/FLUX.2-klein-4B", klein4b_skeleton())
    src = resolve_source("klein-4b")
    assert src.root == snapshot and src.layout == "diffusers"
    assert (src.variant, src.family) == ("klein-4b", "klein")
    # a repo id works the same; the variant comes from model_index.json + the transformer config
    assert resolve_source("black-forest-labs/FLUX.2-klein-4B").variant == "klein-4b"


def test_tiny_model_loads_and_generates_from_the_cache(offline_cache, tmp_path):
    from test_pipeline import LAYERS, QWEN_LEN, build_klein

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = build_klein(tmp_path / "tiny", distilled=True)
    add_to_cache(offline_cache, "tiny-org/FLUX.2-tiny", folder_files(local))
    kw = dict(dtype=mx.float32, max_sequence_length=QWEN_LEN, text_encoder_out_layers=LAYERS)
    from_hub = Flux2Pipeline.from_pretrained("tiny-org/FLUX.2-tiny", **kw)
    assert from_hub.source.root.is_relative_to(offline_cache) and from_hub.family == "klein"
    gen = dict(seed=4, output_type="array", progress=False)
    np.testing.assert_array_equal(
        np.array(from_hub.generate("a cat", 32, 32, **gen)[0]),
        np.array(Flux2Pipeline.from_pretrained(local, **kw).generate("a cat", 32, 32, **gen)[0]),
    )


def test_incomplete_cached_snapshot_names_the_missing_component(offline_cache):
    files = klein4b_skeleton()
    del files["vae/config.json"]
    add_to_cache(offline_cache, "black-forest-labs/FLUX.2-klein-4B", files)
    with pytest.raises(ModelLoadError, match=r"the vae/ folder is missing — re-download"):
        resolve_source("klein-4b")


def test_offline_and_not_cached(offline_cache):
    with pytest.raises(ModelLoadError) as e:
        resolve_source("klein-9b")
    msg = str(e.value)
    assert "black-forest-labs/FLUX.2-klein-9B is not (completely) in the Hugging Face cache" in msg
    assert str(offline_cache) in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def test_environment_variables_are_honoured_by_huggingface_hub(tmp_path):
    # HF_HUB_CACHE + HF_HUB_OFFLINE, read by huggingface_hub at import in a fresh process
    cache = tmp_path / "cache"
    snapshot = add_to_cache(cache, "black-forest-labs/FLUX.2-klein-4B", klein4b_skeleton())
    code = "from mflux2.model_files import resolve_source; s = resolve_source('klein-4b'); print(s.root, s.variant)"
    r = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(snapshot), "klein-4b"]
    # HF_HOME alone: the cache is $HF_HOME/hub
    home = tmp_path / "home"
    snapshot = add_to_cache(home / "hub", "black-forest-labs/FLUX.2-klein-4B", klein4b_skeleton())
    r = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == str(snapshot)
    # the CLI in offline mode without the model: one line, no traceback
    r = run_python("import sys; from mflux2.cli import generate_main; sys.exit(generate_main())".replace(
        "generate_main()", "generate_main(['--model', 'dev', '--prompt', 'x', '--output', 'never.png'])"),
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "FLUX.2-dev is not (completely) in the Hugging Face cache" in r.stderr


# ----------------------------------------------------------------------------------------------
# error paths: huggingface_hub's own exception classes


def http_response(status: int, url: str):
    try:
        import httpx2

        return httpx2.Response(status, request=httpx2.Request("GET", url))
    except ImportError:  # huggingface_hub < 1.0 uses requests
        import requests

        r = requests.Response()
        r.status_code, r.url = status, url
        return r


def raising(exc):
    def fake(repo_id, **kw):
        raise exc

    return fake


URL = "https://huggingface.co/api/models/black-forest-labs/FLUX.2-dev"
ERRORS = [
    (GatedRepoError("401 Client Error. Cannot access gated repo", response=http_response(401, URL)),
     r"black-forest-labs/FLUX.2-dev is a gated model: accept the licence at https://huggingface.co/black-forest-labs/FLUX.2-dev and run `hf auth login`"),
    (RepositoryNotFoundError("404 Client Error. Repository Not Found", response=http_response(404, URL)),
     r"no such model on the Hugging Face hub .*check the name"),
    (RevisionNotFoundError("404 Client Error. Revision Not Found", response=http_response(404, URL)),
     r"has no revision 'v9'"),
    (LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder ... \nsecond line"),
     r"not \(completely\) in the Hugging Face cache .* download it once with network access"),
    (HfHubHTTPError("403 Forbidden", response=http_response(403, URL)),
     r"refused \(HTTP 403\): accept the licence at https://huggingface.co/black-forest-labs/FLUX.2-dev"),
    (HfHubHTTPError("500 Server Error\nInternal", response=http_response(500, URL)),
     r"downloading black-forest-labs/FLUX.2-dev failed: 500 Server Error$"),
    (OSError(errno.ENOSPC, "No space left on device"),
     r"disk full while downloading black-forest-labs/FLUX.2-dev into .*: free some space or point HF_HUB_CACHE"),
    (OSError(errno.EACCES, "Permission denied"),
     r"downloading black-forest-labs/FLUX.2-dev failed: \[Errno 13\] Permission denied"),
]


@pytest.mark.parametrize("exc, message", ERRORS, ids=lambda x: type(x).__name__ if isinstance(x, Exception) else "")
def test_hub_errors_become_one_actionable_line(monkeypatch, exc, message):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(exc))
    with pytest.raises(ModelLoadError, match=message) as e:
        Flux2Pipeline.from_pretrained("dev", revision="v9")
    assert "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback


def test_a_mistyped_local_folder_is_no_such_folder_not_a_hub_repo(monkeypatch, tmp_path):
    """`models/toyy` beside an existing `models/` is a typo of a path: named as such, where it was
    looked for and the near names, and the hub is never asked."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(AssertionError("must not be called")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "toy").mkdir(parents=True)
    with pytest.raises(ModelLoadError) as e:
        resolve_source("models/toyy")
    assert str(e.value) == (f"models/toyy: no such file or folder (relative to the working folder: "
                            f"{tmp_path / 'models' / 'toyy'}); did you mean models/toy?")


def test_names_that_are_neither_paths_nor_repos(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(AssertionError("must not be called")))
    for name in ["klein-5b", "./missing-folder", "a/b/c"]:
        with pytest.raises(ModelLoadError, match="no such file or folder.*, and not a model name"):
            resolve_source(name)
    with pytest.raises(ModelLoadError, match=f"^{tmp_path / 'nope'}: no such file or folder$"):  # a path: no hub talk
        resolve_source(str(tmp_path / "nope"))
    # an existing local folder wins over the short name of the same spelling
    monkeypatch.chdir(tmp_path)
    (tmp_path / "klein-4b").mkdir()
    with pytest.raises(ModelLoadError, match="not a FLUX.2 model folder"):
        resolve_source("klein-4b")
