"""Config trees of the dense commands: ``segment`` (semantic segmentation) and ``detect``.

Both start from a pretrained (or random) ViT described by the same ``model`` section as
fine-tuning (:class:`EncoderConfig`; ``model.img_size`` is the task's input size, and position
tables are interpolated to it), train with layer-wise lr decay and AdamW, and read one of three
data layouts: the Fashion-MNIST mosaic (real Fashion-MNIST items composed on a canvas, exact
masks and boxes, for CPUs), ADE20K's folder layout (segmentation) or COCO-format annotations
(detection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mimkit.config.core import check_choices, fail, positive
from mimkit.config.downstream import (
    EncoderConfig,
    FinetuneOptimConfig,
    resolve_encoder,
    validate_encoder,
)
from mimkit.config.pretrain import (
    RunConfig,
    TrainConfig,
    resolve_batch_and_lr,
    validate_optim,
    validate_run,
    validate_train,
)

__all__ = [
    "DenseDataConfig",
    "DenseEvalConfig",
    "DetectConfig",
    "DetectHeadConfig",
    "SegmentConfig",
    "SegmentHeadConfig",
]

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass
class DenseDataConfig:
    """Where the images and their dense labels come from.

    ``fashion_mosaic``: canvases composed from Fashion-MNIST items (``root`` = the IDX folder),
    generated on the fly from (mosaic_seed, split, index). ``ade20k`` (segment): ``root`` with
    ``images/<split>/`` and ``annotations/<split>/`` (label PNGs). ``coco`` (detect): ``root`` the
    training images and ``ann_file`` their COCO json; ``eval_root`` / ``eval_ann_file`` the
    evaluation ones.
    """

    name: str = "fashion_mosaic"  # fashion_mosaic | ade20k (segment) | coco (detect)
    root: str = FMNIST_ROOT
    train_split: str = "training"  # ade20k's split folders
    eval_split: str = "validation"
    ann_file: str | None = None  # coco
    eval_root: str | None = None  # coco: evaluation images (null: root)
    eval_ann_file: str | None = None  # coco
    max_samples: int | None = None  # use the first N training samples
    eval_max_samples: int | None = None
    # fashion_mosaic
    train_size: int = 4000  # canvases per epoch
    eval_size: int = 500
    canvas: int = 56
    items: list[int] = field(default_factory=lambda: [1, 3])  # items per canvas (min, max)
    item_scale: list[float] = field(default_factory=lambda: [0.5, 1.25])  # x 28 px
    mosaic_seed: int = 0
    # segmentation labels (ade20k)
    reduce_zero_label: bool = True  # ADE20K: 0 ("other") ignored, 1..150 -> 0..149
    ignore_index: int = 255
    num_classes: int | None = None  # ade20k: null -> classes.txt, else 150
    masks: bool = False  # coco: decode instance masks (Mask R-CNN)
    # augmentation and evaluation input
    mean: list[float] | None = None  # null: the pretraining's normalization
    std: list[float] | None = None
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random resize ratio (train)
    hflip: float = 0.5
    eval_short_side: int | None = None  # segment: resize evaluation images (keep aspect)
    num_workers: int = 0


@dataclass
class DenseEvalConfig:
    every_epochs: int = 1
    every_steps: int | None = None  # also evaluate every N optimizer steps (curves)
    batch_size: int = 16
    mode: Literal["whole", "slide"] = "whole"  # whole: resized to model.img_size; slide: windows
    stride: int | None = None  # slide: window stride (null: 2/3 of model.img_size)
    figure_images: int = 4


@dataclass
class SegmentHeadConfig:
    # upernet (BEiT's official code) | setr_pup (BEiT paper Sec. 3.2)
    kind: Literal["upernet", "setr_pup"] = "upernet"
    channels: int | None = None  # null: 512 (upernet) / 256 (setr_pup)
    out_indices: list[int] | None = None  # upernet: four blocks (null: (3, 5, 7, 11) at depth 12)
    aux_weight: float = 0.4  # weight of the auxiliary FCN head's loss; 0 disables it
    aux_channels: int = 256


@dataclass
class SegmentConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/segment"))
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    head: SegmentHeadConfig = field(default_factory=SegmentHeadConfig)
    optim: FinetuneOptimConfig = field(
        default_factory=lambda: FinetuneOptimConfig(
            layer_decay=0.65, schedule="linear", warmup_epochs=1.0, min_lr=0.0
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=16))
    eval: DenseEvalConfig = field(default_factory=DenseEvalConfig)

    def resolve(self) -> None:
        _resolve(self)

    def validate(self) -> None:
        _validate(self, "segment", ("fashion_mosaic", "ade20k"))
        h = self.head
        if h.channels is not None:
            positive("head.channels", h.channels)
        positive("head.aux_channels", h.aux_channels)
        if h.aux_weight < 0:
            fail("head.aux_weight", h.aux_weight, "must be >= 0 (0 disables the auxiliary head)")
        p = self.model.patch_size
        if h.kind == "setr_pup" and p & (p - 1):
            fail("head.kind", h.kind, f"setr_pup needs a power-of-two model.patch_size, got {p}")
        if h.out_indices is not None:
            depth = self.model.depth
            if h.kind == "upernet" and len(h.out_indices) != 4:
                fail("head.out_indices", h.out_indices, "four block indices for upernet")
            if h.kind == "setr_pup" and len(h.out_indices) != 1:
                fail("head.out_indices", h.out_indices, "one block index for setr_pup")
            if not all(-depth <= i < depth for i in h.out_indices):
                fail("head.out_indices", h.out_indices, f"block indices in [-{depth}, {depth})")
        e = self.eval
        if e.stride is not None and not 0 < e.stride <= self.model.img_size:
            fail("eval.stride", e.stride, f"in (0, model.img_size={self.model.img_size}]")


@dataclass
class DetectHeadConfig:
    out_channels: int = 256  # the feature pyramid's width
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # ViTDet
    out_indices: list[int] | None = None  # null: the last block only (ViTDet); one per scale
    anchor_sizes: list[float] | None = None  # one per level incl. 'pool'; null: 8 x stride
    representation_size: int = 1024  # the box head's MLP width
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    box_batch_size_per_image: int = 512  # proposals sampled per image for the box head's loss
    rpn_pre_nms_top_n: list[int] = field(default_factory=lambda: [2000, 1000])  # train, test
    rpn_post_nms_top_n: list[int] = field(default_factory=lambda: [2000, 1000])  # train, test
    masks: bool | None = None  # Mask R-CNN; null: when the data has masks (mosaic, coco+masks)
    detections_per_img: int = 100
    score_threshold: float = 0.5  # boxes drawn in figures/detection.png


@dataclass
class DetectConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/detect"))
    data: DenseDataConfig = field(default_factory=lambda: DenseDataConfig(scale=[1.0, 1.0]))
    model: EncoderConfig = field(default_factory=EncoderConfig)
    head: DetectHeadConfig = field(default_factory=DetectHeadConfig)
    optim: FinetuneOptimConfig = field(
        default_factory=lambda: FinetuneOptimConfig(
            layer_decay=0.7, weight_decay=0.1, warmup_epochs=1.0, min_lr=0.0
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=8))
    eval: DenseEvalConfig = field(default_factory=DenseEvalConfig)

    def resolve(self) -> None:
        _resolve(self)
        if self.head.masks is None:
            self.head.masks = self.data.name == "fashion_mosaic" or self.data.masks

    def validate(self) -> None:
        _validate(self, "detect", ("fashion_mosaic", "coco"))
        h = self.head
        positive("head.out_channels", h.out_channels)
        positive("head.representation_size", h.representation_size)
        positive("head.detections_per_img", h.detections_per_img)
        positive("head.rpn_batch_size_per_image", h.rpn_batch_size_per_image)
        positive("head.box_batch_size_per_image", h.box_batch_size_per_image)
        for key in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            v = getattr(h, key)
            if len(v) != 2 or not all(isinstance(n, int) and n > 0 for n in v):
                fail(f"head.{key}", v, "two positive counts [training, testing]")
        if not h.scales or not all(s in (4.0, 2.0, 1.0, 0.5) for s in h.scales):
            fail("head.scales", h.scales, "a list of scales from [4.0, 2.0, 1.0, 0.5]")
        if any(a != 2 * b for a, b in zip(h.scales[:-1], h.scales[1:], strict=True)):
            fail("head.scales", h.scales, "decreasing by halves, e.g. [4.0, 2.0, 1.0, 0.5]")
        p = self.model.patch_size
        if p & (p - 1) or p < max(h.scales):
            fail(
                "model.patch_size",
                p,
                f"a power of two >= {max(h.scales):g} (the pyramid's strides are patch / scale)",
            )
        if h.out_indices is not None:
            depth = self.model.depth
            if len(h.out_indices) != len(h.scales):
                n = len(h.scales)
                fail("head.out_indices", h.out_indices, f"one block index per scale ({n})")
            if not all(-depth <= i < depth for i in h.out_indices):
                fail("head.out_indices", h.out_indices, f"block indices in [-{depth}, {depth})")
        if h.anchor_sizes is not None:
            if len(h.anchor_sizes) != len(h.scales) + 1:
                fail(
                    "head.anchor_sizes",
                    h.anchor_sizes,
                    f"one size per pyramid level and one for 'pool' ({len(h.scales) + 1})",
                )
            for s in h.anchor_sizes:
                positive("head.anchor_sizes", s)
        if not 0 <= h.score_threshold <= 1:
            fail("head.score_threshold", h.score_threshold, "must be in [0, 1]")
        if h.masks and self.data.name == "coco" and not self.data.masks:
            fail("head.masks", h.masks, "Mask R-CNN needs data.masks=true (decoded COCO masks)")


def _resolve(cfg: SegmentConfig | DetectConfig) -> None:
    resolve_encoder(cfg.model)
    resolve_batch_and_lr(cfg.optim, cfg.train)


def _validate(cfg: SegmentConfig | DetectConfig, command: str, names: tuple[str, ...]) -> None:
    check_choices(cfg)
    validate_encoder(cfg.model)
    validate_optim(cfg.optim, cfg.train)
    validate_train(cfg.train)
    validate_run(cfg.run)
    if not 0 < cfg.optim.layer_decay <= 1:
        fail("optim.layer_decay", cfg.optim.layer_decay, "must be in (0, 1]")
    if not cfg.optim.head_lr_mult > 0:
        fail("optim.head_lr_mult", cfg.optim.head_lr_mult, "must be > 0")
    d = cfg.data
    if d.name not in names:
        fail("data.name", d.name, f"one of {list(names)} for mimkit {command}")
    for key in ("max_samples", "eval_max_samples", "eval_short_side", "num_classes"):
        if getattr(d, key) is not None:
            positive(f"data.{key}", getattr(d, key))
    for key in ("train_size", "eval_size", "canvas"):
        positive(f"data.{key}", getattr(d, key))
    if d.num_workers < 0:
        fail("data.num_workers", d.num_workers, "must be >= 0")
    if len(d.scale) != 2 or not 0 < d.scale[0] <= d.scale[1]:
        fail("data.scale", d.scale, "two ratios 0 < min <= max")
    if not 0 <= d.hflip <= 1:
        fail("data.hflip", d.hflip, "a probability in [0, 1]")
    if not 0 <= d.ignore_index <= 255:
        fail("data.ignore_index", d.ignore_index, "an 8-bit label value in [0, 255]")
    for key in ("mean", "std"):
        v = getattr(d, key)
        if v is not None and len(v) != cfg.model.in_chans:
            fail(f"data.{key}", v, f"one value per channel (model.in_chans={cfg.model.in_chans})")
    if d.name == "fashion_mosaic":
        if d.ignore_index < 11:
            fail("data.ignore_index", d.ignore_index, "not a mosaic class (0..10): use 255")
        if cfg.model.in_chans != 1:
            fail("model.in_chans", cfg.model.in_chans, "1 for fashion_mosaic (grayscale)")
        if len(d.items) != 2 or not 1 <= d.items[0] <= d.items[1]:
            fail("data.items", d.items, "two counts 1 <= min <= max")
        if len(d.item_scale) != 2 or not 0 < d.item_scale[0] <= d.item_scale[1]:
            fail("data.item_scale", d.item_scale, "two scales 0 < min <= max")
        if d.canvas < 28 * d.item_scale[0]:
            fail("data.canvas", d.canvas, f"must hold an item of {28 * d.item_scale[0]:g} px")
        _folder("data.root", d.root)
    elif d.name == "ade20k":
        for split in (d.train_split, d.eval_split):
            _folder("data.root", Path(d.root) / "images" / split, hint="ADE20K layout")
            _folder("data.root", Path(d.root) / "annotations" / split, hint="ADE20K layout")
    else:  # coco
        _folder("data.root", d.root)
        _folder("data.eval_root", d.eval_root or d.root)
        for key in ("ann_file", "eval_ann_file"):
            if getattr(d, key) is None or not Path(getattr(d, key)).is_file():
                fail(f"data.{key}", getattr(d, key), "a COCO-format annotation json file")
    positive("eval.every_epochs", cfg.eval.every_epochs)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.figure_images", cfg.eval.figure_images)
    if cfg.eval.every_steps is not None:
        positive("eval.every_steps", cfg.eval.every_steps)


def _folder(key: str, path: str | Path | None, *, hint: str = "") -> None:
    if path is None or not Path(path).is_dir():
        fail(key, str(path), "an existing folder" + (f" ({hint})" if hint else ""))
