"""Datasets: Fashion-MNIST from IDX files, image folders, and a deterministic synthetic set.

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor (C, H, W) and ``label`` an
int (-1 when unlabeled). Transforms are applied by :class:`mimkit.data.views.AugmentedView`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import time
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from mimkit.config.core import ConfigError
from mimkit.config.pretrain import IMAGE_SUFFIXES

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "BadImagePolicy",
    "FashionMNIST",
    "ImageFolder",
    "SyntheticImages",
    "load_image",
    "read_idx",
]

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# statistics of the 60k training images, in [0, 1]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), plain or gzipped. Raises ValueError if malformed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: truncated IDX file ({len(body)} bytes of {expected})")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root}: Fashion-MNIST file {stem}[.gz] not found (install Debian's dataset-fashion-mnist"
        " or set data.root to a folder with the four IDX files)"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST (Xiao et al. 2017): 60k train / 10k test, 28x28 grayscale, 10 classes."""

    mean, std, classes = FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path, split: str = "train", max_samples: int | None = None):
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        img_file, lbl_file = (_find(root, s) for s in FASHION_MNIST_FILES[split])
        images, labels = read_idx(img_file), read_idx(lbl_file)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"{img_file}: unexpected shapes {images.shape} / {labels.shape}")
        n = len(images) if max_samples is None else min(max_samples, len(images))
        self.images = torch.from_numpy(images[:n].copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.labels = torch.from_numpy(labels[:n].astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


# the Pillow decoders of those suffixes (camera MPO files open through JPEG)
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")


# larger images are refused before they are decoded (Pillow's own warning threshold)
MAX_IMAGE_PIXELS = 89_478_485
# what Pillow raises on damaged, truncated or non-image data (and SyntaxError from some plugins)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image that cannot be decoded, or too many of them."""


class BadImagePolicy:
    """What a dataset does with an image it cannot decode (``data.bad_images``).

    ``skip`` (default): the sample is replaced by the next decodable one (deterministically, so
    resumed runs see the same data), and the file is appended once, with the error, to
    ``report`` (``skipped_images.jsonl`` in the run directory); more than ``max_bad`` distinct
    bad files stop the run. ``error``: the first bad file stops the run, with its path. Loader
    workers share the report by appending whole lines.
    """

    def __init__(
        self, mode: str = "skip", max_bad: int = 100, report: str | Path | None = None
    ) -> None:
        if mode not in ("skip", "error"):
            raise ValueError(f"bad-image mode must be 'skip' or 'error', got {mode!r}")
        self.mode, self.max_bad = mode, max_bad
        self.report = Path(report) if report is not None else None
        self.seen: set[str] = set()  # this process's bad files (the report holds everyone's)

    def _recorded(self) -> set[str]:
        if self.report is None or not self.report.is_file():
            return set(self.seen)
        rows = [json.loads(x) for x in self.report.read_text().splitlines() if x.strip()]
        return {r["path"] for r in rows} | self.seen

    def handle(self, path: str | Path, err: BaseException) -> None:
        """Record a bad file, or raise :class:`BadImageError` (strict mode, or over the limit)."""
        path, why = str(path), f"{type(err).__name__}: {err}"
        if self.mode == "error":
            raise BadImageError(f"{path}: cannot decode ({why}); data.bad_images=error")
        known = self._recorded()
        if path not in known:
            self.seen.add(path)
            known.add(path)
            if self.report is not None:
                self.report.parent.mkdir(parents=True, exist_ok=True)
                line = json.dumps({"path": path, "error": why, "time": time.time()}) + "\n"
                fd = os.open(self.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
        if len(known) > self.max_bad:
            where = f" (listed in {self.report})" if self.report is not None else ""
            raise BadImageError(
                f"{len(known)} images could not be decoded, more than "
                f"data.max_bad_images={self.max_bad}{where}; the last: {path} ({why})"
            )


class ImageFolder(Dataset):
    """Images in a flat folder (unlabeled, label -1) or in class subfolders (labels by sorted name).

    Every image is converted explicitly to ``L`` (1 channel) or ``RGB`` (3 channels); other
    channel counts come from ``.npy`` arrays or multi-band TIFFs (:func:`load_image`), normalized
    by ``data.mean`` / ``data.std`` (0.5 / 0.5 by default). An image that cannot be decoded is
    handled by ``policy`` (:class:`BadImagePolicy`: by default skipped, replaced by the next good
    one, and counted).
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet statistics, the field's default
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str | Path,
        *,
        channels: int = 3,
        max_samples: int | None = None,
        policy: BadImagePolicy | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = tuple(p.name for p in subdirs)
        samples: list[tuple[Path, int]] = [(p, -1) for p in _images_in(root, recursive=False)]
        for label, sub in enumerate(subdirs):
            samples += [(p, label) for p in _images_in(sub, recursive=True)]
        if not samples:
            raise ConfigError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.samples = samples[:max_samples] if max_samples else samples
        self.channels = channels
        self.policy = policy or BadImagePolicy()
        if channels != 3:  # no field-wide statistics: give data.mean / data.std
            self.mean, self.std = (0.5,) * channels, (0.5,) * channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        for k in range(n):  # a bad file: the next good one takes its place
            path, label = self.samples[(i + k) % n]
            try:
                return load_image(path, channels=self.channels), label
            except _DECODE_ERRORS as err:
                self.policy.handle(path, err)
        raise BadImageError(f"no image under {self.samples[0][0].parent} could be decoded")


def _to_uint8(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale scaled (not clipped) to 8 bits; other modes unchanged."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        return Image.fromarray(np.round(arr.clip(0, None) * (255.0 / top)).astype(np.uint8))
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr * 255).astype(np.uint8))
    return im


def _array_image(arr: np.ndarray, channels: int) -> torch.Tensor:
    """A (H, W), (C, H, W) or (H, W, C) array of ``channels`` bands -> (C, H, W): uint8 kept,
    other integers scaled by their type's maximum to float32 in [0, 1], floats kept as they are
    (the normalization's mean and std say what they mean)."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise BadImageError(f"an array image must be 2-D or 3-D, got shape {arr.shape}")
    if arr.shape[0] != channels and arr.shape[-1] == channels:
        arr = np.moveaxis(arr, -1, 0)  # (H, W, C) -> (C, H, W)
    if arr.shape[0] != channels:
        raise BadImageError(f"{arr.shape} holds no {channels} bands (model.in_chans={channels})")
    if arr.shape[1] * arr.shape[2] > MAX_IMAGE_PIXELS:
        raise BadImageError(f"{arr.shape[2]}x{arr.shape[1]} pixels, more than {MAX_IMAGE_PIXELS}")
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if arr.dtype == np.bool_:
        return torch.from_numpy(np.ascontiguousarray(arr).astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(np.iinfo(arr.dtype).max)
        return torch.from_numpy((arr.astype(np.float32) / top).clip(0, None))
    if np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(np.nan_to_num(arr.astype(np.float32)))
    raise BadImageError(f"array images of dtype {arr.dtype} are not read")


def _read_array(source: str | Path | BinaryIO, suffix: str) -> np.ndarray:
    """The array of a ``.npy`` file (never unpickled) or a multi-page / multi-band TIFF."""
    if suffix == ".npy":
        return np.load(source, allow_pickle=False)
    import tifffile  # multi-band TIFFs (satellite bands, microscopy stains), which Pillow lacks

    try:
        return tifffile.imread(source)
    except (tifffile.TiffFileError, ValueError, KeyError) as err:
        raise BadImageError(f"not a readable TIFF ({err})") from None


def load_image(
    source: str | Path | BinaryIO, *, channels: int, suffix: str | None = None
) -> torch.Tensor:
    """Decode one image file (a path or a binary file object) to (C, H, W): uint8, or float32
    for arrays of other types.

    Only the raster formats of :data:`IMAGE_FORMATS` are tried, whatever the bytes claim to be
    (Pillow's EPS plugin, for one, would run Ghostscript). Images over
    :data:`MAX_IMAGE_PIXELS` are refused before decoding (decompression bombs). The EXIF
    orientation is applied; 16-bit images are scaled to 8 bits, not clipped; palette, CMYK,
    RGBA and the rest are converted explicitly to ``L`` (1 channel) or ``RGB`` (3 channels).
    Any other number of channels comes from a ``.npy`` array (read without pickle) or a
    multi-page / multi-band TIFF, band by band (:func:`_array_image`). ``suffix``: the file's
    extension when ``source`` is a file object. Undecodable or truncated data raises
    ``OSError``/``ValueError`` (:class:`BadImageError`).
    """
    if suffix is None:
        suffix = Path(source).suffix if isinstance(source, (str, Path)) else ""
    suffix = suffix.lower() if suffix.startswith(".") or not suffix else f".{suffix.lower()}"
    if suffix == ".npy" or (suffix in (".tif", ".tiff") and channels not in (1, 3)):
        return _array_image(_read_array(source, suffix), channels)
    if channels not in (1, 3):
        raise BadImageError(
            f"{channels}-channel images are read from .npy arrays or multi-band TIFFs, "
            f"not {suffix or 'this format'}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's palette-transparency and EXIF notices
        try:
            opened = Image.open(source, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            raise BadImageError(str(err)) from None
        with opened as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    f"{im.width}x{im.height} pixels, more than {MAX_IMAGE_PIXELS} "
                    "(a decompression bomb?)"
                )
            im.load()  # a truncated file fails here
            im = ImageOps.exif_transpose(im) or im
            im = _to_uint8(im)
            if im.mode in ("P", "PA", "LA") and channels == 3:
                im = im.convert("RGBA")
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)  # (C, H, W)
    return t.contiguous()


def _images_in(folder: Path, *, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class SyntheticImages(Dataset):
    """Deterministic images for tests: class-dependent stripes plus per-index noise.

    Image ``i`` depends only on ``(seed, i)``; 10 classes, so probes have something to find.
    """

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    num_classes = 10

    def __init__(self, size: int = 256, *, img_size: int = 32, channels: int = 3, seed: int = 0):
        self.size, self.img_size, self.channels, self.seed = size, img_size, channels, seed
        self.mean, self.std = (0.5,) * channels, (0.25,) * channels

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -self.size <= i < self.size:  # iteration (``for x in ds``) stops here
            raise IndexError(f"SyntheticImages index {i} out of range for size {self.size}")
        i %= self.size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        s = self.img_size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        angle = label * math.pi / self.num_classes  # stripe orientation encodes the class
        wave = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (1 + label % 3) / 2)
        img = 0.5 + 0.35 * wave + 0.1 * torch.randn(self.channels, s, s, generator=g)
        return (img.clamp(0, 1) * 255).to(torch.uint8), label
