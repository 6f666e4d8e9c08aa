"""Semantic segmentation on a plain ViT: SETR-PUP and UperNet heads, the segmenter, inference.

Shapes: B batch, C image channels, H x W image, p patch size, h x w = H/p x W/p patch grid,
D encoder width, E head channels, K classes.

The pipeline, top-down: block tokens -> feature maps (:mod:`mimkit.models.features`) -> a head
(:class:`SetrPUPHead`, :class:`UperNetHead` with BEiT's multi-scale neck, the auxiliary
:class:`FCNHead`) -> :class:`Segmenter` -> sliding-window / whole-image inference
(:func:`slide_inference`, :func:`whole_inference`). The segmenter uses only the encoder's declared
interface.

Block outputs are taken before the encoder's final norm, as BEiT's segmentation backbone does;
SETR-PUP applies its own LayerNorm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from mimkit.models.features import _block_maps, _check_indices, _check_scales, _log2_scale

__all__ = [
    "FCNHead",
    "SegmentationOutput",
    "Segmenter",
    "SetrPUPHead",
    "UperNetHead",
    "default_out_indices",
    "slide_inference",
    "whole_inference",
]


# ---- which blocks the heads read ----


def default_out_indices(depth: int, *, head: str) -> tuple[int, ...]:
    """The blocks a segmentation head reads by default.

    UperNet: four blocks at 1/3, 1/2, 2/3 and all of the depth (rounding half up), which is BEiT's
    (3, 5, 7, 11) for depth 12 and (7, 11, 15, 23) for depth 24, and (1, 2, 3, 5) for depth 6.
    SETR-PUP: the last block.
    """
    if head == "setr_pup":
        return (depth - 1,)
    if head == "upernet":
        return tuple(max(math.floor(depth * f + 0.5) - 1, 0) for f in (1 / 3, 1 / 2, 2 / 3, 1))
    raise ValueError(f"head must be 'upernet' or 'setr_pup', got {head!r}")


# ---- segmentation heads (mmsegmentation's, with BEiT's neck) ----


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, as mmseg's BEiT/SETR configs); a no-op at size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """mmcv's ConvModule: conv (no bias) + BatchNorm + ReLU, kaiming-initialized."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _classifier(cin: int, num_classes: int) -> nn.Conv2d:
    """mmseg's ``conv_seg``: a 1x1 conv, normal(std=0.01) weights and zero bias."""
    conv = nn.Conv2d(cin, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class SetrPUPHead(nn.Module):
    """SETR's progressive upsampling head (Zheng et al. 2021; mmseg ``SETRUPHead``).

    LayerNorm over the channels, then log2(``upsample``) stages of conv3x3-BN-ReLU + 2x bilinear
    upsampling (one stage without upsampling when ``upsample`` is 1), then a 1x1 classifier:
    (B, D, h, w) -> (B, K, h * upsample, w * upsample).
    """

    def __init__(
        self, in_dim: int, num_classes: int, *, channels: int = 256, upsample: int = 16
    ) -> None:
        super().__init__()
        if not isinstance(upsample, int) or upsample < 1 or upsample & (upsample - 1):
            raise ValueError(f"upsample must be a power of 2 >= 1, got {upsample!r}")
        self.upsample = upsample
        self.norm = LayerNorm2d(in_dim, eps=1e-6)
        stages: list[nn.Module] = []
        for i in range(max(upsample.bit_length() - 1, 1)):
            stage = [_conv_bn_relu(in_dim if i == 0 else channels, channels, 3)]
            if upsample > 1:
                stage.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(self.norm(x)))  # (B, K, h*up, w*up)


class FCNHead(nn.Module):
    """mmseg's FCN head as BEiT's auxiliary head (``num_convs=1``, no input concat; loss weight
    0.4 in BEiT's UperNet config): conv3x3-BN-ReLU, Dropout2d(0.1), 1x1 classifier."""

    def __init__(self, in_dim: int, num_classes: int, *, channels: int = 256) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(in_dim, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))  # (B, K, h, w)


def _beit_neck_stage(dim: int, scale: float) -> nn.Module:
    """BEiT's fpn1..fpn4: 4x = deconv-BN-GELU-deconv, 2x = deconv, 1x = identity, 0.5x = max-pool.

    The pool uses ``ceil_mode`` so odd maps keep their last row/column (and 1-wide maps survive).
    """
    k = _log2_scale(scale, "neck_scales")
    if k == 0:
        return nn.Identity()
    if k < 0:
        return nn.MaxPool2d(2**-k, ceil_mode=True)
    layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim, 2, 2)]
    for _ in range(k - 1):
        layers += [nn.BatchNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2)]
    return nn.Sequential(*layers)


def _ppm_groups(channels: int) -> int:
    """GroupNorm groups for the PPM: the largest divisor of ``channels`` <= 32 that leaves at
    least 8 channels per group (32 for mmseg's 512), 1 for narrow heads."""
    top = min(32, max(channels // 8, 1))
    return next(g for g in range(top, 0, -1) if channels % g == 0)


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) over same-size ViT maps, as BEiT's segmentation setup.

    BEiT's neck turns the maps into a pyramid at ``neck_scales`` (finest first); then mmseg's
    ``UPerHead``: a pyramid pooling module (PPM) on the coarsest level, 1x1 laterals on the others,
    a top-down pathway (each coarser level resized to the exact size of the next finer one, so odd
    and non-square maps work), 3x3 fpn convs, all levels resized to the finest and concatenated, a
    3x3 bottleneck, Dropout2d(0.1) and a 1x1 classifier. (B, D, h, w) x len(neck_scales) ->
    (B, K, h * s, w * s) with s = neck_scales[0].

    The PPM branches use GroupNorm, not mmseg's BatchNorm: the scale-1 branch is a 1x1 map, so
    BatchNorm there has one value per channel with a batch of 1 and fails in training mode (e.g. a
    last partial batch). The other convs keep BatchNorm, as mmseg.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        neck_scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    ) -> None:
        super().__init__()
        self.neck_scales = _check_scales(neck_scales, "neck_scales")
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.neck = nn.ModuleList(_beit_neck_stage(in_dim, s) for s in self.neck_scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(s),
                nn.Conv2d(in_dim, channels, 1, bias=False),
                nn.GroupNorm(_ppm_groups(channels), channels),
                nn.ReLU(inplace=True),
            )
            for s in self.pool_scales
        )
        self.ppm_bottleneck = _conv_bn_relu(in_dim + len(self.pool_scales) * channels, channels, 3)
        finer = len(self.neck_scales) - 1
        self.laterals = nn.ModuleList(_conv_bn_relu(in_dim, channels, 1) for _ in range(finer))
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in range(finer))
        self.fuse = _conv_bn_relu(len(self.neck_scales) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.neck):
            raise ValueError(f"UperNetHead takes {len(self.neck)} maps, got {len(maps)}")
        # the pyramid, finest first: (B, D, h*s, w*s) for s in neck_scales
        feats = [stage(m) for stage, m in zip(self.neck, maps, strict=True)]
        top = feats[-1]  # (B, D, h', w') the coarsest
        pooled = [_resize(ppm(top), top.shape[-2:]) for ppm in self.ppm]  # each (B, E, h', w')
        # (B, E, ., .) per level: 1x1 laterals, the PPM bottleneck on the coarsest
        laterals = [lat(f) for lat, f in zip(self.laterals, feats[:-1], strict=True)]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into the next finer level
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))  # (B, E, 4h, 4w)
        return self.classifier(self.dropout(fused))  # (B, K, 4h, 4w)


# ---- the segmentation model ----


class SegmentationOutput(NamedTuple):
    logits: torch.Tensor  # (B, K, H, W)
    aux_logits: torch.Tensor | None  # (B, K, H, W) from the auxiliary head, when there is one


class Segmenter(nn.Module):
    """A ViT encoder + a segmentation head; logits at the input resolution.

    ``head="upernet"`` is BEiT's ADE20K setup (BEiT Sec. 3.3 and Table 7; MAE Sec. 5): four blocks
    (:func:`default_out_indices`), BEiT's neck and UperNet, output at stride p/4 resized
    bilinearly to (H, W), and with ``aux_channels`` an auxiliary :class:`FCNHead` on block
    ``out_indices[-2]``. ``head="setr_pup"`` is SETR-PUP on the last block, upsampling by the patch
    size (a power of 2); its auxiliary head reads block ``depth // 2``. ``channels`` defaults to
    512 (UperNet) or 256 (SETR-PUP).

    Checkpoint keys: ``encoder.*``, ``head.*``, ``aux_head.*``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        num_classes: int,
        head: str = "upernet",
        out_indices: Sequence[int] | None = None,
        channels: int | None = None,
        aux_channels: int | None = None,
    ) -> None:
        super().__init__()
        if head not in ("upernet", "setr_pup"):
            raise ValueError(f"head must be 'upernet' or 'setr_pup', got {head!r}")
        depth, dim = encoder.depth, encoder.embed_dim
        if out_indices is None:
            out_indices = default_out_indices(depth, head=head)
        self.out_indices = _check_indices(out_indices, depth)
        self.encoder, self.head_kind, self.num_classes = encoder, head, num_classes
        if head == "upernet":
            if len(self.out_indices) != 4:
                raise ValueError(f"upernet reads 4 blocks, got out_indices={self.out_indices}")
            self.head = UperNetHead(dim, num_classes, channels=channels or 512)
            aux_index = self.out_indices[-2]
        else:
            if len(self.out_indices) != 1:
                raise ValueError(f"setr_pup reads 1 block, got out_indices={self.out_indices}")
            self.head = SetrPUPHead(
                dim, num_classes, channels=channels or 256, upsample=encoder.patch_size
            )
            aux_index = depth // 2
        self.aux_head = (
            FCNHead(dim, num_classes, channels=aux_channels) if aux_channels is not None else None
        )
        self.aux_index = aux_index if self.aux_head is not None else None

    def forward_train(self, x: torch.Tensor) -> SegmentationOutput:
        """Logits and, when configured, the auxiliary head's logits, both (B, K, H, W)."""
        return self(x, with_aux=True)

    def forward(
        self, x: torch.Tensor, *, with_aux: bool = False
    ) -> torch.Tensor | SegmentationOutput:
        """Logits (B, K, H, W); ``with_aux``: a :class:`SegmentationOutput` (training: the
        auxiliary head's logits too, when configured). Training calls the model itself, so
        that a DistributedDataParallel wrapper sees the call."""
        out = self._forward(x, aux=with_aux and self.aux_head is not None)
        return out if with_aux else out.logits

    def _forward(self, x: torch.Tensor, *, aux: bool) -> SegmentationOutput:
        indices = self.out_indices + ((self.aux_index,) if aux else ())
        maps = _block_maps(self.encoder, x, indices)  # each (B, D, h, w)
        n = len(self.out_indices)
        logits = self.head(maps[:n]) if self.head_kind == "upernet" else self.head(maps[0])
        size = x.shape[-2:]
        aux_logits = _resize(self.aux_head(maps[n]), size) if aux else None
        return SegmentationOutput(_resize(logits, size), aux_logits)

    # ---- what optimizers need ----

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def is_head(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to the task head (everything but the encoder)."""
        return not name.startswith("encoder.")

    def layer_id(self, name: str) -> int:
        """Encoder parameters by the encoder's rule; the neck and heads with the top layer (as
        BEiT's segmentation code)."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name.removeprefix("encoder."))
        return self.num_layers - 1


# ---- inference at other image sizes ----


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """mmseg's slide grid: starts every ``stride``, the last window flush with the border."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def slide_inference(
    model: nn.Module, images: torch.Tensor, *, window: int, stride: int, num_classes: int
) -> torch.Tensor:
    """mmseg's "slide" test mode: (B, C, H, W) -> float32 logits (B, K, H, W).

    ``model`` maps (B, C, window, window) to (B, K, window, window). Windows cover the image at
    ``stride`` with the last one flush with the border; overlapping logits are averaged. Images
    smaller than the window are zero-padded at the bottom/right and the padding cropped away.
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    b, _, h, w = images.shape
    x = F.pad(images, (0, max(window - w, 0), 0, max(window - h, 0)))  # (B, C, Hp, Wp)
    hp, wp = x.shape[-2:]
    logits = x.new_zeros(b, num_classes, hp, wp, dtype=torch.float32)
    count = x.new_zeros(1, 1, hp, wp, dtype=torch.float32)
    for y in _window_starts(hp, window, stride):
        for x0 in _window_starts(wp, window, stride):
            out = model(x[:, :, y : y + window, x0 : x0 + window])
            if out.shape != (b, num_classes, window, window):
                raise ValueError(
                    f"model returned {tuple(out.shape)} for a window, expected "
                    f"{(b, num_classes, window, window)}"
                )
            logits[:, :, y : y + window, x0 : x0 + window] += out.float()
            count[:, :, y : y + window, x0 : x0 + window] += 1
    return (logits / count)[:, :, :h, :w]


def whole_inference(model: nn.Module, images: torch.Tensor, *, size: int) -> torch.Tensor:
    """mmseg's "whole" test mode: resize (B, C, H, W) to size x size (bilinear), run ``model``,
    resize the logits back to (B, K, H, W)."""
    h, w = images.shape[-2:]
    return _resize(model(_resize(images, (size, size))), (h, w))
