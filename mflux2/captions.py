"""Captions written by a vision-language model: `mflux2-caption DATASET` and `dataset.auto_caption`.

Without captions every image trains on the trigger word alone, weak conditioning for FLUX.2's
natural-language text encoder. Each caption is one sentence in a `.txt` beside its image (the
layout `dataset.caption_format: txt` reads), trigger word first — `<trigger>, <caption>`, the place
mflux2's caption rule (and the seed guide's) puts it:

- `subject` (default): the subject is called by a generic noun ("a toy", or the DOP class word) and
  its own look is NOT described — that is what the trigger word must learn; everything the LoRA
  should not absorb is: background, setting, lighting, camera angle, pose, other objects.
- `style`: the content only (subjects, setting, composition), not the style, medium or palette.
- `edit`: for image-to-image pairs, the instruction that turns the control image (same file stem in
  the control folder) into the target.

An existing caption is never replaced unless asked (`--overwrite`), so an interrupted run resumes
where it stopped: each caption is written as soon as it is made.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STYLES = ("subject", "style", "edit")
MAX_TOKENS = 120  # a sentence of 15-40 words, with room to spare

SYSTEM = "You write captions for the training images of a LoRA for an image-generation model."
PROMPTS = {
    "subject": (
        "Write the caption of this image: one sentence of 15 to 40 words, plain descriptive English. "
        "Call the main subject {noun} and do not describe its own look — its colors, markings, shape, materials "
        "and other distinctive features are what the LoRA learns from its trigger word. Describe everything the "
        "LoRA must not absorb: the background and setting, the lighting, the camera angle and framing, the "
        "subject's pose, and any other objects. Reply with the caption only."
    ),
    "style": (
        "Write the caption of this image: one sentence of 15 to 40 words, plain descriptive English. Describe "
        "only its content — the subjects, objects, setting and composition — and not its artistic style, medium, "
        "color palette, brushwork or rendering: those are what the LoRA learns from its trigger word. Reply with "
        "the caption only."
    ),
    "edit": (
        "Image 1 is an input image, image 2 the result of editing it. Write the instruction that turns image 1 "
        "into image 2: one imperative sentence of at most 25 words (such as \"make the sky stormy\"), only what "
        "changes. Reply with the instruction only."
    ),
}
def prompt_for(style: str, class_word: str | None = None) -> str:
    noun = f'"a {class_word}"' if class_word else 'by a short generic noun (such as "a toy", "a man" or "a dog")'
    return PROMPTS[style].format(noun=noun)


def clean_caption(reply: str) -> str:
    """One line of caption from a reply: no thinking block, label, quotes or line breaks."""
    from mflux2.vlm import clean_reply

    text = " ".join(clean_reply(reply).split())
    text = re.sub(r"^(caption|instruction)\s*:\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^\[trigger\]\s*,?\s*", "", text, flags=re.IGNORECASE)
    return text.strip().strip('"“”').strip()


def with_trigger(caption: str, trigger: str | None) -> str:
    """`<trigger>, <caption>` (the caption as is when it already names the trigger word)."""
    from mflux2.training.data import apply_trigger

    return apply_trigger(caption, trigger)


def find_control(target: Path, control_dir: Path) -> Path | None:
    """The control image of `target`: the file with the same stem in `control_dir` (the trainer's
    pairing rule and extensions, mflux2.training.data)."""
    from mflux2.training.data import CONTROL_EXTS

    found = [p for p in sorted(control_dir.iterdir()) if p.stem == target.stem and p.suffix.lower() in CONTROL_EXTS
             and not p.name.startswith(".")]
    return found[0] if found else None


def has_caption(image: Path) -> bool:
    txt = image.with_suffix(".txt")
    return txt.is_file() and txt.stat().st_size > 0 and bool(txt.read_bytes().strip())


@dataclass
class Summary:
    images: int = 0
    written: int = 0
    kept: int = 0
    failed: list = field(default_factory=list)  # "name (why)"
    seconds: float = 0.0

    def line(self) -> str:
        fails = f", {len(self.failed)} failed: {', '.join(self.failed[:5])}{' ...' if len(self.failed) > 5 else ''}" if self.failed else ""
        return (f"captions: {self.written} written, {self.kept} kept (already captioned) of {self.images} image(s)"
                f"{fails} — {self.seconds:.1f} s")


def caption_images(images: list[Path], model: str, trigger: str | None = None, style: str = "subject",
                   overwrite: bool = False, control_dir: Path | None = None, class_word: str | None = None,
                   log=print, progress: bool = True) -> Summary:
    """Write `<image>.txt` for each image without a caption (every image with `overwrite`), with the
    VLM `model` loaded for the job and freed after it."""
    from tqdm import tqdm

    from mflux2 import vlm
    from mflux2.training.outputs import atomic_write_text

    if style not in STYLES:
        raise vlm.VLMError(f"caption style {style!r}: choose one of {', '.join(STYLES)}")
    if style == "edit" and control_dir is None:
        raise vlm.VLMError("edit captions need the control images: give their folder (--control, dataset.control_path)")
    started = time.perf_counter()
    summary = Summary(images=len(images))
    todo = [p for p in images if overwrite or not has_caption(p)]
    summary.kept = len(images) - len(todo)
    if todo:
        prompt = prompt_for(style, class_word)
        with vlm.loaded(model, log=log) as m:
            for image in tqdm(todo, desc="captioning", unit="img", dynamic_ncols=True, disable=not progress):
                pics = [image]
                if style == "edit":
                    control = find_control(image, control_dir)
                    if control is None:
                        summary.failed.append(f"{image.name} (no control image with its stem in {control_dir})")
                        continue
                    pics = [control, image]
                try:
                    caption = clean_caption(m.ask(pics, prompt, system=SYSTEM, max_tokens=MAX_TOKENS))
                except ValueError as e:  # an unreadable image
                    summary.failed.append(f"{image.name} ({str(e).split(': ', 1)[-1]})")
                    continue
                if not caption:
                    summary.failed.append(f"{image.name} (empty reply)")
                    continue
                atomic_write_text(image.with_suffix(".txt"), with_trigger(caption, trigger) + "\n")
                summary.written += 1
    summary.seconds = time.perf_counter() - started
    return summary


def dataset_images(spec: str, key: str = "dataset.path") -> list[Path]:
    """The images a training run would read from `spec` (a folder, or a hub dataset in its cache snapshot)."""
    from mflux2.training import data as data_mod

    folder, recursive = data_mod.resolve_dataset_path(spec, key)
    images = data_mod._list_images(folder, recursive)
    if not images:
        raise data_mod.DataError(f"{key}: no images (png/jpg/jpeg/webp) in {folder}")
    return images


def auto_caption(cfg, log=print) -> list[Summary]:
    """`dataset.auto_caption`: caption the images of dataset.path (and dataset.validation_path) that
    have none, before the trainer scans them. The VLM is freed before the function returns."""
    ds = cfg.dataset
    class_word = cfg.loss.diff_output_preservation_class if cfg.loss.diff_output_preservation else None
    out = []
    # edit captions: from each target's first reference (the first control folder)
    for key, spec, controls in (("dataset.path", ds.path, ds.control_path),
                                ("dataset.validation_path", ds.validation_path, ds.validation_control_path)):
        if not spec:
            continue
        images = dataset_images(spec, key)
        if all(has_caption(p) for p in images):
            continue
        s = caption_images(images, ds.caption_model, ds.trigger_word, ds.caption_style,
                           control_dir=Path(controls[0]).expanduser() if controls else None, class_word=class_word, log=log)
        log(f"{key}: {s.line()}")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------
# mflux2-caption


def build_parser() -> argparse.ArgumentParser:
    from mflux2.vlm import DEFAULT_VLM, SHORT_NAMES

    p = argparse.ArgumentParser(
        prog="mflux2-caption",
        description="Write a .txt caption beside each image of a LoRA dataset with a vision-language model "
                    "(images that already have one are kept).",
        epilog="example:\n  mflux2-caption data/toy/star --trigger sks --style subject --class shape",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", help="folder of images, or a Hugging Face dataset id (captions go into its cache snapshot)")
    p.add_argument("--model", default=DEFAULT_VLM,
                   help=f"VLM: {', '.join(SHORT_NAMES)}, a Hugging Face repo id or a local folder (default {DEFAULT_VLM})")
    p.add_argument("--trigger", help="trigger word, written first: '<trigger>, <caption>'")
    p.add_argument("--style", choices=STYLES, default="subject",
                   help="subject: describe all but the subject's look (default); style: the content, not the style; "
                        "edit: the instruction from each control image to its target")
    p.add_argument("--class", dest="class_word", help="subject style: the generic noun for the subject (e.g. the DOP class word)")
    p.add_argument("--control", help="edit style: the folder of control images (same file stems as the targets)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from mflux2.hub import ModelLoadError
    from mflux2.training.data import DataError
    from mflux2.vlm import VLMError

    args = build_parser().parse_args(argv)
    try:
        images = dataset_images(args.dataset, "DATASET")
        control = Path(args.control).expanduser() if args.control else None
        if control is not None and not control.is_dir():
            raise DataError(f"--control: no such folder: {control}")
        s = caption_images(images, args.model, args.trigger, args.style, args.overwrite, control, args.class_word,
                           progress=not args.quiet)
    except (VLMError, ModelLoadError, DataError) as e:
        print(f"mflux2-caption: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmflux2-caption: interrupted (the captions written so far are kept; run again to continue)", file=sys.stderr)
        return 130
    print(s.line())
    return 1 if s.failed and not s.written and not s.kept else 0


if __name__ == "__main__":
    sys.exit(main())
