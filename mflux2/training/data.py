"""The training images: discovery, captions, aspect-ratio buckets, robust loading, and batch order.

* `scan_dataset(cfg)` finds the images of `dataset.path` (a local folder, or a Hugging Face dataset
  repo id fetched once with `snapshot_download(repo_type="dataset")`), reads their captions, checks
  that every image decodes, and gives each a bucket. A local folder's own files are used (not its
  subfolders: a `validation/` folder inside stays out); a hub snapshot is searched recursively.
* Captions (`dataset.caption_format`): `txt` = a same-name .txt beside each image; `jsonl` = a
  `metadata.jsonl` of {"file_name", "prompt"|"caption"|"text"} lines (the Swift trainer's and the
  Hugging Face imagefolder layout). `[trigger]`/`{trigger}` become the trigger word, a caption without
  the trigger word gets it prepended ("<trigger>, <caption>"), a missing caption is the trigger word
  alone (one warning lists them). The DOP prompt is the caption with every occurrence of the trigger
  word replaced by `loss.diff_output_preservation_class`; `preservation_prompts` rotates it with
  `loss.diff_output_preservation_prompts`.
* Buckets: with `memory.bucketing.enabled`, each image goes to ONE bucket (W, H), both multiples of 16,
  with area ≈ res² and the aspect ratio (clamped to [1/3, 3]) nearest the image's, on a grid of widths
  64 apart. The resolution is the largest configured one the image covers without upscaling; an image
  smaller than every resolution uses the smallest, and upscaling it by more than MAX_UPSCALE (2x) is
  warned about. With bucketing off every image is a center crop of dataset.image_size².
* Images: grayscale, CMYK, palette, 16-bit and alpha (composited on white) are converted to RGB by
  `mflux2.images.to_rgb`; EXIF orientation is applied; huge JPEGs are decoded at a reduced scale. Unreadable/truncated/empty files raise one one-line `DataError` naming
  every one of them (the scan goes on past the first), or are skipped with one listed warning when
  `dataset.skip_bad_images: true`.
* Edit training (`dataset.control_path`, one folder or a list): a target's control in each folder is
  the image there with the target's file stem (any image extension; non-recursive). Reference j of a
  target is its control from the j-th folder that has one. A control is oriented and made RGB like
  its target, resized (LANCZOS) to the target's own size if it differs, then cover-resized and
  centre-cropped exactly as the target (`load_control_for_bucket`): target and control stay
  pixel-aligned on the same token grid (diffusers' img2img scripts do the same; the Swift trainer
  stretches the control to the bucket). Two controls with one stem, or no target with a control,
  are errors; targets without a control (they train as text-to-image, as in the Swift trainer) and
  controls without a target are warned about with a listed count.
* `BatchSampler` draws batches of sample indices within one bucket and one reference count (the
  sequence length must match within a batch), epoch after epoch, in an order fixed by (seed, epoch);
  its state is a small JSON-able dict, so a resumed run continues exactly. With a regularisation set
  `PairedSampler` draws a reg batch of the same group beside every subject batch (the peers' prior
  preservation).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from mflux2.hub import looks_like_repo_id
from mflux2.images import pil_to_array, to_rgb

if TYPE_CHECKING:
    from mflux2.training.config import TrainConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CONTROL_EXTS = IMAGE_EXTS + (".bmp", ".tif", ".tiff")  # what the Swift trainer pairs as controls
# Bump when load_control_for_bucket's geometry changes: it is part of the control latents' cache key.
CONTROL_GEOMETRY = 1
MAX_UPSCALE = 2.0  # images needing more than this to fill their bucket are listed in a warning
MAX_ASPECT = 3.0  # bucket aspect ratios lie in [1/MAX_ASPECT, MAX_ASPECT]; wider images are cropped
BUCKET_STEP = 64  # bucket widths (heights for portrait) are res, res+64, ... : few buckets, fuller batches
_HF_PATTERNS = [f"*{e}" for e in IMAGE_EXTS] + [f"*{e.upper()}" for e in IMAGE_EXTS] + ["*.txt", "*.jsonl"]


class DataError(ValueError):
    """A dataset problem: missing folder, no images, an unreadable image or caption. One line, naming the file."""


class DataWarning(UserWarning):
    """Something in the dataset was worked around (missing captions, skipped images, upscaling)."""


@dataclass(frozen=True)
class Control:
    """A control (reference) image of an edit pair."""

    path: Path
    content_hash: str  # sha256 of the file's bytes
    size: tuple[int, int]  # (w, h) after EXIF orientation


@dataclass(frozen=True)
class Mask:
    """A sample's loss mask: a grey image paired by file stem (`dataset.mask_path`) or the image's own
    alpha channel (`dataset.alpha_mask`). Grey level g in [0, 1] weighs a pixel's loss by
    minimum + (1 - minimum)·g."""

    path: Path  # the mask file, or the image itself (alpha)
    content_hash: str  # sha256 of the file's bytes
    alpha: bool
    minimum: float  # dataset.mask_min


@dataclass(frozen=True)
class Sample:
    path: Path  # the image file
    caption: str  # final training caption (trigger substituted / prepended)
    dop_caption: str | None  # the caption with the trigger word replaced by the DOP class word
    bucket: tuple[int, int]  # (W, H) the image is resized and center-cropped to
    content_hash: str  # sha256 of the file's bytes (the latent cache key)
    size: tuple[int, int]  # (w, h) of the image after EXIF orientation
    controls: tuple[Control, ...] = ()  # edit training: the references, in control-folder order
    # Several datasets: the dataset's name, its repeats, loss weight and caption dropout
    # (None: training.caption_dropout), whether it is a regularisation set, the loss mask, and the
    # shuffled captions (with their DOP prompts) one of which a step draws (empty: `caption` alone).
    dataset: str = ""
    repeats: int = 1
    loss_weight: float = 1.0
    caption_dropout: float | None = None
    is_reg: bool = False
    mask: Mask | None = None
    variants: tuple[str, ...] = ()
    dop_variants: tuple[str | None, ...] = ()

    @property
    def label(self) -> str:
        """`<dataset>/<file stem>`: how metrics.jsonl names the sample."""
        return f"{self.dataset}/{self.path.stem}" if self.dataset else self.path.stem

    def with_variant(self, i: int) -> "Sample":
        """This sample with shuffled caption i as its caption (and DOP prompt)."""
        if not self.variants:
            return self
        return dataclasses.replace(self, caption=self.variants[i], dop_caption=self.dop_variants[i])

    @property
    def group(self) -> tuple[int, int, int]:
        """What a batch must share: (W, H, number of references) fix the sequence length."""
        return (*self.bucket, len(self.controls))


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def read_caption(path: Path) -> str:
    """A caption file's text as one line: UTF-8 (with or without BOM), UTF-16/32 (BOM, or BOM-less
    UTF-16 recognised by its zero bytes), else Windows-1252, else Latin-1."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read caption ({e.strerror or e})") from None
    text = _decode_text(data)
    return " ".join(text.replace("\x00", " ").split())


def _decode_text(data: bytes) -> str:
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError:
                break
    if data.count(b"\x00") * 4 >= len(data) > 0 and len(data) % 2 == 0:  # BOM-less UTF-16
        even_zeros = data[0::2].count(0)
        odd_zeros = data[1::2].count(0)
        try:
            return data.decode("utf-16-le" if odd_zeros >= even_zeros else "utf-16-be")
        except UnicodeDecodeError:
            pass
    for enc in ("utf-8", "cp1252"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def _trigger_re(trigger: str) -> re.Pattern:
    # The trigger as a whole word (case-insensitive), so "sks" does not match inside "asks".
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)


def names_trigger(text: str, trigger: str | None) -> bool:
    """Whether `text` contains the trigger word (as a whole word, case-insensitive)."""
    return bool(trigger) and _trigger_re(trigger).search(text) is not None


def apply_trigger(raw: str, trigger: str | None) -> str:
    """A caption or prompt with the trigger applied: `[trigger]`/`{trigger}` → the trigger word, and
    "<trigger>, " prepended when the trigger word is absent. Whitespace is collapsed."""
    text = " ".join(raw.split())
    if not trigger:
        return text
    text = re.sub(r"\[trigger\]|\{trigger\}", lambda _: trigger, text, flags=re.IGNORECASE)
    if not names_trigger(text, trigger):
        text = f"{trigger}, {text}" if text else trigger
    return text


def build_dop_caption(caption: str, trigger: str | None, class_word: str | None) -> str | None:
    """The DOP prompt: the final caption with every occurrence of the trigger word replaced by the class word."""
    if not trigger or not class_word:
        return None
    return _trigger_re(trigger).sub(lambda _: class_word, caption)


def preservation_prompts(samples: Sequence["Sample"], step: int, every: int, extra: Sequence[str]) -> list[str]:
    """The prompts of a DOP step's preservation pass, one per sample. Without `extra`
    (loss.diff_output_preservation_prompts): each sample's DOP prompt. With it, DOP step j = step // every
    takes the DOP prompts when j is even and the extra prompts in turn when j is odd (extra[(j // 2) %
    len(extra)] for every sample): the class prompt keeps half the preservation steps however long the
    list. A pure function of the step: a resumed run rotates exactly as an uninterrupted one."""
    j = step // every
    if not extra or j % 2 == 0:
        return [s.dop_caption for s in samples]
    return [extra[(j // 2) % len(extra)]] * len(samples)


def prompts_to_embed(cfg: "TrainConfig", samples: Sequence["Sample"], val_samples: Sequence["Sample"],
                     validation_prompts: Iterable[str]) -> list[str]:
    """Every prompt a run embeds (the text cache; the dry run's disk estimate counts the same list): the
    captions and their shuffled variants, with DOP the DOP prompts (of each variant) and
    loss.diff_output_preservation_prompts, the validation prompts, and "" (caption dropout and CFG's
    negative prompt)."""
    prompts = [c for s in [*samples, *val_samples] for c in (s.caption, *s.variants)]
    if cfg.loss.diff_output_preservation:
        prompts += [c for s in samples for c in (s.dop_caption, *s.dop_variants)] + list(cfg.loss.diff_output_preservation_prompts)
    return prompts + list(validation_prompts) + [""]


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, trimmed, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffled_captions(raw: str, keep: int, n: int, seed: int) -> list[str]:
    """Up to `n` distinct shuffles of the caption's tags (the first `keep` stay in place), joined by
    ", ", in draw order; drawn from `seed` (a function of the run's seed, the file and the caption, so
    the text cache's entries are the same in every run of the config)."""
    tags = split_tags(raw)
    head, tail = tags[:keep], tags[keep:]
    rng = np.random.default_rng(seed)
    most = min(n, math.factorial(min(len(tail), 20)))
    out: dict[str, None] = {}
    for _ in range(50 * n):  # distinct draws (a short caption has fewer orders than n)
        out[", ".join(head + [tail[j] for j in rng.permutation(len(tail))])] = None
        if len(out) >= most:
            break
    return list(out)


def _variant_seed(seed: int, path: Path, raw: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{path.name}\0{raw}".encode()).digest()[:8], "little")


# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------


def _round16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


@functools.lru_cache(maxsize=None)
def bucket_grid(resolution: int) -> tuple[tuple[int, int], ...]:
    """The buckets of one resolution: (W, H) multiples of 16 with W·H ≈ res², aspect in [1/3, 3]."""
    area = resolution * resolution
    out = set()
    w = resolution
    while w / _round16(area / w) <= MAX_ASPECT:
        h = _round16(area / w)
        out.update({(w, h), (h, w)})
        w += BUCKET_STEP
    return tuple(sorted(out, key=lambda b: b[0] / b[1]))


def _nearest_bucket(w: int, h: int, resolution: int) -> tuple[int, int]:
    target = math.log(min(max(w / h, 1 / MAX_ASPECT), MAX_ASPECT))
    return min(bucket_grid(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def choose_bucket(w: int, h: int, resolutions: Sequence[int], bucketing: bool = True) -> tuple[int, int]:
    """The (W, H) an image of size (w, h) trains at (policy in the module docstring)."""
    if not bucketing:
        s = int(resolutions[0])
        return (s, s)
    ordered = sorted(set(int(r) for r in resolutions))
    for res in reversed(ordered):
        b = _nearest_bucket(w, h, res)
        if max(b[0] / w, b[1] / h) <= 1.0 + 1e-9:
            return b
    return _nearest_bucket(w, h, ordered[0])


def upscale_factor(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    return max(bucket[0] / size[0], bucket[1] / size[1])


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _decode(path: Path, draft: Callable[[Image.Image], tuple[int, int]] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode `path`; return it (no orientation/colour conversion yet) and its
    EXIF-oriented (w, h). `draft(img)` gives the smallest size a JPEG may be decoded at (libjpeg's
    DCT scaling: much less work and memory for huge photos, and every byte is still read)."""
    img = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            size = _oriented_size(img)
            if size[0] <= 0 or size[1] <= 0:
                raise DataError(f"{path}: image has no pixels ({size[0]}x{size[1]})")
            if draft is not None and img.format == "JPEG":
                img.draft(img.mode, draft(img))
            img.load()
            return img, size
    except Exception as e:  # noqa: BLE001 - truncated data, bad CRC, zlib errors... all mean "this file is broken"
        if img is not None:
            img.close()
        raise _decode_error(path, e) from None


def _decode_error(path: Path, e: Exception) -> DataError:
    if isinstance(e, DataError):
        return e
    if isinstance(e, Image.DecompressionBombError):
        return DataError(f"{path}: image is larger than Pillow's safety limit ({Image.MAX_IMAGE_PIXELS * 2 // 1_000_000} MP); downscale it")
    if isinstance(e, FileNotFoundError):
        return DataError(f"{path}: image file not found")
    if isinstance(e, Image.UnidentifiedImageError):
        return DataError(f"{path}: not a readable image (unknown format or corrupt header)")
    return DataError(f"{path}: cannot decode image ({_first_line(e)}); the file is truncated or corrupt")


def _rgb(img: Image.Image, path: Path) -> Image.Image:
    """EXIF orientation applied, then any mode → 8-bit RGB (mflux2.images.to_rgb: alpha on white,
    16-bit rescaled)."""
    try:
        return to_rgb(_orient(img))
    except ValueError as e:
        raise DataError(f"{path}: {_first_line(e)}") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: ignore orientation like most viewers
        orientation = 1
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


def _orient(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
        return img


def probe_image(path: Path) -> tuple[tuple[int, int], str]:
    """Check that `path` decodes completely; return its oriented (w, h) and the sha256 of its bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    img, size = _decode(Path(path), draft=lambda im: (max(1, im.width // 8), max(1, im.height // 8)))
    img.close()
    return size, hashlib.sha256(data).hexdigest()


def load_image_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB with EXIF orientation applied."""
    img, _ = _decode(Path(path))
    return _rgb(img, Path(path))


def load_image_for_bucket(path: str | Path, bucket: tuple[int, int]) -> np.ndarray:
    """Resize (aspect kept, LANCZOS) so the image covers `bucket` = (W, H), center-crop to it, and
    return float32 [H, W, 3] in [-1, 1]."""
    W, H = int(bucket[0]), int(bucket[1])

    def draft(im: Image.Image) -> tuple[int, int]:  # stored (unoriented) size that still covers the bucket
        ow, oh = _oriented_size(im)
        s = max(W / ow, H / oh)
        return math.ceil(im.width * s), math.ceil(im.height * s)

    img, _ = _decode(Path(path), draft=draft)
    return _cover_crop(_rgb(img, Path(path)), bucket)


def load_control_for_bucket(path: str | Path, target_size: tuple[int, int], bucket: tuple[int, int]) -> np.ndarray:
    """A control image cropped exactly like its target: resized (LANCZOS) to the target's oriented
    size `target_size` = (w, h) when its own differs, then the target's cover-resize and centre crop
    to `bucket`. float32 [H, W, 3] in [-1, 1], pixel-aligned with `load_image_for_bucket(target)`."""
    img = load_image_rgb(path)
    tw, th = int(target_size[0]), int(target_size[1])
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return _cover_crop(img, bucket)


def _cover_crop(img: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    W, H = int(bucket[0]), int(bucket[1])
    w, h = img.size
    s = max(W / w, H / h)
    rw, rh = max(W, round(w * s)), max(H, round(h * s))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (rw - W) // 2, (rh - H) // 2
    return np.asarray(pil_to_array(img.crop((left, top, left + W, top + H))))


# ---------------------------------------------------------------------------------------------
# Dataset discovery
# ---------------------------------------------------------------------------------------------


def resolve_dataset_path(spec: str, key: str = "dataset.path", where: str = "") -> tuple[Path, bool]:
    """(folder, is_hub_snapshot). A path that exists is used as is; `owner/name` that does not exist
    locally is fetched from the Hugging Face hub as a dataset repo (cached; later runs reuse it).
    `where`: the config line the value came from, for the errors."""
    from mflux2.hub import missing_path_note, parent_folder_exists

    p = Path(spec).expanduser()
    at = f"{where}: " if where else ""
    if p.exists():
        if not p.is_dir():
            raise DataError(f"{at}{key}: {p} is a file; expected a folder of images")
        return p, False
    if not looks_like_repo_id(spec) or parent_folder_exists(spec):
        raise DataError(f"{at}{key}: no such folder: {spec}{missing_path_note(spec)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id=spec, repo_type="dataset", allow_patterns=_HF_PATTERNS)
    except GatedRepoError:
        raise DataError(f"{key}: {spec} is a gated dataset: accept its terms at https://huggingface.co/datasets/{spec} and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise DataError(f"{at}{key}: {spec!r} is neither a local folder{missing_path_note(spec)} nor a dataset on the Hugging Face hub") from None
    except LocalEntryNotFoundError:
        raise DataError(f"{at}{key}: {spec!r} is not a local folder{missing_path_note(spec)}, not in the Hugging Face cache, "
                        "and the hub cannot be reached") from None
    except Exception as e:  # noqa: BLE001 - network and disk errors
        raise DataError(f"{key}: downloading the Hugging Face dataset {spec!r} failed ({_first_line(e)})") from None
    return Path(folder), True


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for f in it:
        rel = f.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):  # hidden files, macOS "._x.jpg" forks, .cache/
            continue
        if f.suffix.lower() in IMAGE_EXTS and f.is_file():
            out.append(f)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _jsonl_captions(folder: Path, recursive: bool) -> dict[Path, str]:
    files = sorted(folder.rglob("metadata.jsonl")) if recursive else [folder / "metadata.jsonl"]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"dataset.caption_format: jsonl needs a metadata.jsonl in {folder}")
    out: dict[Path, str] = {}
    for f in files:
        text = _decode_text(f.read_bytes())
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise DataError(f"{f}:{n}: each line needs a \"file_name\" string")
            cap = next((row[k] for k in ("prompt", "caption", "text") if isinstance(row.get(k), str)), None)
            if cap is None:
                raise DataError(f"{f}:{n}: no \"prompt\", \"caption\" or \"text\" string for {row['file_name']}")
            out[(f.parent / row["file_name"]).resolve()] = cap
    return out


def _listing(items: Sequence[Any], limit: int = 10) -> str:
    names = [str(x) for x in items[:limit]]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(names) + more


def scan_datasets(cfg: "TrainConfig", *, validation: bool = False) -> list[Sample]:
    """The samples of every dataset (`datasets`, or the one `dataset`), in dataset order; with
    validation=True those of the datasets' validation_path (the datasets without one add none)."""
    out: list[Sample] = []
    for prefix, one in dataset_configs(cfg):
        if validation and not one.dataset.validation_path:
            continue
        out += scan_dataset(one, validation=validation, prefix=prefix)
    return out


def dataset_configs(cfg: "TrainConfig") -> list[tuple[str, "TrainConfig"]]:
    """(key prefix, a shallow copy of cfg whose `dataset` is that dataset) for every dataset that
    trains: what scan_dataset and the captioner read."""
    import copy

    if not cfg.datasets:
        return [("dataset", cfg)]
    out = []
    for i, ds in enumerate(cfg.datasets):
        one = copy.copy(cfg)
        one.dataset = ds
        out.append((f"datasets[{i}]", one))
    return out


def scan_dataset(cfg: "TrainConfig", *, validation: bool = False, prefix: str = "dataset") -> list[Sample]:
    """The samples of `dataset.path` (or `dataset.validation_path` with validation=True), sorted by
    file path. Every image is decoded once here so that a broken file is reported before training.
    `prefix`: how messages name the dataset (dataset, datasets[i])."""
    ds = cfg.dataset
    key = f"{prefix}.validation_path" if validation else f"{prefix}.path"
    spec = ds.validation_path if validation else ds.path
    if not spec:
        raise DataError(f"{key}: not set")
    folder, recursive = resolve_dataset_path(spec, key, cfg.locations.get(key, ""))
    images = _list_images(folder, recursive)
    if not images:
        where = "the Hugging Face dataset" if recursive else "the folder"
        raise DataError(f"{key}: no images (png/jpg/jpeg/webp) in {where} {folder}")

    reg = ds.is_regularization  # its own captions: no trigger word, nothing for DOP to substitute
    trigger = None if reg else ds.trigger_word
    dop_class = cfg.loss.diff_output_preservation_class if cfg.loss.diff_output_preservation else None
    named: list[str] = []  # a regularisation set's captions that name the trigger word
    # ... the trigger words of the datasets that train the subject (a reg set has none of its own)
    subject_words = sorted({w for w in (ds.trigger_word, *(d.trigger_word for d in cfg.datasets if not d.is_regularization)) if w}) if reg else []
    bucketing = cfg.memory.bucketing.enabled
    resolutions = cfg.resolutions

    samples: list[Sample] = []
    no_caption: list[str] = []
    bad: list[str] = []
    jsonl = _jsonl_captions(folder, recursive) if ds.caption_format == "jsonl" else None
    for listed in sorted(p for p in (jsonl or {}) if not p.is_file()):
        bad.append(f"{listed.name} (listed in metadata.jsonl, missing)")

    upscaled: list[str] = []
    for img_path in images:
        rel = img_path.relative_to(folder).as_posix()
        try:
            size, digest = probe_image(img_path)
        except DataError as e:  # every one is listed below, not only the first
            bad.append(f"{rel} ({str(e).split(': ', 1)[-1]})")
            continue
        if jsonl is not None:
            raw = jsonl.get(img_path.resolve())
        else:
            txt = img_path.with_suffix("." + ds.caption_ext)
            raw = read_caption(txt) if txt.is_file() else None
        if raw is None:
            no_caption.append(rel)
            raw = ""
        caption = apply_trigger(raw, trigger)
        if reg and (any(names_trigger(raw, w) for w in subject_words) or re.search(r"\[trigger\]|\{trigger\}", raw, re.IGNORECASE)):
            named.append(rel)
        bucket = choose_bucket(size[0], size[1], resolutions, bucketing)
        if upscale_factor(size, bucket) > MAX_UPSCALE:
            upscaled.append(f"{rel} ({size[0]}x{size[1]} → {bucket[0]}x{bucket[1]})")
        def dop_of(c: str) -> str | None:  # a caption without the trigger word (a reg set) is preserved as written
            return (build_dop_caption(c, trigger, dop_class) or c) if dop_class else None

        dop = dop_of(caption)
        variants: tuple[str, ...] = ()
        if ds.shuffle_tokens and not validation:
            drawn = [apply_trigger(v, trigger) for v in shuffled_captions(raw, ds.keep_tokens, ds.shuffle_variants,
                                                                          _variant_seed(cfg.training.seed, img_path, raw))]
            variants = tuple(drawn) if drawn != [caption] else ()
        dops = tuple(dop_of(v) for v in variants)
        samples.append(Sample(img_path, caption, dop, bucket, digest, size, dataset=ds.name or "", repeats=ds.repeats,
                              loss_weight=ds.loss_weight, caption_dropout=ds.caption_dropout, is_reg=reg,
                              variants=variants, dop_variants=dops))

    if bad and not ds.skip_bad_images:
        err = DataError(f"{key}: {len(bad)} unreadable image(s): {_listing(bad)} — remove them, or set "
                        f"{prefix}.skip_bad_images: true to train without them")
        err.unreadable = bad  # (the dry run lists them one a line)
        raise err
    control_spec = ds.validation_control_path if validation else ds.control_path
    if control_spec and samples:
        samples = pair_controls(samples, folder, control_spec, f"{prefix}.validation_control_path" if validation
                                else f"{prefix}.control_path", ds.skip_bad_images, bad)
    if (ds.mask_path or ds.alpha_mask) and samples and not validation:
        samples = pair_masks(samples, ds, prefix)
    if named:
        warnings.warn(f"{key}: {len(named)} caption(s) of this regularisation set name {'the trigger word ' + ' or '.join(map(repr, subject_words)) + ' (or [trigger])' if subject_words else '[trigger]'}"
                      f": a regularisation set trains the model's prior, so it should not name the subject: "
                      f"{_listing(named)}", DataWarning, stacklevel=2)
    if bad:
        warnings.warn(f"{key}: skipped {len(bad)} unreadable image(s) ({prefix}.skip_bad_images): {_listing(bad)}", DataWarning, stacklevel=2)
    if not samples:
        raise DataError(f"{key}: none of the {len(images)} image(s) in {folder} could be read")
    if no_caption:
        used = f"the trigger word {trigger!r} alone" if trigger else "an empty caption"
        hint = ""
        candidates = folder.rglob("metadata.jsonl") if recursive else [folder / "metadata.jsonl"]
        if ds.caption_format == "txt" and any(p.is_file() for p in candidates):
            hint = " (a metadata.jsonl is present: set dataset.caption_format: jsonl to use it)"
        warnings.warn(f"{key}: {len(no_caption)} image(s) have no caption, using {used}{hint}: {_listing(no_caption)}", DataWarning, stacklevel=2)
    if upscaled:
        warnings.warn(f"{key}: {len(upscaled)} image(s) are upscaled more than {MAX_UPSCALE:g}x to fill their bucket "
                      f"(expect blur; use larger images or a smaller resolution): {_listing(upscaled)}", DataWarning, stacklevel=2)
    return samples


def _control_folder(spec: str, key: str) -> Path:
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"{key}: no such folder: {p.resolve()}")
    if not p.is_dir():
        raise DataError(f"{key}: {p} is a file; expected a folder of control images")
    return p


def _control_index(folder: Path) -> dict[str, Path]:
    """stem -> the control image of that stem in `folder` (its own files, not subfolders)."""
    index: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.suffix.lower() not in CONTROL_EXTS or not f.is_file():
            continue
        if f.stem in index:
            raise DataError(f"{f}: a second control image for the stem {f.stem!r} (the other is {index[f.stem]}); "
                            f"keep one of them")
        index[f.stem] = f
    return index


def pair_controls(samples: list[Sample], folder: Path, specs: Sequence[str], key: str, skip_bad: bool = False,
                  bad: list[str] | None = None) -> list[Sample]:
    """The samples with their controls: in each control folder, the image whose stem is the target's
    (policy in the module docstring). Every paired control is decoded once here, so a broken one is
    reported before training; with `skip_bad` its target is skipped and listed in `bad`."""
    bad = [] if bad is None else bad
    keys = [key] if len(specs) == 1 else [f"{key}[{j}]" for j in range(len(specs))]
    indexes = [_control_index(_control_folder(spec, k)) for spec, k in zip(specs, keys)]
    used: list[set[str]] = [set() for _ in indexes]
    out, without, partial = [], [], []
    for s in samples:
        rel = s.path.name
        try:
            controls = []
            for index, seen in zip(indexes, used):
                c = index.get(s.path.stem)
                if c is not None:
                    seen.add(c.stem)
                    size, digest = probe_image(c)
                    controls.append(Control(c, digest, size))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(f"{rel} (its control: {e})")
            continue
        if not controls:
            without.append(rel)
        elif len(controls) < len(indexes):
            partial.append(rel)
        out.append(dataclasses.replace(s, controls=tuple(controls)))
    where = ", ".join(str(Path(x)) for x in specs)
    if out and not any(s.controls for s in out):
        raise DataError(f"{key}: none of the {len(out)} image(s) in {folder} has a control image of the same file stem "
                        f"in {where} (e.g. {out[0].path.stem}.png for {out[0].path.name})")
    if without:
        warnings.warn(f"{key}: {len(without)} of {len(out)} image(s) have no control image of the same stem in {where} "
                      f"and train as text-to-image (as the Swift trainer does): {_listing(without)}", DataWarning, stacklevel=3)
    if partial:
        warnings.warn(f"{key}: {len(partial)} image(s) have a control in only some of the {len(specs)} folders; they "
                      f"train with the ones they have (reference 1, 2, ... in folder order): {_listing(partial)}",
                      DataWarning, stacklevel=3)
    for k, index, seen in zip(keys, indexes, used):
        orphans = sorted(f.name for stem, f in index.items() if stem not in seen)
        if orphans:
            warnings.warn(f"{k}: {len(orphans)} control image(s) match no image in {folder} by file stem and are unused: "
                          f"{_listing(orphans)}", DataWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

# Bump when load_mask_for_bucket's geometry or mask_weights' reduction changes: part of the masks' cache key.
MASK_GEOMETRY = 1
MASK_ASPECT_TOLERANCE = 0.02  # a mask whose aspect ratio differs more from its image's cannot be aligned with it


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (img.mode == "P" and "transparency" in img.info)


def _mask_grey(mask: Mask) -> Image.Image:
    """The mask as an oriented 8-bit grey image: the mask file, or the image's alpha channel."""
    img, _ = _decode(mask.path)
    img = _orient(img)
    if mask.alpha:
        if not _has_alpha(img):
            raise DataError(f"{mask.path}: has no alpha channel (dataset.alpha_mask)")
        return img.convert("RGBA").getchannel("A")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: rescale, as images are
        return Image.fromarray((np.asarray(img, np.float64) / 257.0).clip(0, 255).astype(np.uint8), "L")
    return img.convert("L")


def _probe_mask(mask: Mask, image_size: tuple[int, int]) -> None:
    """A mask must decode, weigh something (not all black) and have its image's aspect ratio."""
    grey = _mask_grey(mask)
    if np.asarray(grey).max() == 0 and mask.minimum == 0:
        what = "alpha channel is fully transparent" if mask.alpha else "mask is all black"
        raise DataError(f"{mask.path}: the {what}: its image would teach nothing; fix the mask, or set mask_min above 0")
    (mw, mh), (w, h) = grey.size, image_size
    if abs(math.log((mw / mh) / (w / h))) > MASK_ASPECT_TOLERANCE:
        raise DataError(f"{mask.path}: the mask is {mw}x{mh} but its image is {w}x{h}: another aspect ratio, so resizing "
                        f"cannot align them; make the mask from the image")


def pair_masks(samples: list[Sample], ds, prefix: str = "dataset") -> list[Sample]:
    """The samples with their masks (`ds.mask_path`: the image of the same stem there; `ds.alpha_mask`:
    the image's alpha). A missing mask is an error naming the image, or with `mask_missing: full` the
    image trains unmasked (one warning lists them). Every mask is decoded and checked here."""
    index = None
    if ds.mask_path:
        index = _control_index(_control_folder(ds.mask_path, f"{prefix}.mask_path"))
    out, missing = [], []
    for s in samples:
        if index is not None:
            f = index.get(s.path.stem)
            mask = None
            if f is not None:
                mask = Mask(f, hashlib.sha256(f.read_bytes()).hexdigest(), False, ds.mask_min)
        else:
            with Image.open(s.path) as im:
                mask = Mask(s.path, s.content_hash, True, ds.mask_min) if _has_alpha(im) else None
        if mask is None:
            if ds.mask_missing != "full":
                where = f"no mask of its file stem in {ds.mask_path}" if index is not None else "no alpha channel"
                raise DataError(f"{s.path}: {where} ({prefix}.{'mask_path' if index is not None else 'alpha_mask'}); add it, "
                                f"or set {prefix}.mask_missing: full to train such images unmasked")
            missing.append(s.path.name)
            out.append(s)
            continue
        _probe_mask(mask, s.size)
        out.append(dataclasses.replace(s, mask=mask))
    if missing:
        warnings.warn(f"{prefix}: {len(missing)} of {len(samples)} image(s) have no mask and train unmasked "
                      f"({prefix}.mask_missing: full): {_listing(missing)}", DataWarning, stacklevel=3)
    if index is not None:
        stems = {s.path.stem for s in samples}
        orphans = sorted(f.name for stem, f in index.items() if stem not in stems)
        if orphans:
            warnings.warn(f"{prefix}.mask_path: {len(orphans)} mask(s) match no image by file stem and are unused: "
                          f"{_listing(orphans)}", DataWarning, stacklevel=3)
    return out


def load_mask_for_bucket(mask: Mask, target_size: tuple[int, int], bucket: tuple[int, int]) -> np.ndarray:
    """The mask's grey level in [0, 1], float32 [H, W], pixel-aligned with load_image_for_bucket of its
    image: resized (LANCZOS) to the image's oriented size `target_size` when its own differs, then the
    image's cover-resize and centre crop (the code controls use)."""
    grey = _mask_grey(mask)
    tw, th = int(target_size[0]), int(target_size[1])
    if grey.size != (tw, th):
        grey = grey.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    rgb = _cover_crop(grey.convert("RGB"), bucket)
    return ((rgb[..., 0] + 1.0) / 2.0).clip(0.0, 1.0).astype(np.float32)


def mask_weights(grey: np.ndarray, minimum: float, path: Path | str = "mask") -> np.ndarray:
    """Per-token loss weights [N] of a mask [H, W] in [0, 1]: weight minimum + (1 - minimum)·g averaged
    over each token's 16x16 pixels (area: the packed latents' token grid, row-major as vae.pack),
    normalised to mean 1 so a half-masked image keeps the learning rate of a whole one."""
    h, w = grey.shape
    pooled = grey.reshape(h // 16, 16, w // 16, 16).mean(axis=(1, 3)).reshape(-1)
    weight = minimum + (1.0 - minimum) * pooled.astype(np.float64)
    if weight.mean() <= 0:
        raise DataError(f"{path}: the mask is black over the whole crop its image trains at: nothing to learn; "
                        f"fix the mask, or set mask_min above 0")
    return (weight / weight.mean()).astype(np.float32)


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """A hash of what training sees (content, caption, bucket), for training_state.json."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.content_hash, s.caption, s.dop_caption, list(s.bucket)]
                            + ([[c.content_hash for c in s.controls]] if s.controls else [])
                            + ([s.mask.content_hash, s.mask.alpha, s.mask.minimum] if s.mask else [])
                            + ([s.dataset, s.repeats, s.loss_weight, s.is_reg, list(s.variants)]
                               if (s.repeats, s.loss_weight, s.is_reg, s.variants) != (1, 1.0, False, ()) else [])).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------


class BatchSampler:
    """Infinite iterator of batches (lists of sample indices), each within one group: a bucket and,
    for edit training, a number of references (`Sample.group`), so a batch's sequences have one length.

    An epoch holds every sample `Sample.repeats` times (a dataset's `repeats`). Epoch e's order is a
    function of (seed, e) only: inside each group the indices (with their repeats) are shuffled and cut
    into batches of exactly `batch_size` (a short last batch is filled with the group's first shuffled
    indices, so shapes stay fixed for mx.compile), then all batches are shuffled together. The state
    is (epoch, position); `state_dict()`/`load_state_dict()` carry it through a checkpoint.
    """

    def __init__(self, samples: Sequence[Sample] | Sequence[tuple[int, ...]], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not samples:
            raise DataError("no samples to draw batches from")
        groups = [s.group if isinstance(s, Sample) else (*s, 0)[:3] for s in samples]  # (W, H[, refs])
        repeats = [s.repeats if isinstance(s, Sample) else 1 for s in samples]
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._by_bucket: dict[tuple[int, int, int], list[int]] = {}
        for i, (g, r) in enumerate(zip(groups, repeats)):
            self._by_bucket.setdefault(g, []).extend([i] * r)  # an image with repeats r is in its epoch r times
        # Text-to-image: the buckets (W, H) alone, the fingerprint text-to-image checkpoints hold, so they resume.
        keyed = [list(g[:2]) for g in groups] if not any(g[2] for g in groups) else [list(g) for g in groups]
        if any(r != 1 for r in repeats):  # the repeats too, where a dataset has them
            keyed = [k + [r] for k, r in zip(keyed, repeats)]
        self._fingerprint = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in sorted(self._by_bucket):
            idx = self._by_bucket[group]
            order = [idx[j] for j in rng.permutation(len(idx))]
            for start in range(0, len(order), self.batch_size):
                batches.append([order[(start + j) % len(order)] for j in range(self.batch_size)])
        return [batches[j] for j in rng.permutation(len(batches))]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return list(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "buckets": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            seed, bs, fp = int(state["seed"]), int(state["batch_size"]), str(state["buckets"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"sampler state is incomplete or malformed ({_first_line(e)})") from None
        if (seed, bs) != (self.seed, self.batch_size):
            raise DataError(f"sampler state is for seed {seed}, batch size {bs}; this run has seed {self.seed}, batch size {self.batch_size}")
        if fp != self._fingerprint:
            raise DataError("sampler state is for a different dataset (images or their buckets changed since the checkpoint)")
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(f"sampler state out of range (epoch {epoch}, position {position})")
        self.epoch, self.position = epoch, position
        self._batches = self._epoch_batches(epoch)


class PairedSampler:
    """Prior preservation as the peers schedule it: every step's batch of subject samples is drawn by a
    `BatchSampler` over the samples that are not a regularisation set, and a regularisation batch of
    the same size and group (bucket, reference count: one sequence length) is drawn beside it, as
    diffusers' train_dreambooth_lora (`--with_prior_preservation`: instance and class images in one
    batch, loss = instance + prior_loss_weight × class) and ai-toolkit's `is_reg` (a reg batch whose
    gradient is accumulated with a subject batch's) do. The subject loses no steps to the set; a step
    costs two samples' forward and backward. Each group's reg samples cycle in their own BatchSampler
    (seeded from `seed`); the state of all of them goes into the checkpoint."""

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int):
        self.subject = [i for i, s in enumerate(samples) if not s.is_reg]
        reg = [i for i, s in enumerate(samples) if s.is_reg]
        if not self.subject:
            raise DataError("every dataset is a regularisation set (is_regularization: true): nothing to train the subject on")
        self.main = BatchSampler([samples[i] for i in self.subject], batch_size, seed)
        by_group: dict[tuple, list[int]] = {}
        for i in reg:
            by_group.setdefault(samples[i].group, []).append(i)
        missing = sorted({samples[i].group for i in self.subject} - set(by_group))
        if missing:
            label = lambda g: f"{g[0]}x{g[1]}" + (f" with {g[2]} reference(s)" if g[2] else "")  # noqa: E731
            have = ", ".join(label(g) for g in sorted(by_group))
            raise DataError(f"the regularisation set has no image in bucket(s) {', '.join(label(g) for g in missing)} "
                            f"that the subject trains at (it has {have}): each subject batch is paired with reg images "
                            f"of its bucket; add reg images of that size or aspect ratio")
        self._reg_idx = {g: idx for g, idx in by_group.items()}
        self.reg = {g: BatchSampler([samples[i] for i in idx], batch_size, seed + 1 + k)
                    for k, (g, idx) in enumerate(sorted(by_group.items()))}
        self.batch_size, self.seed = batch_size, seed
        self._samples = samples

    @property
    def batches_per_epoch(self) -> int:
        return self.main.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.main.epoch

    def __iter__(self) -> "PairedSampler":
        return self

    def __next__(self) -> tuple[list[int], list[int]]:
        """(subject indices, reg indices) into the samples the sampler was made with."""
        subject = [self.subject[j] for j in next(self.main)]
        g = self._samples[subject[0]].group
        return subject, [self._reg_idx[g][j] for j in next(self.reg[g])]

    def state_dict(self) -> dict[str, Any]:
        return {**self.main.state_dict(), "reg": {"x".join(map(str, g)): r.state_dict() for g, r in self.reg.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        reg = state.get("reg")
        if not isinstance(reg, dict) or set(reg) != {"x".join(map(str, g)) for g in self.reg}:
            raise DataError("sampler state has no regularisation-set state for this run's buckets (written by a run "
                            "without a regularisation set, or with other buckets)")
        self.main.load_state_dict({k: v for k, v in state.items() if k != "reg"})
        for g, r in self.reg.items():
            r.load_state_dict(reg["x".join(map(str, g))])
