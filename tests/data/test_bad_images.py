"""Real image folders are full of broken files: each kind is decoded correctly or skipped,
counted and reported with its path; a limit and a strict mode stop the run with a clear message."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import ConfigError, load_config
from mimkit.data import BadImageError, BadImagePolicy, ImageFolder
from mimkit.data.datasets import MAX_IMAGE_PIXELS, load_image
from tests.conftest import DEMO, tiny_overrides


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


GRADIENT = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # (8, 16): 0, 16, ... 240


def test_every_good_kind_decodes_to_the_right_pixels():
    rgb = Image.fromarray(np.stack([GRADIENT] * 3, -1))
    # RGBA, palette, CMYK: the same gray ramp in the end
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)  # 16 colours: exact
    for img in (rgb.convert("RGBA"), palette, rgb.convert("CMYK")):
        fmt = _jpeg if img.mode == "CMYK" else _png
        t = load_image(io.BytesIO(fmt(img)), channels=3)
        assert t.shape == (3, 8, 16) and t.dtype == torch.uint8
        assert (t[0].float() - torch.from_numpy(GRADIENT).float()).abs().max() <= 3, img.mode
    # 16-bit grayscale: scaled to 8 bits, not clipped (65535 -> 255, 32896 -> 128)
    wide = (GRADIENT.astype(np.uint16) * 257).clip(0, 65535)
    wide[0, 0], wide[0, 1] = 65535, 32896
    t = load_image(io.BytesIO(_png(Image.fromarray(wide))), channels=1)
    assert t.dtype == torch.uint8 and t[0, 0, 0] == 255 and t[0, 0, 1] == 128
    assert torch.equal(t[0, 1:], torch.from_numpy(GRADIENT[1:]))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): (8, 16) -> (16, 8)
    exif = Image.Exif()
    exif[0x0112] = 6
    t = load_image(io.BytesIO(_jpeg(rgb, exif=exif.tobytes())), channels=3)
    assert t.shape == (3, 16, 8)
    # 1x1 and an extreme aspect ratio
    assert load_image(io.BytesIO(_png(Image.new("L", (1, 1), 7))), channels=3).shape == (3, 1, 1)
    assert load_image(io.BytesIO(_png(Image.new("RGB", (2000, 1)))), channels=1).shape == (
        1, 1, 2000)  # fmt: skip


def _bad_files() -> dict[str, bytes]:
    good_png = _png(Image.fromarray(GRADIENT))
    good_jpg = _jpeg(Image.fromarray(GRADIENT))
    bombs = []  # tiny files that decode to 10^8 and 4 x 10^8 pixels (cheap to write: 1-bit)
    for side in (10000, 20000):
        bombs.append(io.BytesIO())
        Image.new("1", (side, side)).save(bombs[-1], format="PNG")
    return {
        "zero.png": b"",
        "text.jpg": b"this is not an image\n" * 10,
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "corrupt.png": good_png[:40] + b"\x00" * 64 + good_png[104:],
        "bomb.png": bombs[0].getvalue(),  # over mimkit's limit
        "bigger_bomb.png": bombs[1].getvalue(),  # over Pillow's own
        "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    }


def test_each_bad_kind_raises_a_decode_error():
    assert MAX_IMAGE_PIXELS < 10000 * 10000
    for name, data in _bad_files().items():
        with pytest.raises((OSError, ValueError, SyntaxError)):
            load_image(io.BytesIO(data), channels=1)
            pytest.fail(name)


@pytest.fixture
def messy(tmp_path):
    """A class-subfolder tree: 6 good images and every bad kind among them."""
    root = tmp_path / "messy"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            arr = np.full((12, 12), 40 * i + (100 if c == "b" else 0), np.uint8)
            Image.fromarray(arr).save(root / c / f"good{i}.png")
    for name, data in _bad_files().items():
        (root / "a" / name).write_bytes(data)
    return root


def test_a_folder_skips_bad_files_reports_them_once_and_keeps_going(messy, tmp_path):
    report = tmp_path / "skipped.jsonl"
    ds = ImageFolder(messy, channels=1, policy=BadImagePolicy("skip", 100, report))
    assert len(ds) == 6 + len(_bad_files())
    for epoch in range(2):  # the second epoch reports nothing new
        items = [ds[i] for i in range(len(ds))]
        assert all(img.shape == (1, 12, 12) for img, _ in items), epoch
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == sorted(_bad_files())
    assert all(r["error"] for r in rows)
    # deterministic: a bad index always gives the same replacement
    assert all(torch.equal(ds[i][0], ds[i][0]) for i in range(len(ds)))


def test_the_limit_and_the_strict_mode_stop_with_the_path(messy, tmp_path):
    ds = ImageFolder(messy, channels=1, policy=BadImagePolicy("skip", 3, tmp_path / "r.jsonl"))
    with pytest.raises(BadImageError, match=r"more than data\.max_bad_images=3 \(listed in"):
        [ds[i] for i in range(len(ds))]
    strict = ImageFolder(messy, channels=1, policy=BadImagePolicy("error"))
    with pytest.raises(BadImageError, match=r"messy/a/\w+\.(png|jpg): cannot decode"):
        [strict[i] for i in range(len(strict))]


def test_pretraining_on_a_messy_folder_writes_the_skip_report(messy, tmp_path, capsys):
    from mimkit.cli import main

    run = tmp_path / "run"
    args = tiny_overrides(run, **{"data.name": "folder", "data.root": str(messy),
                                  "model.in_chans": 1, "train.epochs": 1,
                                  "train.batch_size": 4, "data.num_workers": 1})  # fmt: skip
    assert main(["pretrain", "-c", str(DEMO), *args]) == 0
    out = capsys.readouterr().out
    assert "steps 3," in out
    rows = (run / "skipped_images.jsonl").read_text().splitlines()
    assert len(rows) == len(_bad_files())
    assert f"skipped images: {len(_bad_files())} could not be decoded" in out  # the summary says
    with pytest.raises(ConfigError, match=r"data\.bad_images"):
        load_config(DEMO, [*args, "data.bad_images=ignore"])
    strict = tmp_path / "strict"
    args = [a.replace(str(run), str(strict)) for a in args]
    from mimkit.cli import main

    assert main(["pretrain", "-c", str(DEMO), *args, "data.bad_images=error"]) == 2
