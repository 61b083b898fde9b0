"""Procedurally generated captioned images for the toy FLUX.2 model (docs/toy-model.md).

    python scripts/make_toy_data.py --out data/shapes --seed 0 --count 2000 --size 64
    python scripts/make_toy_data.py --out data/star --seed 1 --count 16 --subject star --trigger sks
    python scripts/make_toy_data.py --out data/copy --seed 2 --count 96 --edit copy --trigger sks

Base mode: one coloured shape (circle, square or triangle) on a plain coloured background, captioned
"a red circle on a blue background". Subject mode: a shape the base model never saw (a star), captioned
with the trigger word standing for it — "a red sks on a blue background" — so that replacing the
trigger by the class word "shape" gives a prompt the base model knows (it is trained on "a red shape
on a blue background" as well, see scripts/train_toy_model.py): that is what DOP preserves.

Edit mode (`--edit copy|cycle|swap`): pairs for an edit LoRA (configs/quickstart-edit.yaml).
`<out>/control/` holds a base image ("a red circle on a blue background"), `<out>/target/` under the
same file name the edited image — the same shape in the same place, with its colours unchanged
(`copy`), each moved to the palette's next colour (`cycle`: red → green → blue → yellow → purple →
white → red) or exchanged (`swap`) — captioned "sks, copy the image" (or "cycle"/"swap the colours"):
no colour word, so only the reference image can tell which colours to draw. The training split leaves
out the held-out combinations on both sides (neither a held-out control nor its edited image is shown).

Each image is `<name>.png` with a same-name `.txt` caption. Everything is deterministic from the seed:
the same arguments give byte-identical files. `--split train|heldout|all` chooses the (colour, shape,
background) combinations; the held-out ones are never shown to the toy model in training and are used
to measure its prompt following.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Colours far apart in RGB so that a generated image can be scored by the nearest palette colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")  # the base model's shapes
SUBJECTS = ("star",)  # shapes only the subject datasets contain (the toy model's VAE saw them)
# Subjects for datasets only, never part of the toy model's training (configs/quickstart-datasets.yaml's
# second subject): a plus-shaped cross.
EXTRA_SUBJECTS = ("cross",)
CLASS_WORD = "shape"  # the generic word the base model also learns (the DOP class)
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: smooth, deterministic edges

CAPTION = "a {colour} {shape} on a {background} background"
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    background: str
    cx: float  # centre, in pixels
    cy: float
    radius: float  # circumradius, in pixels

    @property
    def combo(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.background


def caption(colour: str, shape: str, background: str) -> str:
    return CAPTION.format(colour=colour, shape=shape, background=background)


def parse_caption(text: str) -> tuple[str, str, str]:
    """"a red circle on a blue background" -> ("red", "circle", "blue")."""
    m = _CAPTION_RE.match(" ".join(text.split()))
    if not m:
        raise ValueError(f"not a toy caption (expected {CAPTION!r}): {text!r}")
    return m.group(1), m.group(2), m.group(3)


def all_combos(shapes=SHAPES) -> list[tuple[str, str, str]]:
    return [(c, s, b) for s in shapes for c in COLOURS for b in COLOURS if c != b]


# A fixed tenth of the base combinations (9 of 90): three per shape, every colour at least once as the
# shape's and as the background's colour. Each word still occurs in training in other combinations, so
# these test whether the model composes what it learned.
HELD_OUT = frozenset({
    ("red", "circle", "blue"), ("yellow", "circle", "purple"), ("white", "circle", "green"),
    ("green", "square", "red"), ("purple", "square", "white"), ("blue", "square", "yellow"),
    ("purple", "triangle", "green"), ("red", "triangle", "white"), ("blue", "triangle", "purple"),
})


def is_held_out(combo: tuple[str, str, str]) -> bool:
    return tuple(combo) in HELD_OUT


def combos_for(split: str, shapes=SHAPES) -> list[tuple[str, str, str]]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r}: choose train, heldout or all")
    combos = all_combos(shapes)
    if split == "all":
        return combos
    return [x for x in combos if is_held_out(x) == (split == "heldout")]


EDITS = ("copy", "cycle", "swap")
EDIT_CAPTION = {"cycle": "{trigger}, cycle the colours", "swap": "{trigger}, swap the colours",
                "copy": "{trigger}, copy the image"}


def next_colour(colour: str) -> str:
    """The palette's next colour, in order red → green → blue → yellow → purple → white → red."""
    return COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]


def edited(item: Item, edit: str) -> Item:
    """The target of an edit pair: the same shape in the same place with its colours changed —
    `cycle`: each of the two colours to the palette's next; `swap`: shape and background colours
    exchanged; `copy`: unchanged."""
    c, b = item.colour, item.background
    c, b = {"cycle": (next_colour(c), next_colour(b)), "swap": (b, c), "copy": (c, b)}[edit]
    return Item(c, item.shape, b, item.cx, item.cy, item.radius)


def edit_combos(split: str, edit: str = "copy") -> list[tuple[str, str, str]]:
    """Control combinations of an edit: held-out = the base held-out ones; train = the others whose
    edited image is not held-out either (72 or 81 of 90)."""
    if split == "heldout":
        return sorted(HELD_OUT, key=all_combos().index)
    if split != "train":
        raise ValueError(f"split={split!r}: edit pairs come in train or heldout")
    return [x for x in all_combos() if not is_held_out(x) and not is_held_out(edited(Item(*x, 0, 0, 0), edit).combo)]


def sample_items(seed: int, count: int, size: int = 64, shapes=SHAPES, split: str = "train",
                 combos: list[tuple[str, str, str]] | None = None) -> list[Item]:
    """`count` random items: a combination drawn uniformly from the split, a centre jittered by up to
    1/20 of the image and a circumradius of 0.27 to 0.32 of it. (Wider jitter made the toy model's
    shapes markedly worse for the same training time.)"""
    rng = np.random.default_rng(seed)
    combos = combos_for(split, shapes) if combos is None else combos
    if not combos:
        raise ValueError(f"no combinations in split {split!r} for shapes {shapes}")
    items = []
    for _ in range(count):
        c, s, b = combos[rng.integers(len(combos))]
        radius = size * rng.uniform(0.27, 0.32)
        cx, cy = size / 2 + size * rng.uniform(-0.05, 0.05, size=2)
        items.append(Item(c, s, b, float(cx), float(cy), float(radius)))
    return items


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for the circle). Sizes are chosen so the shapes cover
    similar areas: a square of half-side 0.85r, an upright triangle of circumradius 1.15r and a
    five-pointed star of outer radius 1.15r, inner radius 0.5 of that."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.15 * r
        cy = cy + 0.2 * R  # centre the triangle's bounding box, not its circumcentre
        return [(cx + R * math.sin(a), cy - R * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "cross":
        R, w = 1.05 * r, 0.36 * r  # arm length, arm half-width
        return [(cx - w, cy - R), (cx + w, cy - R), (cx + w, cy - w), (cx + R, cy - w), (cx + R, cy + w),
                (cx + w, cy + w), (cx + w, cy + R), (cx - w, cy + R), (cx - w, cy + w), (cx - R, cy + w),
                (cx - R, cy - w), (cx - w, cy - w)]
    if shape == "star":
        R = 1.15 * r
        cy = cy + 0.1 * R
        pts = []
        for k in range(10):
            rad = R if k % 2 == 0 else 0.5 * R
            a = k * math.pi / 5
            pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES + SUBJECTS + EXTRA_SUBJECTS)}")


def render(item: Item, size: int = 64) -> Image.Image:
    """The item as a size x size RGB image."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), PALETTE[item.background])
    draw = ImageDraw.Draw(img)
    fill = PALETTE[item.colour]
    cx, cy, r = item.cx * k, item.cy * k, item.radius * k
    pts = polygon(item.shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(pts, fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


MASK_MARGIN = 3  # pixels of background kept around the shape in its mask


def mask(item: Item, size: int = 64) -> Image.Image:
    """The shape's mask ("L"): white on the shape and MASK_MARGIN pixels around it, black elsewhere."""
    k = SUPERSAMPLE
    img = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = item.cx * k, item.cy * k, item.radius * k
    pts = polygon(item.shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(pts, fill=255)
    on = np.asarray(img.resize((size, size), Image.Resampling.BOX)) > 0  # every pixel the shape touches
    return Image.fromarray(np.where(on, 255, 0).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * MASK_MARGIN + 1))


def clutter(image: Image.Image, keep: Image.Image, seed: int) -> Image.Image:
    """`image` with random coloured discs drawn where `keep` (a mask) is black: the picture changes
    only outside the mask. Deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    size = image.size[0]
    layer = image.copy()
    draw = ImageDraw.Draw(layer)
    for _ in range(12):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(2, 6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=PALETTE[COLOURS[rng.integers(len(COLOURS))]])
    return Image.composite(image, layer, keep)


def make_dataset(out: str | Path, seed: int, count: int, size: int = 64, subject: str | None = None,
                 trigger: str | None = None, split: str = "train", masks: str | Path | None = None,
                 cluttered: bool = False) -> list[Path]:
    """Write `count` images + captions to `out`; returns the image paths. Subject mode draws the
    subject shape and writes the trigger word in its place in the caption. `masks`: a folder to
    write each image's mask into (same file stem, see `mask`); `cluttered`: random discs on the
    background outside that mask (the same shapes, captions and masks as without)."""
    if size % 16 or size < 32:
        raise ValueError(f"--size {size}: must be a multiple of 16 and at least 32 (FLUX.2 needs multiples of 16)")
    if count < 1:
        raise ValueError(f"--count {count}: must be at least 1")
    if subject is not None:
        if subject not in SUBJECTS + EXTRA_SUBJECTS + SHAPES:
            raise ValueError(f"--subject {subject!r}: choose one of {', '.join(SUBJECTS + EXTRA_SUBJECTS + SHAPES)}")
        if not trigger or not re.fullmatch(r"[a-z0-9]+", trigger):
            raise ValueError(f"--trigger {trigger!r}: subject mode needs a trigger word of lowercase letters/digits, e.g. sks")
        shapes = (subject,)
    elif trigger:
        raise ValueError("--trigger is only used with --subject")
    else:
        shapes = SHAPES
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    width = len(str(count - 1))
    for i, item in enumerate(sample_items(seed, count, size, shapes, split if subject is None else "all")):
        stem = f"{'subject' if subject else 'shape'}_{i:0{width}d}"
        image = render(item, size)
        if masks is not None or cluttered:
            m = mask(item, size)
            if masks is not None:
                Path(masks).mkdir(parents=True, exist_ok=True)
                m.save(Path(masks) / f"{stem}.png")
            if cluttered:
                image = clutter(image, m, seed * 100_003 + i)
        image.save(out / f"{stem}.png")
        word = trigger if subject else item.shape
        (out / f"{stem}.txt").write_text(caption(item.colour, word, item.background) + "\n")
        paths.append(out / f"{stem}.png")
    return paths


def make_edit_pairs(out: str | Path, seed: int, count: int, size: int = 64, edit: str = "copy", trigger: str = "sks",
                    split: str = "train") -> list[tuple[Path, Path]]:
    """Write `count` (control, target) pairs to `out`/control and `out`/target (same file names, the
    caption beside the target); returns the pairs' paths."""
    if edit not in EDITS:
        raise ValueError(f"--edit {edit!r}: choose one of {', '.join(EDITS)}")
    if size % 16 or size < 32:
        raise ValueError(f"--size {size}: must be a multiple of 16 and at least 32 (FLUX.2 needs multiples of 16)")
    if not trigger or not re.fullmatch(r"[a-z0-9]+", trigger):
        raise ValueError(f"--trigger {trigger!r}: edit mode needs a trigger word of lowercase letters/digits, e.g. sks")
    out = Path(out)
    (out / "control").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)
    if count < 1:
        raise ValueError(f"--count {count}: must be at least 1")
    items = sample_items(seed, count, size, combos=edit_combos(split, edit))
    width = len(str(count - 1))
    pairs = []
    for i, item in enumerate(items):
        stem = f"pair_{i:0{width}d}"
        render(item, size).save(out / "control" / f"{stem}.png")
        render(edited(item, edit), size).save(out / "target" / f"{stem}.png")
        (out / "target" / f"{stem}.txt").write_text(EDIT_CAPTION[edit].format(trigger=trigger) + "\n")
        pairs.append((out / "control" / f"{stem}.png", out / "target" / f"{stem}.png"))
    return pairs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64, help="square image size in pixels (multiple of 16)")
    ap.add_argument("--subject", choices=SUBJECTS + EXTRA_SUBJECTS + SHAPES, help="subject mode: draw only this shape")
    ap.add_argument("--trigger", help="subject mode: the word written in place of the shape in captions")
    ap.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                    help="base mode: which (colour, shape, background) combinations to draw")
    ap.add_argument("--masks", help="also write each image's mask (the shape plus a margin) into this folder")
    ap.add_argument("--clutter", action="store_true", help="random discs on the background, outside the mask")
    ap.add_argument("--edit", choices=EDITS, help="edit mode: (control, target) pairs in OUT/control and OUT/target")
    a = ap.parse_args(argv)
    try:
        if a.edit:
            if a.subject:
                raise ValueError("--edit and --subject do not go together")
            paths = make_edit_pairs(a.out, a.seed, a.count, a.size, a.edit, a.trigger or "sks", a.split)
        else:
            paths = make_dataset(a.out, a.seed, a.count, a.size, a.subject, a.trigger, a.split, a.masks, a.clutter)
    except ValueError as e:
        print(f"make_toy_data: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} {'pairs' if a.edit else 'images + captions'} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
