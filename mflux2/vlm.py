"""A vision-language model for the two chores that decide whether a LoRA is good: writing captions
(mflux2/captions.py) and scoring each checkpoint's validation images (training/scoring.py).

The model comes from mlx-vlm (an optional extra: `pip install -e ".[vlm]"`), imported only when a
feature needs it; any model mlx-vlm runs works (Qwen3.5, Qwen3-VL, SmolVLM, ...), named by a short
name, a Hugging Face repo id (fetched through mflux2.hub: its cache, token and offline mode) or a
local folder. `loaded(...)` holds it for one job and frees it right after, so it never sits beside
the text encoder or the transformer longer than the job.
"""

from __future__ import annotations

import gc
import re
import time
from contextlib import contextmanager
from pathlib import Path

# The Swift trainer's scorer (flux-2-swift-mlx Qwen35Variant.qwen35_4B_4bit, ~3 GB); also our captioner.
DEFAULT_VLM = "mlx-community/Qwen3.5-4B-MLX-4bit"
SHORT_NAMES = {
    "qwen3.5-4b": DEFAULT_VLM,
    "qwen3.5-4b-8bit": "mlx-community/Qwen3.5-4B-MLX-8bit",  # the Swift trainer's other variant
}
# The files mlx-vlm reads (its own download list, minus *.jsonl).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
MIN_MLX_VLM = "0.7.10"  # the first release for MLX 0.32.4 (pyproject's `vlm` extra)
# Images are shrunk to this longest side before the model sees them: the Qwen processors would
# otherwise turn a 12-MP photo into thousands of tokens; 768 px keeps a subject's details.
MAX_IMAGE_SIDE = 768


class VLMError(RuntimeError):
    """The vision-language model cannot be used (mlx-vlm missing, no model, an unsupported folder).
    The message is one actionable line."""


def require_mlx_vlm() -> None:
    """Fail with one line when mlx-vlm is not installed (checked before any long work starts)."""
    try:
        import mlx_vlm  # noqa: F401
    except ImportError as e:
        raise VLMError(
            f"captions and VLM scoring need mlx-vlm (>= {MIN_MLX_VLM}), which is not installed ({e.msg}): "
            'pip install -e ".[vlm]" in the mflux2 checkout, or pip install "mlx-vlm>=' + MIN_MLX_VLM + '"'
        ) from None


def repo_id_for(name: str) -> str:
    return SHORT_NAMES.get(name.strip().lower(), name)


def resolve(name: str) -> Path:
    """The local folder of the VLM `name` (short name, hub repo id or folder), downloading a hub
    model into the Hugging Face cache through mflux2.hub."""
    from mflux2 import hub

    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise VLMError(f"VLM {name}: {p} has no config.json; pass a model folder (as downloaded from the hub) or a repo id")
        return p
    repo = repo_id_for(name)
    if not hub.looks_like_repo_id(repo):
        raise VLMError(f"VLM {name!r}: no such folder, and not a Hugging Face repo id or one of {', '.join(SHORT_NAMES)}")
    return hub.download(repo, allow_patterns=ALLOW_PATTERNS, names=SHORT_NAMES)


def cached_folder(name: str) -> Path | None:
    """The VLM's local folder if it is here (a folder, or complete in the hub cache); never downloads."""
    p = Path(name).expanduser()
    if p.exists():
        return p if (p / "config.json").is_file() else None
    repo = repo_id_for(name)
    try:
        import huggingface_hub

        folder = Path(huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache, or not a repo id
        return None
    return folder if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) else None


def weights_bytes(folder: Path) -> int:
    """The VLM's weights as stored (mlx-community folders are already quantized: loaded size = file size)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def hub_weights_bytes(name: str) -> int | None:
    """Bytes of the VLM's safetensors on the hub (None: unknown, offline or unreachable)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or Path(name).expanduser().exists():
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id_for(name), files_metadata=True, timeout=5)
    except Exception:  # noqa: BLE001 - no network, unknown repo: unknown
        return None
    return sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))


def shrink(image, max_side: int = MAX_IMAGE_SIDE):
    """An RGB PIL image no larger than `max_side` on its longest side (aspect kept)."""
    from PIL import Image

    from mflux2.images import to_rgb

    image = to_rgb(image)
    w, h = image.size
    s = max_side / max(w, h)
    if s < 1:
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    return image


def clean_reply(text: str) -> str:
    """The answer part of a reply: a thinking block (everything up to `</think>`) and end-of-turn
    markers removed (the Swift trainer's cleaning); a `<think>` never closed (the reply ran out of
    tokens while thinking) drops everything after it, since what the model mused about is no answer."""
    if "</think>" in text:
        text = text.split("</think>", 1)[1]
    elif "<think>" in text:
        text = text.split("<think>", 1)[0]
    return re.sub(r"<\|im_end\|>|<\|endoftext\|>|<end_of_turn>|</s>", "", text).strip()


class VLM:
    """An mlx-vlm model and its processor, asked one question at a time (greedy decoding)."""

    def __init__(self, model, processor, config: dict, folder: Path):
        self.model, self.processor, self.config, self.folder = model, processor, config, folder

    @classmethod
    def load(cls, name: str, log=print) -> "VLM":
        require_mlx_vlm()
        folder = resolve(name)
        from mlx_vlm.utils import load, load_config

        t0 = time.perf_counter()
        try:
            config = load_config(folder)
            model, processor = load(str(folder))
        except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
            raise VLMError(f"VLM {name}: mlx-vlm cannot load {folder} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "pick a model mlx-vlm supports (e.g. " + DEFAULT_VLM + ")") from None
        log(f"VLM {name}: loaded in {time.perf_counter() - t0:.1f} s ({weights_bytes(folder) / 1e9:.2f} GB)")
        return cls(model, processor, config, folder)

    def ask(self, images: list, prompt: str, system: str | None = None, prefill: str = "", max_tokens: int = 300) -> str:
        """The model's reply to `prompt` about `images` (PIL images or paths, in order), greedy. `prefill`
        starts the reply (e.g. the opening of the JSON asked for) and is part of the returned text."""
        from mlx_vlm import generate
        from mlx_vlm.prompt_utils import apply_chat_template

        from mflux2.images import open_rgb

        pics = [shrink(open_rgb(i) if isinstance(i, (str, Path)) else i) for i in images]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        # enable_thinking=False: the answer directly (the Swift trainer's setting); templates without the switch ignore it
        text = apply_chat_template(self.processor, self.config, messages, num_images=len(pics), enable_thinking=False)
        out = generate(self.model, self.processor, text + prefill, pics or None, max_tokens=max_tokens,
                       temperature=0.0, verbose=False)
        return prefill + out.text

    def close(self) -> None:
        import mlx.core as mx

        self.model = self.processor = None
        gc.collect()
        mx.clear_cache()


@contextmanager
def loaded(name: str, log=print):
    """`with loaded(name) as vlm:` — the model for one job, freed when the block ends (errors too)."""
    vlm = VLM.load(name, log=log)
    try:
        yield vlm
    finally:
        vlm.close()
