"""Hugging Face hub access: short model names, downloading only the files we use, and one-line
errors that say what to do.

huggingface_hub itself honours HF_HOME / HF_HUB_CACHE (where the cache lives), HF_TOKEN (or the
token saved by `hf auth login`) and HF_HUB_OFFLINE=1 (use the cache only); nothing here overrides
them.
"""

from __future__ import annotations

import errno
from pathlib import Path

# Short names accepted wherever a model is named (CLI --model, YAML model.name, from_pretrained).
REPOS = {
    "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-9B",
    "dev": "black-forest-labs/FLUX.2-dev",
    "klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
}

# The diffusers subfolders the pipeline reads (the repos also hold the same weights as BFL single
# files, which would double the download), plus our own converted-folder config.
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
ALLOW_PATTERNS = ["model_index.json", "mflux2.json", "mflux2_sampling.json", *(f"{c}/*" for c in COMPONENTS)]
# Other formats of the same weights that some repos carry beside the safetensors.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.fp16.safetensors"]


class ModelLoadError(RuntimeError):
    """A model cannot be found, downloaded or assembled. The message is one actionable line."""


def repo_id_for(name: str) -> str:
    """A short name (`klein-4b`, ...) -> its repo id; anything else is returned unchanged."""
    return REPOS.get(name.strip().lower(), name)


def looks_like_repo_id(name: str) -> bool:
    """`owner/name` with no path-like parts (checked only after the local path did not exist)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def parent_folder_exists(name: str) -> bool:
    """`name`'s parent folder exists here (`models/toyy` beside `models/`): it is meant as a local
    path, a typo rather than a hub repo id."""
    p = Path(name).expanduser()
    return len(p.parts) > 1 and p.parent.is_dir()


def missing_path_note(name: str) -> str:
    """What a local path that does not exist was looked for as: the folder a relative one is read
    from, and the nearest names beside it."""
    import difflib

    p = Path(name).expanduser()
    where = "" if p.is_absolute() else f" (relative to the working folder: {Path.cwd() / p})"
    near = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=2) if p.parent.is_dir() else []
    return where + (f"; did you mean {' or '.join(str(p.parent / c) for c in near)}?" if near else "")


def download(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None,
             names: dict[str, str] = REPOS) -> Path:
    """Fetch (or find in the cache) the files of `repo_id` that the pipeline needs (or `allow_patterns`)
    and return the local snapshot folder. Raises ModelLoadError with one line on every expected
    failure; `names`: the short names an unknown repo's message suggests."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HTTPError,  # the HTTP library's base class (network failures during the file downloads)
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"https://huggingface.co/{repo_id}"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns or ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except GatedRepoError:  # (a subclass of RepositoryNotFoundError: test it first)
        raise ModelLoadError(
            f"{repo_id} is a gated model: accept the licence at {url} and run `hf auth login` (or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit name") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}: no such model on the Hugging Face hub (a private repo needs `hf auth login`); "
            f"check the name, " + (f"use one of {', '.join(names)}, " if names else "") + "or pass a local folder"
        ) from None
    except LocalEntryNotFoundError:
        mode = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelLoadError(
            f"{repo_id} is not (completely) in the Hugging Face cache {constants.HF_HUB_CACHE} and {mode}: "
            "download it once with network access, or pass a local folder"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelLoadError(
                f"access to {repo_id} was refused (HTTP {status}): accept the licence at {url} and run `hf auth login` (or set HF_TOKEN)"
            ) from None
        raise ModelLoadError(f"downloading {repo_id} failed: {_first_line(e)}") from None
    except HTTPError as e:
        raise ModelLoadError(f"downloading {repo_id} failed (network error: {_first_line(e)}); run the command again to resume") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelLoadError(
                f"disk full while downloading {repo_id} into {constants.HF_HUB_CACHE}: free some space or point "
                "HF_HUB_CACHE (or HF_HOME) to a disk with room"
            ) from None
        raise ModelLoadError(f"downloading {repo_id} failed: {_first_line(e)}") from None
    return Path(folder)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
