"""Dense data: per-pixel labels and instances for semantic segmentation and detection.

Three sources, one target convention:

- :class:`FashionMosaic` composes real Fashion-MNIST items onto a canvas at random scale and
  position, so exact per-pixel labels, instance masks and boxes come for free. It is the embedded
  dense task: the only real data here is Fashion-MNIST, and a mosaic makes a segmentation or
  detection result mean something without any download.
- :class:`SegmentationFolder` reads ADE20K's folder layout (images + 8-bit label PNGs), the
  layout of the BEiT/MAE segmentation results, for users' own data.
- :class:`CocoDetection` reads COCO-format instance annotations (boxes, optional masks).

Every dataset yields ``(image, target)``: ``image`` a uint8 tensor (C, H, W) and ``target`` a dict
(``semantic`` (H, W) int64 for segmentation; ``boxes`` (K, 4) float32 xyxy in pixels, ``labels``
(K,) int64 with 0 = background, ``masks`` (K, H, W) uint8 for detection; ``image_id``).

Joint transforms, the seeded view and the collate functions are in
:mod:`mimkit.data.dense_transforms`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mimkit.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    BadImageError,
    FashionMNIST,
    load_image,
)

__all__ = [
    "ADE20K_NUM_CLASSES",
    "MOSAIC_CLASSES",
    "CocoDetection",
    "FashionMosaic",
    "SegmentationFolder",
]

MOSAIC_CLASSES = ("background", *FASHION_MNIST_CLASSES)
ADE20K_NUM_CLASSES = 150
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_SPLIT_IDS = {"train": 0, "test": 1}
_PLACEMENT_TRIES = 50  # rejection-sampling budget for one item's position
_MIN_ITEM_SIDE = 8
_SEG_SUFFIXES = (".jpg", ".jpeg", ".png")


def _mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))


def _load_image(path: Path, channels: int) -> Tensor:
    """An image file -> uint8 (C, H, W) through mimkit's decoder (raster formats only, the
    decompression-bomb limit), L or RGB. The EXIF orientation is applied, as mmseg/mmdet
    (OpenCV's decoder) and detectron2 do: COCO's annotations refer to the oriented image. A
    file that cannot be decoded raises :class:`BadImageError` naming it."""
    try:
        return load_image(path, channels=channels)
    except (OSError, ValueError) as err:
        raise BadImageError(f"{path}: cannot decode ({err})") from None


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST mosaics


class FashionMosaic(Dataset):
    """Canvases of non-overlapping Fashion-MNIST items with exact labels, masks and boxes.

    Canvas ``i`` is a pure function of (seed, split, i): it draws ``U{items}`` items, each a
    random source image resized (bilinear, antialiased) to a square of side
    ``round(28 * U(scale))`` clamped to [8, canvas], placed at a random position fully inside the
    canvas and not overlapping the items already placed (50 tries, then the item is given up; the
    first item always fits). An item's foreground is its resized pixels above
    ``threshold * 255``; it sets the semantic map to ``class + 1`` (0 is background), the
    instance mask, and the box (tight, xyxy, x2/y2 exclusive). A blank item is skipped, so K can
    fall short of ``items[0]``. Train canvases use the train split, test canvases the test split.
    """

    classes = MOSAIC_CLASSES
    num_classes = len(MOSAIC_CLASSES)  # 11, background included
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    ignore_index = 255
    channels = 1

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        size: int = 2000,
        canvas: int = 56,
        items: Sequence[int] = (1, 3),
        scale: Sequence[float] = (0.5, 1.25),
        threshold: float = 0.1,
        seed: int = 0,
        source_max_samples: int | None = None,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if canvas < _MIN_ITEM_SIDE:
            raise ValueError(f"canvas must be >= {_MIN_ITEM_SIDE}, got {canvas}")
        if len(items) != 2 or not 1 <= items[0] <= items[1]:
            raise ValueError(f"items must be (min, max) with 1 <= min <= max, got {tuple(items)}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.source = FashionMNIST(root, split, max_samples=source_max_samples)
        if len(self.source) == 0:
            raise ValueError(f"{root}: the Fashion-MNIST {split} split is empty")
        self.split, self.size, self.canvas, self.seed = split, size, canvas, seed
        self.items = (int(items[0]), int(items[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.threshold = threshold

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        if not 0 <= i < self.size:
            raise IndexError(f"canvas index {i} out of range for {self.size} canvases")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])
        c = self.canvas
        image = torch.zeros(c, c, dtype=torch.uint8)
        semantic = torch.zeros(c, c, dtype=torch.int64)
        squares: list[tuple[int, int, int]] = []  # (top, left, side) of placed items
        boxes: list[list[float]] = []
        labels: list[int] = []
        masks: list[Tensor] = []
        for _ in range(int(rng.integers(self.items[0], self.items[1] + 1))):
            src = int(rng.integers(len(self.source)))
            item, label = self.source[src]  # (1, 28, 28) uint8
            side = min(max(round(item.shape[-1] * rng.uniform(*self.scale)), _MIN_ITEM_SIDE), c)
            pos = None
            for _ in range(_PLACEMENT_TRIES):
                top, left = (int(v) for v in rng.integers(0, c - side + 1, size=2))
                if not any(_overlap((top, left, side), sq) for sq in squares):
                    pos = (top, left)
                    break
            if pos is None:
                continue
            pixels = _resize_item(item, side)  # (side, side) uint8
            fg = pixels > self.threshold * 255  # (side, side) bool
            if not fg.any():
                continue
            top, left = pos
            squares.append((top, left, side))
            window = (slice(top, top + side), slice(left, left + side))
            image[window] = torch.maximum(image[window], pixels)
            semantic[window][fg] = label + 1
            mask = torch.zeros(c, c, dtype=torch.uint8)
            mask[window] = fg.to(torch.uint8)
            ys, xs = torch.nonzero(fg, as_tuple=True)
            boxes.append(
                [left + xs.min().item(), top + ys.min().item(),
                 left + xs.max().item() + 1, top + ys.max().item() + 1]
            )  # fmt: skip
            labels.append(label + 1)
            masks.append(mask)
        target = {
            "semantic": semantic,  # (H, W) int64
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (K, 4)
            "labels": torch.tensor(labels, dtype=torch.int64),  # (K,)
            "masks": torch.stack(masks) if masks else torch.zeros(0, c, c, dtype=torch.uint8),
            "image_id": i,
        }
        return image.unsqueeze(0), target


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether squares (top, left, side) a and b share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def _resize_item(item: Tensor, side: int) -> Tensor:
    """uint8 (1, h, w) -> uint8 (side, side), bilinear with antialiasing."""
    x = item.to(torch.float32)[None]  # (1, 1, h, w)
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# ADE20K-style segmentation folders


class SegmentationFolder(Dataset):
    """``root/images/<split>/*.{jpg,jpeg,png}`` with ``root/annotations/<split>/<stem>.png``.

    ADE20K's layout (the BEiT/MAE segmentation benchmark); label PNGs are 8-bit (L or P mode).
    ``reduce_zero_label`` follows mmsegmentation's ADE20K convention: label 0 ("other") becomes
    ``ignore_index`` and every other label is decremented, so ADE20K's 150 classes are 0..149. A
    file value of 255 (the conventional void) always becomes ``ignore_index``.

    ``num_classes``: as given, else the lines of ``root/classes.txt`` (one name per line, in label
    order after reduction), else ADE20K's 150 when ``reduce_zero_label``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        *,
        reduce_zero_label: bool = True,
        ignore_index: int = 255,
        channels: int = 3,
        max_samples: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        root = Path(root)
        self.mean, self.std = _mean_std(channels)
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise ValueError(
                    f"{d}: folder not found (expected ADE20K's layout root/images/<split> and "
                    f"root/annotations/<split>, split={split!r})"
                )
        images = sorted(
            p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in _SEG_SUFFIXES
        )
        if not images:
            raise ValueError(f"{img_dir}: no images found (looked for {', '.join(_SEG_SUFFIXES)})")
        if max_samples is not None:
            images = images[:max_samples]
        stems: dict[str, Path] = {}
        self.samples: list[tuple[Path, Path]] = []  # (image, label PNG)
        for path in images:
            if path.stem in stems:
                raise ValueError(f"{path} and {stems[path.stem]} share the annotation stem")
            stems[path.stem] = path
            ann = ann_dir / f"{path.stem}.png"
            if not ann.is_file():
                raise ValueError(f"{path}: annotation {ann} not found")
            self.samples.append((path, ann))

        names_file = root / "classes.txt"
        names = None
        if names_file.is_file():
            lines = names_file.read_text(encoding="utf-8").splitlines()
            names = tuple(line.strip() for line in lines if line.strip())
            if num_classes is not None and num_classes != len(names):
                raise ValueError(
                    f"{names_file}: lists {len(names)} classes but num_classes={num_classes}"
                )
            num_classes = len(names)
        elif num_classes is None:
            if not reduce_zero_label:
                raise ValueError(
                    f"{root}: give num_classes (or write root/classes.txt, one name per line); "
                    "ADE20K's 150 is only assumed with reduce_zero_label"
                )
            num_classes = ADE20K_NUM_CLASSES
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} collides with a class in 0..{num_classes - 1}"
            )
        self.num_classes = num_classes
        self.classes = names if names is not None else tuple(str(k) for k in range(num_classes))
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        img_path, ann_path = self.samples[i]
        image = _load_image(img_path, self.channels)  # (C, H, W) uint8
        try:  # label maps: PNG only; a wrong mode's ValueError is not an OSError
            with Image.open(ann_path, formats=["PNG"]) as im:
                if im.mode not in ("L", "P"):
                    raise ValueError(
                        f"{ann_path}: expected an 8-bit label PNG (L or P), got {im.mode}"
                    )
                raw = torch.from_numpy(np.asarray(im, dtype=np.uint8).astype(np.int64))  # (H, W)
        except OSError as err:
            raise BadImageError(f"{ann_path}: cannot decode the label PNG ({err})") from None
        if tuple(raw.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"{ann_path}: label size {tuple(raw.shape)} != image size "
                f"{tuple(image.shape[-2:])} of {img_path}"
            )
        semantic = raw - 1 if self.reduce_zero_label else raw.clone()
        if self.reduce_zero_label:
            semantic[raw == 0] = self.ignore_index
        semantic[raw == 255] = self.ignore_index
        bad = (semantic >= self.num_classes) & (semantic != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"{ann_path}: label values {sorted(set(semantic[bad].tolist()))[:8]} are outside "
                f"the {self.num_classes} classes (reduce_zero_label={self.reduce_zero_label}; "
                "set data.num_classes or fix the annotation)"
            )
        return image, {"semantic": semantic, "image_id": i}


# ---------------------------------------------------------------------------------------------
# COCO-format detection


class CocoDetection(Dataset):
    """COCO instance annotations: ``image_root/<file_name>`` + a json with images/annotations.

    Category ids become contiguous labels 1..K in ascending id order (0 is background,
    torchvision's convention); ``classes[label]`` is its name (``classes[0] == "background"``) and
    ``cat_ids[label]`` the original id (``cat_ids[0] == -1``).
    Boxes ``[x, y, w, h]`` become xyxy clipped to the image; boxes 1 px wide/high or less after
    clipping are dropped (a simple rule: they carry no learnable extent), and crowd annotations
    too when ``skip_crowd`` (training; evaluation keeps them: COCO's evaluation ignores detections
    on crowd regions). Targets carry ``iscrowd`` and the annotation's ``area`` (original pixels,
    COCO's size buckets). Images without annotations are kept (boxes (0, 4)). With
    ``masks=True`` segmentations (polygons, uncompressed or compressed RLE) are decoded with
    pycocotools into ``masks`` (K, H, W) uint8.
    """

    def __init__(
        self,
        image_root: str | Path,
        ann_file: str | Path,
        *,
        channels: int = 3,
        masks: bool = False,
        max_samples: int | None = None,
        skip_crowd: bool = True,
    ) -> None:
        image_root, ann_file = Path(image_root), Path(ann_file)
        self.mean, self.std = _mean_std(channels)
        if not ann_file.is_file():
            raise ValueError(f"COCO annotation file not found: {ann_file}")
        try:
            data = json.loads(ann_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{ann_file}: not valid JSON ({e})") from e
        keys = ("images", "annotations", "categories")
        missing = [k for k in keys if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(
                f"{ann_file}: not a COCO instances file (missing {', '.join(map(repr, missing))})"
            )
        try:
            cats = sorted(data["categories"], key=lambda c: int(c["id"]))
            self.cat_ids: list[int] = [-1, *(int(c["id"]) for c in cats)]
            # label 0 is the background, as in torchvision's detectors: names index by label
            self.classes = ("background", *(str(c.get("name", c["id"])) for c in cats))
            label_of = {cid: k for k, cid in enumerate(self.cat_ids) if k > 0}
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            per_image: dict[int, list[dict]] = {}
            for im in images:
                if int(im["id"]) in per_image:
                    raise ValueError(f"{ann_file}: duplicate image id {im['id']}")
                per_image[int(im["id"])] = []
            for a in data["annotations"]:
                where = f"{ann_file}: annotation {a.get('id', '?')}"
                if int(a["image_id"]) not in per_image:
                    raise ValueError(f"{where}: unknown image_id {a['image_id']}")
                if int(a["category_id"]) not in label_of:
                    raise ValueError(f"{where}: unknown category_id {a['category_id']}")
                if len(a["bbox"]) != 4:
                    raise ValueError(f"{where}: bbox must be [x, y, w, h], got {a['bbox']}")
                if skip_crowd and a.get("iscrowd", 0):
                    continue
                per_image[int(a["image_id"])].append(a)
            if max_samples is not None:
                images = images[:max_samples]
            # (path, image entry, annotations)
            self.samples: list[tuple[Path, dict, list[dict]]] = [
                (image_root / im["file_name"], im, per_image[int(im["id"])]) for im in images
            ]
        except (AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"{ann_file}: malformed COCO entry ({type(e).__name__}: {e})") from e
        for path, im, _ in self.samples:
            if not path.is_file():
                raise ValueError(
                    f"{path}: image file not found (image id {im['id']} in {ann_file})"
                )
        self.label_of, self.ann_file = label_of, ann_file
        self.num_classes = len(cats) + 1  # background included
        self.channels, self.masks = channels, masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        path, info, anns = self.samples[i]
        image = _load_image(path, self.channels)  # (C, H, W) uint8
        h, w = image.shape[-2:]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(
                f"{path}: image is {h}x{w} but {self.ann_file} says "
                f"{info.get('height')}x{info.get('width')}"
            )
        boxes, labels, masks, crowd, areas = [], [], [], [], []
        for a in anns:
            x, y, bw, bh = (float(v) for v in a["bbox"])
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x2 - x1 <= 1 or y2 - y1 <= 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_of[int(a["category_id"])])
            crowd.append(int(bool(a.get("iscrowd", 0))))
            areas.append(float(a.get("area", bw * bh)))  # COCO's size buckets use this area
            if self.masks:
                where = f"{self.ann_file}: annotation {a.get('id', '?')}"
                masks.append(_decode_segmentation(a.get("segmentation"), h, w, where))
        target: dict[str, Any] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (K, 4) xyxy
            "labels": torch.tensor(labels, dtype=torch.int64),  # (K,)
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),  # (K,) 1: a crowd region
            "area": torch.tensor(areas, dtype=torch.float32),  # (K,) in original pixels
        }
        if self.masks:
            target["masks"] = (  # (K, H, W) uint8
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros(0, h, w, dtype=torch.uint8)
            )
        target["image_id"] = int(info["id"])
        return image, target


def _decode_segmentation(seg: Any, h: int, w: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 (h, w) mask."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("decoding COCO masks needs pycocotools: pip install pycocotools") from e
    if isinstance(seg, list):
        polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6]  # >= 3 points
        if not polygons:
            raise ValueError(f"{where}: no polygon with 3 or more points (use masks=False?)")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [h, w]:
            raise ValueError(f"{where}: RLE size {seg['size']} != image size {[h, w]}")
        # uncompressed RLE has a list of counts; compressed RLE a string, decoded as is
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    else:
        raise ValueError(
            f"{where}: segmentation must be a list of polygons or an RLE dict with 'counts' and "
            f"'size', got {type(seg).__name__} (use masks=False for box-only annotations)"
        )
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
