"""Dataset discovery, captions, odd images, buckets and the resumable batch order."""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mflux2.training.data as data
from mflux2.training.config_loading import config_from_dict
from mflux2.training.data import (
    MAX_ASPECT,
    BatchSampler,
    DataError,
    DataWarning,
    Sample,
    bucket_grid,
    apply_trigger,
    build_dop_caption,
    choose_bucket,
    dataset_fingerprint,
    load_image_for_bucket,
    probe_image,
    read_caption,
    scan_dataset,
)

RNG = np.random.default_rng(0)


def rand_rgb(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_cfg(path, **kw):
    ds = {"path": str(path), "trigger_word": kw.pop("trigger", "sks"), **kw.pop("dataset", {})}
    raw = {"dataset": ds, "memory": {"bucketing": {"resolutions": kw.pop("resolutions", [64])}}}
    if kw.pop("dop", False):
        raw["loss"] = {"diff_output_preservation": True, "diff_output_preservation_class": "toy"}
    raw.update(kw)
    return config_from_dict(raw)


def scan_quiet(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return scan_dataset(cfg, **kw)


# ---------------------------------------------------------------------------------------------
# Discovery and captions
# ---------------------------------------------------------------------------------------------


def test_folder_scan_captions_and_dop(tmp_path):
    for name, ext in (("a", ".png"), ("b", ".jpg"), ("c", ".jpeg"), ("d", ".webp"), ("e", ".JPG")):
        rand_rgb(96, 64).save(tmp_path / f"{name}{ext}")
    (tmp_path / "a.txt").write_text("a photo of [trigger] on a table")
    (tmp_path / "b.txt").write_text("sks toy in the grass")
    (tmp_path / "c.txt").write_text("a red toy")
    (tmp_path / "d.txt").write_text("  SKS   next to\na cat\n")
    (tmp_path / "e.txt").write_text("asks nothing")  # "sks" only inside a word: not the trigger
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS fork file: skipped
    (tmp_path / "sub").mkdir()
    rand_rgb(64, 64).save(tmp_path / "sub" / "x.png")  # a local folder's subfolders are not scanned
    (tmp_path / "notes.md").write_text("not an image")

    samples = scan_quiet(make_cfg(tmp_path, dop=True))
    assert [s.path.name for s in samples] == ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.JPG"]
    caps = {s.path.stem: (s.caption, s.dop_caption) for s in samples}
    assert caps["a"] == ("a photo of sks on a table", "a photo of toy on a table")
    assert caps["b"] == ("sks toy in the grass", "toy toy in the grass")
    assert caps["c"] == ("sks, a red toy", "toy, a red toy")
    assert caps["d"] == ("SKS next to a cat", "toy next to a cat")
    assert caps["e"] == ("sks, asks nothing", "toy, asks nothing")
    for s in samples:
        assert s.content_hash == hashlib.sha256(s.path.read_bytes()).hexdigest()
        assert s.size == (96, 64) and s.bucket[0] % 16 == 0 and s.bucket[1] % 16 == 0


def test_caption_helpers():
    assert apply_trigger("{TRIGGER} style", "rwaite") == "rwaite style"
    assert apply_trigger("", "sks") == "sks"
    assert apply_trigger("a cat", None) == "a cat"
    assert build_dop_caption("sks cat, by sks", "sks", "cat") == "cat cat, by cat"
    assert build_dop_caption("sks cat", "sks", None) is None
    assert apply_trigger("my c++ toy", "c++") == "my c++ toy"  # regex characters in the trigger
    assert apply_trigger("a toy  on a beach", "sks") == "sks, a toy on a beach"


def test_missing_captions_one_warning_listing_files(tmp_path):
    for n in ("1", "2", "3"):
        rand_rgb(64, 64).save(tmp_path / f"{n}.jpeg")
    (tmp_path / "2.txt").write_text("sks on a shelf")
    with pytest.warns(DataWarning) as rec:
        samples = scan_dataset(make_cfg(tmp_path))
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "2 image(s) have no caption" in msgs[0] and "1.jpeg" in msgs[0] and "3.jpeg" in msgs[0]
    assert "metadata.jsonl" not in msgs[0] and "2.jpeg" not in msgs[0]
    assert [s.caption for s in samples] == ["sks", "sks on a shelf", "sks"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        (codecs.BOM_UTF8 + "café sks".encode(), "café sks"),
        ("café ✓ sks".encode("utf-16"), "café ✓ sks"),  # with BOM (native order)
        (codecs.BOM_UTF16_BE + "naïve".encode("utf-16-be"), "naïve"),
        ("plain utf16 text".encode("utf-16-le"), "plain utf16 text"),  # BOM-less
        (codecs.BOM_UTF32_LE + "ünï".encode("utf-32-le"), "ünï"),
        ("café déjà vu".encode("latin-1"), "café déjà vu"),
        ("“quoted” – dash".encode("cp1252"), "“quoted” – dash"),
        ("line one\r\nline two\r\n".encode(), "line one line two"),
        ("日本語のキャプション".encode(), "日本語のキャプション"),
    ],
)
def test_caption_encodings(tmp_path, raw, expected):
    (tmp_path / "c.txt").write_bytes(raw)
    assert read_caption(tmp_path / "c.txt") == expected


def test_jsonl_captions(tmp_path):
    for n in ("x", "y", "z"):
        rand_rgb(64, 64).save(tmp_path / f"{n}.png")
    rows = [{"file_name": "x.png", "prompt": "[trigger] on a rug"}, {"file_name": "y.png", "text": "a toy"},
            {"file_name": "z.png", "caption": "sks toy", "extra": 3}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = scan_quiet(make_cfg(tmp_path, dataset={"caption_format": "jsonl"}))
    assert [s.caption for s in samples] == ["sks on a rug", "sks, a toy", "sks toy"]

    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: not valid JSON"):
        scan_quiet(make_cfg(tmp_path, dataset={"caption_format": "jsonl"}))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "t"}) + "\n")
    with pytest.raises(DataError, match=r"gone\.png \(listed in metadata\.jsonl, missing\)"):
        scan_quiet(make_cfg(tmp_path, dataset={"caption_format": "jsonl"}))
    with pytest.warns(DataWarning) as rec:
        samples = scan_dataset(make_cfg(tmp_path, dataset={"caption_format": "jsonl", "skip_bad_images": True}))
    assert any("skipped 1" in str(w.message) and "gone.png (listed in metadata.jsonl, missing)" in str(w.message) for w in rec)
    assert [s.caption for s in samples] == ["sks"] * 3  # present images not in the jsonl: trigger alone
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="needs a metadata.jsonl"):
        scan_quiet(make_cfg(tmp_path, dataset={"caption_format": "jsonl"}))


def test_txt_format_hints_at_metadata_jsonl(tmp_path):
    rand_rgb(64, 64).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}) + "\n")
    with pytest.warns(DataWarning, match="caption_format: jsonl"):
        scan_dataset(make_cfg(tmp_path))


def test_a_relative_dataset_path_not_found_names_its_config_line_and_the_folder_looked_in(tmp_path, monkeypatch):
    from mflux2.training.config_loading import load_config

    (tmp_path / "data" / "star").mkdir(parents=True)  # data/ exists here: data/stra is a path, not a hub dataset id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("dataset:\n  trigger_word: sks\n  path: data/stra\n")
    with pytest.raises(DataError) as e:
        scan_dataset(load_config(tmp_path / "cfg.yaml"))
    assert str(e.value) == (f"{tmp_path / 'cfg.yaml'}:3: dataset.path: no such folder: data/stra (relative to the "
                            f"working folder: {tmp_path / 'data' / 'stra'}); did you mean data/star?")


def test_missing_empty_and_file_paths(tmp_path):
    with pytest.raises(DataError, match="no images"):
        scan_dataset(make_cfg(tmp_path))
    with pytest.raises(DataError, match="dataset.path: no such folder"):
        scan_dataset(make_cfg(tmp_path / "a" / "b" / "c"))
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        scan_dataset(make_cfg(tmp_path / "f.png"))
    (tmp_path / "f.png").unlink()
    cfg = make_cfg(tmp_path, dataset={"validation_path": str(tmp_path / "val")})
    with pytest.raises(DataError, match="dataset.validation_path"):
        scan_dataset(cfg, validation=True)


def test_validation_split(tmp_path):
    (tmp_path / "train").mkdir(), (tmp_path / "val").mkdir()
    rand_rgb(64, 64).save(tmp_path / "train" / "t.png")
    rand_rgb(64, 64).save(tmp_path / "val" / "v.png")
    cfg = make_cfg(tmp_path / "train", dataset={"validation_path": str(tmp_path / "val")})
    assert [s.path.name for s in scan_quiet(cfg, validation=True)] == ["v.png"]
    assert [s.path.name for s in scan_quiet(cfg)] == ["t.png"]


# ---------------------------------------------------------------------------------------------
# Hugging Face dataset (no network: snapshot_download is replaced)
# ---------------------------------------------------------------------------------------------


def test_hub_dataset_is_fetched_once_and_scanned_recursively(tmp_path, monkeypatch):
    import huggingface_hub

    snap = tmp_path / "snapshot"
    (snap / "train").mkdir(parents=True)
    for n in ("1", "2"):
        rand_rgb(80, 64).save(snap / "train" / f"{n}.jpeg")
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, **kw):
        calls.append((repo_id, repo_type, kw))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # "diffusers/cat_toy_example" is not a local folder here
    samples = scan_quiet(make_cfg("diffusers/cat_toy_example"))
    assert [s.path.name for s in samples] == ["1.jpeg", "2.jpeg"] and samples[0].caption == "sks"
    (repo_id, repo_type, kw) = calls[0]
    assert (repo_id, repo_type, len(calls)) == ("diffusers/cat_toy_example", "dataset", 1)
    assert "*.jpeg" in kw["allow_patterns"] and "*.txt" in kw["allow_patterns"]


def test_hub_dataset_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, **kw):
        from types import SimpleNamespace  # a stand-in HTTP response (the hub's HTTP library varies by version)

        response = SimpleNamespace(status_code=404, headers={}, request=None)
        raise RepositoryNotFoundError(f"404 Client Error.\n\nRepository Not Found for url: {repo_id}", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        scan_dataset(make_cfg("someone/no-such-set"))
    assert "\n" not in str(e.value) and "someone/no-such-set" in str(e.value) and "neither a local folder" in str(e.value)

    def offline(repo_id, **kw):
        raise OSError("connection refused\nretrying")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="downloading the Hugging Face dataset 'a/b' failed") as e:
        scan_dataset(make_cfg("a/b"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Odd and broken images
# ---------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def write_png(path: Path, w: int, h: int, depth: int, color: int, rows: bytes):
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def test_odd_image_modes_become_rgb(tmp_path):
    base = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    rgb = Image.fromarray(base, "RGB")
    rgb.convert("L").save(tmp_path / "gray.png")
    rgb.convert("1").save(tmp_path / "bw.png")
    rgb.convert("P").save(tmp_path / "palette.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    g16 = Image.fromarray(base[..., 0].astype(np.uint16) * 257)
    assert g16.mode.startswith("I;16")
    g16.save(tmp_path / "gray16.png")
    a16 = base.astype(">u2") * 257  # 16-bit RGB: Pillow cannot write it, so write the PNG by hand
    write_png(tmp_path / "rgb16.png", 64, 48, 16, 2, b"".join(b"\x00" + a16[y].tobytes() for y in range(48)))
    rgba = np.dstack([base, np.full((48, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    pal = rgb.convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    pal.save(tmp_path / "palette_t.png", transparency=pal.info["transparency"])

    for f in sorted(tmp_path.iterdir()):
        arr = load_image_for_bucket(f, (64, 48))
        assert arr.shape == (48, 64, 3) and arr.dtype == np.float32, f.name
        assert arr.min() >= -1.0 and arr.max() <= 1.0, f.name
    expect = base.astype(np.float32) / 127.5 - 1
    g = load_image_for_bucket(tmp_path / "gray16.png", (64, 48))
    for c in range(3):  # 16-bit grey scaled to 8 bits (not clipped at 255), replicated to RGB
        np.testing.assert_allclose(g[..., c], expect[..., 0], atol=1e-6)
    np.testing.assert_allclose(load_image_for_bucket(tmp_path / "rgb16.png", (64, 48)), expect, atol=1e-6)
    alpha = load_image_for_bucket(tmp_path / "alpha.png", (64, 48))
    np.testing.assert_array_equal(alpha[:, :32], 1.0)  # transparent → white
    np.testing.assert_allclose(alpha[:, 32:], expect[:, 32:], atol=1e-6)  # opaque → its colour
    gray = load_image_for_bucket(tmp_path / "gray.png", (64, 48))
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)  # stored 80 wide, 40 tall: left half red, right half blue
    img[:, :40, 0] = 255
    img[:, 40:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=95)
    size, _ = probe_image(tmp_path / "r.jpg")
    assert size == (40, 80)  # displayed: 40 wide, 80 tall
    arr = load_image_for_bucket(tmp_path / "r.jpg", (32, 64))
    assert arr.shape == (64, 32, 3)
    top, bottom = arr[:24].mean(axis=(0, 1)), arr[40:].mean(axis=(0, 1))
    assert top[0] > 0.8 and top[2] < -0.8  # the stored left (red) is now on top
    assert bottom[2] > 0.8 and bottom[0] < -0.8


def _bad_files(folder: Path) -> dict[str, str]:
    rand_rgb(120, 90).save(folder / "full.jpg", quality=90)
    b = (folder / "full.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(b[: len(b) // 2])
    rand_rgb(120, 90).save(folder / "full.png")
    b = (folder / "full.png").read_bytes()
    (folder / "trunc.png").write_bytes(b[: len(b) // 2])
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    (folder / "empty.webp").write_bytes(b"")
    write_png(folder / "zero.png", 0, 10, 8, 2, b"")
    return {"trunc.jpg": "truncated", "trunc.png": "truncated", "garbage.png": "not a readable image",
            "empty.webp": "empty file", "zero.png": "not a readable image"}


def test_broken_images_raise_one_line_naming_the_file(tmp_path):
    bad = _bad_files(tmp_path)
    for name, needle in bad.items():
        with pytest.raises(DataError) as e:
            probe_image(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name)) and needle in msg and "\n" not in msg, msg
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            load_image_for_bucket(tmp_path / name, (64, 64))
    with pytest.raises(DataError) as e:  # every broken file named, in one line
        scan_quiet(make_cfg(tmp_path))
    msg = str(e.value)
    assert msg.startswith("dataset.path: 5 unreadable image(s): empty.webp (empty file") and "\n" not in msg, msg
    assert all(name in msg for name in bad) and "dataset.skip_bad_images: true" in msg
    assert sorted(b.split(" (")[0] for b in e.value.unreadable) == sorted(bad)


def test_skip_bad_images_lists_them_in_one_warning(tmp_path):
    bad = _bad_files(tmp_path)
    with pytest.warns(DataWarning) as rec:
        samples = scan_dataset(make_cfg(tmp_path, dataset={"skip_bad_images": True}))
    assert [s.path.name for s in samples] == ["full.jpg", "full.png"]
    skipped = [str(w.message) for w in rec if "skipped" in str(w.message)]
    assert len(skipped) == 1 and all(n in skipped[0] for n in bad) and "skipped 5 unreadable" in skipped[0]
    for f in ("full.jpg", "full.png"):
        (tmp_path / f).unlink()
    with pytest.raises(DataError, match="none of the 5 image"):
        scan_quiet(make_cfg(tmp_path, dataset={"skip_bad_images": True}))


def test_huge_image_loads_via_draft_and_bomb_limit(tmp_path, monkeypatch):
    y, x = np.mgrid[0:3000, 0:4500]
    big = np.dstack([(x % 256), (y % 256), ((x + y) % 256)]).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=80)
    arr = load_image_for_bucket(tmp_path / "big.jpg", (96, 64))
    assert arr.shape == (64, 96, 3) and np.isfinite(arr).all()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 13.5 MP is now over 2x the limit
    with pytest.raises(DataError, match="safety limit"):
        probe_image(tmp_path / "big.jpg")


# ---------------------------------------------------------------------------------------------
# Buckets and cropping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [256, 512, 768, 1024])
def test_bucket_grid_properties(res):
    grid = bucket_grid(res)
    assert (res, res) in grid
    for w, h in grid:
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / res**2 - 1) < 0.06
        assert 1 / MAX_ASPECT <= w / h <= MAX_ASPECT
        assert (h, w) in grid


@pytest.mark.parametrize("w, h", [(1000, 1000), (1600, 900), (900, 1600), (3000, 1000), (1200, 800), (5000, 500)])
def test_bucket_aspect_follows_the_image(w, h):
    bw, bh = choose_bucket(w, h, [512])
    aspect = min(max(w / h, 1 / MAX_ASPECT), MAX_ASPECT)
    best = min(abs(math.log(a / b / aspect)) for a, b in bucket_grid(512))
    assert abs(math.log(bw / bh / aspect)) == pytest.approx(best)
    assert best < 0.15


def test_resolution_choice_and_upscale_warning(tmp_path):
    assert choose_bucket(1000, 1000, [512, 768]) == (768, 768)  # largest without upscaling
    assert choose_bucket(600, 600, [512, 768]) == (512, 512)
    assert choose_bucket(300, 300, [512, 768]) == (512, 512)  # smaller than all: the smallest
    assert choose_bucket(1000, 600, [512], bucketing=False) == (512, 512)
    rand_rgb(200, 200).save(tmp_path / "small.png")  # 2.56x to reach 512
    rand_rgb(300, 300).save(tmp_path / "ok.png")  # 1.7x: allowed silently
    with pytest.warns(DataWarning) as rec:
        samples = scan_dataset(make_cfg(tmp_path, resolutions=[512], trigger=None))
    msgs = [str(w.message) for w in rec if "upscaled" in str(w.message)]
    assert len(msgs) == 1 and "small.png" in msgs[0] and "ok.png" not in msgs[0]
    assert {s.bucket for s in samples} == {(512, 512)}
    cfg = make_cfg(tmp_path, memory={"bucketing": {"enabled": False}}, dataset={"image_size": 128})
    assert {s.bucket for s in scan_quiet(cfg)} == {(128, 128)}


def test_center_crop_and_identity(tmp_path):
    stripes = np.zeros((100, 300, 3), np.uint8)
    stripes[:, :100, 0] = 255
    stripes[:, 100:200, 1] = 255  # the middle third is green
    stripes[:, 200:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / "s.png")
    arr = load_image_for_bucket(tmp_path / "s.png", (64, 64))
    assert arr.shape == (64, 64, 3)
    np.testing.assert_allclose(arr[:, 4:-4].mean(axis=(0, 1)), [-1, 1, -1], atol=0.02)
    exact = RNG.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "e.png")
    np.testing.assert_array_equal(load_image_for_bucket(tmp_path / "e.png", (80, 48)), exact.astype(np.float32) / 127.5 - 1)


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------


def _buckets(n_a=5, n_b=3, n_c=1):
    return [(64, 64)] * n_a + [(80, 48)] * n_b + [(48, 80)] * n_c


def test_batches_stay_in_one_bucket_and_cover_each_epoch():
    buckets = _buckets()
    s = BatchSampler(buckets, batch_size=2, seed=1)
    assert s.batches_per_epoch == 3 + 2 + 1
    for epoch in range(3):
        seen = set()
        for _ in range(s.batches_per_epoch):
            b = next(s)
            assert len(b) == 2 and len({buckets[i] for i in b}) == 1
            seen.update(b)
        assert seen == set(range(len(buckets))), epoch
        assert s.epoch == epoch


def test_order_is_a_function_of_seed():
    a = [next(s) for s in [BatchSampler(_buckets(), 2, 7)] for _ in range(12)]
    b = [next(s) for s in [BatchSampler(_buckets(), 2, 7)] for _ in range(12)]
    c = [next(s) for s in [BatchSampler(_buckets(), 2, 8)] for _ in range(12)]
    assert a == b and a != c
    e0, e1 = a[:6], a[6:]
    assert e0 != e1  # epochs are reshuffled


@pytest.mark.parametrize("stop_at", [0, 1, 5, 6, 13])
def test_resume_draws_the_same_sequence(stop_at):
    ref = BatchSampler(_buckets(), 2, 3)
    expected = [next(ref) for _ in range(40)]
    first = BatchSampler(_buckets(), 2, 3)
    got = [next(first) for _ in range(stop_at)]
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as in training_state.json
    resumed = BatchSampler(_buckets(), 2, 3)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(40 - stop_at)]
    assert got == expected


def test_resume_refuses_a_different_dataset_or_seed():
    state = BatchSampler(_buckets(), 2, 3).state_dict()
    with pytest.raises(DataError, match="different dataset"):
        BatchSampler(_buckets(n_a=6), 2, 3).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        BatchSampler(_buckets(), 2, 4).load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        BatchSampler(_buckets(), 2, 3).load_state_dict({"epoch": 1})


def test_sampler_accepts_samples_and_fingerprint_changes_with_captions(tmp_path):
    rand_rgb(64, 64).save(tmp_path / "a.png")
    rand_rgb(64, 64).save(tmp_path / "b.png")
    samples = scan_quiet(make_cfg(tmp_path))
    assert isinstance(samples[0], Sample)
    s = BatchSampler(samples, batch_size=4, seed=0)
    b = next(s)
    assert len(b) == 4 and set(b) == {0, 1}  # a bucket smaller than the batch is cycled: fixed shapes
    fp = dataset_fingerprint(samples)
    (tmp_path / "a.txt").write_text("sks on a rug")
    assert dataset_fingerprint(scan_quiet(make_cfg(tmp_path))) != fp
    assert dataset_fingerprint(scan_quiet(make_cfg(tmp_path))) == dataset_fingerprint(scan_quiet(make_cfg(tmp_path)))


def test_module_constants():
    assert data.MAX_UPSCALE == 2.0 and set(data.IMAGE_EXTS) == {".png", ".jpg", ".jpeg", ".webp"}
