"""Joint transforms for dense data: image and target move together.

Inputs are the datasets' ``(image, target)`` pairs (:mod:`mimkit.data.dense`): ``image`` a uint8
tensor (C, H, W), ``target`` a dict (``semantic`` (H, W) for segmentation; ``boxes`` (K, 4) xyxy,
``labels`` (K,), optional ``masks`` (K, H, W) for detection; ``image_id``).

:class:`SegmentTransform` and :class:`DetectTransform` draw all randomness from an explicit
generator; :class:`DenseView` seeds that generator with (seed, epoch, index), as
:class:`mimkit.data.views.AugmentedView` does for classification, so a resumed run or any number
of workers sees the same samples. :func:`segmentation_collate` stacks a batch;
:func:`detection_collate` keeps lists, as torchvision's detectors take them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mimkit.data.views import sample_seed

__all__ = [
    "DenseView",
    "DetectTransform",
    "SegmentTransform",
    "detection_collate",
    "segmentation_collate",
]


# ---------------------------------------------------------------------------------------------
# joint transforms


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=generator).item()


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform in [0, high]."""
    return int(torch.randint(0, high + 1, (1,), generator=generator))


def _resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """float (C, H, W) -> float (C, h, w), antialiased, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == size:
        return x
    x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0, 1)


def _resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(K, H, W) labels or masks -> (K, h, w), nearest (pixel centres, as the bilinear image)."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[0] == 0:
        return x.new_zeros((0, *size))
    if x.dtype == torch.uint8:
        return F.interpolate(x[None], size=size, mode="nearest-exact")[0]
    # float32 holds integer labels exactly (< 2**24)
    return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(x.dtype)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


class SegmentTransform:
    """Segmentation augmentation (the geometric part of mmsegmentation's ADE20K pipeline; its
    photometric distortion and ``cat_max_ratio`` crop retries are not implemented).

    Train: rescale by ``r ~ U(scale)`` keeping the aspect, so the image fits ``4 size x size``
    times r (mmsegmentation's ``RandomResize(scale=(2048, 512))`` for size 512: the short side
    becomes ``size * r``), a random ``size x size`` crop (padding the normalized image with 0
    and the label with ``ignore_index`` at the bottom/right when smaller), a horizontal flip;
    image bilinear (antialiased), label nearest. Eval: no randomness; the image optionally
    resized so its short side is ``eval_short_side``, the label left at its original resolution
    (metrics are computed there; inference upsamples logits to it). Output: normalized float32
    image, ``target`` with ``semantic`` (int64) and ``image_id`` only (other keys would not match
    the new geometry).
    """

    def __init__(
        self,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        scale: Sequence[float] = (0.5, 2.0),
        hflip: float = 0.5,
        ignore_index: int = 255,
        eval_short_side: int | None = None,
    ) -> None:
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        self.size, self.mean, self.std, self.train = size, tuple(mean), tuple(std), train
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip, self.ignore_index = hflip, ignore_index
        self.eval_short_side = eval_short_side

    def __call__(
        self, image: Tensor, target: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """uint8 (C, H, W), {"semantic": (H, W)} -> float32 (C, S, S), {"semantic": (S, S)}."""
        x = image.to(torch.float32) / 255  # (C, H, W)
        label = target["semantic"].to(torch.int64)  # (H, W)
        h, w = x.shape[-2:]
        if self.train:
            if generator is None:
                raise ValueError("SegmentTransform(train=True) needs a generator")
            s = self.size
            # mmsegmentation's RandomResize(scale=(4S, S), ratio_range, keep_ratio): the image
            # fits 4S x S times r, i.e. the short side is S * r unless the image is very long
            factor = _uniform(*self.scale, generator) * min(s / min(h, w), 4 * s / max(h, w))
            new = (max(1, round(h * factor)), max(1, round(w * factor)))
            x = _resize_bilinear(x, new)
            label = _resize_nearest(label[None], new)[0]
            top = _randint(max(new[0] - s, 0), generator)
            left = _randint(max(new[1] - s, 0), generator)
            x, label = x[:, top : top + s, left : left + s], label[top : top + s, left : left + s]
            if torch.rand(1, generator=generator).item() < self.hflip:
                x, label = x.flip(-1), label.flip(-1)
            # padded after normalization, with 0 (the mean), as sliding-window inference pads
            pad = (0, s - x.shape[-1], 0, s - x.shape[-2])  # (left, right, top, bottom)
            x = F.pad(_normalize(x, self.mean, self.std), pad, value=0.0)  # (C, S, S)
            label = F.pad(label, pad, value=self.ignore_index)  # (S, S)
            out = {"semantic": label.contiguous(), "image_id": target.get("image_id")}
            return x.contiguous(), out
        if self.eval_short_side is not None:
            factor = self.eval_short_side / min(h, w)
            x = _resize_bilinear(x, (max(1, round(h * factor)), max(1, round(w * factor))))
        out = {"semantic": label.contiguous(), "image_id": target.get("image_id")}
        return _normalize(x, self.mean, self.std).contiguous(), out


class DetectTransform:
    """ViTDet-style fixed square input (large-scale jitter when ``scale`` is wide).

    Resize so the longer side is ``size * r`` (``r ~ U(scale)`` when train, 1 at eval); when
    train and the result exceeds ``size``, a random crop back to ``size x size`` (boxes clipped,
    boxes under 1 px dropped with their labels and masks) and a horizontal flip; then pad
    bottom/right with 0 to ``size x size``. Output: float32 image in [0, 1], NOT normalized
    (torchvision's detectors normalize); target ``boxes``, ``labels``, ``masks`` (if given,
    nearest-resized and padded), ``image_id`` and ``scale`` (the resize factor: original
    coordinates = boxes / scale, before any crop). ``iscrowd`` and ``area`` are kept per object;
    other keys are dropped.
    """

    def __init__(
        self,
        *,
        size: int,
        train: bool,
        scale: Sequence[float] = (1.0, 1.0),
        hflip: float = 0.5,
    ) -> None:
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        self.size, self.train, self.hflip = size, train, hflip
        self.scale = (float(scale[0]), float(scale[1]))

    def __call__(
        self, image: Tensor, target: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """uint8 (C, H, W), {"boxes": (K, 4), ...} -> float32 (C, S, S), transformed target."""
        if self.train and generator is None:
            raise ValueError("DetectTransform(train=True) needs a generator")
        s = self.size
        x = image.to(torch.float32) / 255  # (C, H, W)
        h, w = x.shape[-2:]
        boxes = target["boxes"].to(torch.float32).reshape(-1, 4)  # (K, 4) xyxy
        labels = target["labels"].to(torch.int64)  # (K,)
        masks = target.get("masks")  # (K, H, W) uint8 or None
        # per-object values that do not change with the geometry (COCO's crowd flag and area)
        extra = {k: target[k] for k in ("iscrowd", "area") if k in target}
        r = _uniform(*self.scale, generator) if self.train else 1.0
        factor = r * s / max(h, w)
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        x = _resize_bilinear(x, (nh, nw))
        # per-axis ratios match the rounded pixel grid exactly
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if masks is not None:
            masks = _resize_nearest(masks.to(torch.uint8), (nh, nw))
        if self.train:
            top, left = _randint(max(nh - s, 0), generator), _randint(max(nw - s, 0), generator)
            if nh > s or nw > s:
                x = x[:, top : top + s, left : left + s]
                ch, cw = x.shape[-2:]
                boxes = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
                keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
                boxes, labels = boxes[keep], labels[keep]
                extra = {k: v[keep] for k, v in extra.items()}
                if masks is not None:
                    masks = masks[keep][:, top : top + s, left : left + s]
            if torch.rand(1, generator=generator).item() < self.hflip:
                cw = x.shape[-1]
                x = x.flip(-1)
                boxes = torch.stack(
                    [cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1
                )
                if masks is not None:
                    masks = masks.flip(-1)
        pad = (0, s - x.shape[-1], 0, s - x.shape[-2])  # (left, right, top, bottom)
        out: dict[str, Any] = {"boxes": boxes.contiguous(), "labels": labels, **extra}
        if masks is not None:
            out["masks"] = F.pad(masks, pad, value=0).contiguous()  # (K, S, S)
        out["image_id"] = target.get("image_id")
        out["scale"] = factor
        return F.pad(x, pad, value=0.0).contiguous(), out


# ---------------------------------------------------------------------------------------------
# view and collation


class DenseView(Dataset):
    """``transform(image, target, generator)``, the generator seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable, *, seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        # explicit: indexing past the end is a repeated augmentation, never an IndexError
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.base[i % len(self.base)]  # i >= len: a repeated augmentation
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        return self.transform(image, target, g)


def detection_collate(
    batch: Sequence[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Lists of images and targets, as torchvision's detection models take them."""
    return [image for image, _ in batch], [target for _, target in batch]


def segmentation_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, Tensor]:
    """Stack images (B, C, H, W) and semantic maps (B, H, W); shapes must agree."""
    images = [image for image, _ in batch]
    labels = [target["semantic"] for _, target in batch]
    shapes = {(tuple(im.shape), tuple(lab.shape)) for im, lab in zip(images, labels, strict=True)}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot stack segmentation samples of different sizes {sorted(shapes)}: use batch "
            "size 1 to evaluate at each label's own resolution (eval_short_side makes images "
            "stackable only when all of them, and their labels, share one size)"
        )
    return torch.stack(images), torch.stack(labels)
