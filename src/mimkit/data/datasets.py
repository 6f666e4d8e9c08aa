"""Datasets: Fashion-MNIST from IDX files, image folders, and a deterministic synthetic set.

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor (C, H, W) and ``label`` an
int (-1 when unlabeled). Transforms are applied by :class:`mimkit.data.views.AugmentedView`.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# the Pillow decoders of those suffixes (camera MPO files open through JPEG)
IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")


class ImageFolder(Dataset):
    """Images in a flat folder (unlabeled, label -1) or in class subfolders (labels by sorted name).

    Every image is converted explicitly to ``L`` (1 channel) or ``RGB`` (3 channels).
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet statistics, the field's default
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __init__(self, root: str | Path, *, channels: int = 3, max_samples: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = tuple(p.name for p in subdirs)
        samples: list[tuple[Path, int]] = [(p, -1) for p in _images_in(root, recursive=False)]
        for label, sub in enumerate(subdirs):
            samples += [(p, label) for p in _images_in(sub, recursive=True)]
        if not samples:
            raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.samples = samples[:max_samples] if max_samples else samples
        self.channels = channels
        if channels == 1:
            self.mean, self.std = (0.5,), (0.5,)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, channels=self.channels), label


def load_image(source: str | Path | BinaryIO, *, channels: int) -> torch.Tensor:
    """Decode one image file (a path or a binary file object) to uint8 (C, H, W).

    Only the raster formats of :data:`IMAGE_FORMATS` are tried, whatever the bytes claim to be
    (Pillow's EPS plugin, for one, would run Ghostscript). The image is converted explicitly to
    ``L`` (1 channel) or ``RGB`` (3 channels). Undecodable or truncated data raises an
    ``OSError``/``ValueError`` from Pillow.
    """
    with Image.open(source, formats=IMAGE_FORMATS) as im:
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
        self.mean, self.std = self.mean[:channels], self.std[:channels]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        s = self.img_size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        angle = label * math.pi / self.num_classes  # stripe orientation encodes the class
        wave = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (1 + label % 3) / 2)
        img = 0.5 + 0.35 * wave + 0.1 * torch.randn(self.channels, s, s, generator=g)
        return (img.clamp(0, 1) * 255).to(torch.uint8), label
