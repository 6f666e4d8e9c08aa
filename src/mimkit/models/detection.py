"""Object detection on a plain ViT: ViTDet's simple feature pyramid under torchvision's R-CNNs.

Shapes: B batch, C image channels, H x W image, p patch size, h x w = H/p x W/p patch grid,
D encoder width, E neck channels.

:class:`SimpleFeaturePyramid` (Li et al. 2022) turns one or more block maps
(:mod:`mimkit.models.features`) into a multi-scale pyramid that serves as the backbone of a
torchvision Faster / Mask R-CNN; :class:`Detector` wraps that model with what the optimizers need,
and :func:`build_detector` assembles it. The wrappers use only the encoder's declared interface.

Block outputs are taken before the encoder's final norm, as ViTDet does.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from mimkit.models.features import _block_maps, _check_indices, _check_scales, _log2_scale

__all__ = ["Detector", "SimpleFeaturePyramid", "build_detector"]


# ---- detection: ViTDet's simple feature pyramid as a torchvision backbone ----


def _vitdet_stage(dim: int, scale: float, out_channels: int) -> nn.Sequential:
    """ViTDet's per-scale stage (detectron2 ``SimpleFeaturePyramid``, norm="LN"): 2^k x up =
    k deconvs halving the width (LayerNorm2d + GELU between), 2^-k x down = max-pool; then
    conv1x1-LN-conv3x3-LN to ``out_channels`` (convs without bias)."""
    k = _log2_scale(scale, "scales")
    layers: list[nn.Module] = []
    if k < 0:
        layers.append(nn.MaxPool2d(2**-k, ceil_mode=True))  # ceil: odd grids keep their border
    for j in range(max(k, 0)):
        if dim < 2:
            raise ValueError(f"scale {scale} halves the width {2**j * dim} below 1")
        if j:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim // 2, 2, 2))
        dim //= 2
    layers += [
        nn.Conv2d(dim, out_channels, 1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    ]
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022) as a torchvision detection backbone.

    Maps at ``scales`` (finest first) of the last block's map (ViTDet) or, with ``out_indices``
    (one block per scale), of several blocks; plus torchvision's ``LastLevelMaxPool`` level
    "pool". ``forward`` returns an OrderedDict "0", "1", ..., "pool" of (B, E, h*s, w*s) maps;
    ``strides`` are the levels' strides in pixels (p / s, and twice the coarsest for "pool").
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.scales = _check_scales(scales, "scales")
        depth = encoder.depth
        if out_indices is None:
            out_indices = (depth - 1,) * len(self.scales)
        elif len(out_indices) != len(self.scales):
            raise ValueError(
                f"out_indices needs one block per scale ({len(self.scales)}), got {out_indices}"
            )
        self.out_indices = _check_indices(out_indices, depth)
        self.encoder, self.out_channels = encoder, out_channels
        self.strides = [encoder.patch_size / s for s in self.scales]
        self.strides.append(self.strides[-1] * 2)
        self.stages = nn.ModuleList(
            _vitdet_stage(encoder.embed_dim, s, out_channels) for s in self.scales
        )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        blocks = sorted(set(self.out_indices))
        maps = dict(
            zip(blocks, _block_maps(self.encoder, x, blocks), strict=True)
        )  # each (B, D, h, w)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, (stage, block) in enumerate(zip(self.stages, self.out_indices, strict=True)):
            out[str(i)] = stage(maps[block])  # (B, E, h*s, w*s)
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


class Detector(nn.Module):
    """A torchvision Faster / Mask R-CNN whose backbone is a :class:`SimpleFeaturePyramid`.

    ``forward(images, targets)`` is the torchvision model's: a dict of losses in training, a list
    of per-image dicts (boxes, scores, labels[, masks]) in eval. The encoder lives once, in
    ``model.backbone.encoder`` (parameter names ``model.backbone.encoder.*``); :attr:`encoder`
    is a view of it, not a second registration.
    """

    _ENCODER = "model.backbone.encoder."

    def __init__(self, model: GeneralizedRCNN) -> None:
        super().__init__()
        if not isinstance(model.backbone, SimpleFeaturePyramid):
            raise ValueError("Detector needs a model whose backbone is a SimpleFeaturePyramid")
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.backbone.encoder

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ):
        return self.model(images, targets)

    # ---- what optimizers need ----

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def no_weight_decay(self) -> set[str]:
        return {self._ENCODER + n for n in self.encoder.no_weight_decay()}

    def is_head(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to the task head (everything but the encoder)."""
        return not name.startswith(self._ENCODER)

    def layer_id(self, name: str) -> int:
        """Encoder parameters by the encoder's rule; neck, RPN and RoI heads with the top layer."""
        if name.startswith(self._ENCODER):
            return self.encoder.layer_id(name.removeprefix(self._ENCODER))
        return self.num_layers - 1


def build_detector(
    encoder: nn.Module,
    *,
    num_classes: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    masks: bool = False,
    out_channels: int = 256,
    scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    out_indices: Sequence[int] | None = None,
    anchor_sizes: Sequence[float | Sequence[float]] | None = None,
    representation_size: int = 1024,
    box_detections_per_img: int = 100,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
    rpn_post_nms_top_n: tuple[int, int] = (2000, 1000),
) -> Detector:
    """ViTDet-style Faster R-CNN (or Mask R-CNN with ``masks``) on a ViT encoder.

    ``num_classes`` counts the background. Images are [0, 1] tensors (any channel count, matching
    ``mean``/``std``) on img_size x img_size canvases: the transform (min = max size = img_size,
    padding to a multiple of img_size) leaves them as they are, and letterboxes smaller ones.
    Anchors: one size per level, 8 x its stride (ViTDet's 32..512 for patch 16), aspect ratios
    0.5, 1, 2. RoIAlign (7x7 boxes, 14x14 masks, sampling 2) over the non-pool levels; the box head
    is torchvision's TwoMLPHead, the mask head four conv3x3 of ``out_channels`` (256 by default,
    torchvision's width). ``rpn_pre_nms_top_n`` / ``rpn_post_nms_top_n``: proposals kept per level
    before NMS and in all after it, (training, testing): torchvision's defaults; small images with
    few objects need far fewer (the CPU recipes).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if len(mean) != encoder.in_chans or len(std) != encoder.in_chans:
        raise ValueError(
            f"mean/std need one value per channel ({encoder.in_chans}), got {mean} and {std}"
        )
    if img_size != encoder.img_size:
        raise ValueError(f"img_size {img_size} differs from the encoder's {encoder.img_size}")
    backbone = SimpleFeaturePyramid(
        encoder, out_channels=out_channels, scales=scales, out_indices=out_indices
    )
    # MultiScaleRoIAlign infers each level's scale as a power of two and assumes consecutive
    # levels halve; AnchorGenerator uses integer strides
    if any(a != 2 * b for a, b in itertools.pairwise(backbone.scales)):
        raise ValueError(f"detection scales must halve level to level, got {backbone.scales}")
    if any(s < 1 or not math.log2(s).is_integer() for s in backbone.strides):
        raise ValueError(f"level strides must be powers of 2 >= 1, got {backbone.strides}")
    levels = len(backbone.strides)
    if anchor_sizes is None:
        anchor_sizes = [int(8 * s) for s in backbone.strides]
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one entry per level ({levels}), got {anchor_sizes}")
    sizes = tuple(tuple(a) if isinstance(a, Sequence) else (a,) for a in anchor_sizes)
    if len({len(a) for a in sizes}) != 1:
        raise ValueError("every level needs the same number of anchor sizes (one RPN head)")
    names = [str(i) for i in range(len(backbone.scales))]
    common = dict(
        min_size=img_size,
        max_size=img_size,
        image_mean=list(mean),
        image_std=list(std),
        size_divisible=img_size,  # the canvas stays exactly img_size (the encoder's grid)
        rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels),
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n[0],
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=rpn_post_nms_top_n[0],
        rpn_post_nms_top_n_test=rpn_post_nms_top_n[1],
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(out_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
    )
    if masks:
        model: GeneralizedRCNN = MaskRCNN(
            backbone,
            None,
            mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(out_channels, (out_channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(out_channels, out_channels, num_classes),
            **common,
        )
    else:
        model = FasterRCNN(backbone, None, **common)
    return Detector(model)
