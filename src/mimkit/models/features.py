"""ViT block outputs as feature maps, the input of every dense head.

Shapes: B batch, C image channels, H x W image, p patch size, h x w = H/p x W/p patch grid,
D encoder width.

:class:`ViTFeatures` turns the tokens of chosen blocks into maps (B, D, h, w); the private helpers
here (input size and block-index checks, power-of-2 scale checks) are shared by
:mod:`mimkit.models.segmentation` and :mod:`mimkit.models.detection`. Wrappers use only the
encoder's declared interface (``forward_intermediates``, ``num_prefix_tokens``, ``grid_size``,
``patch_size``, ``embed_dim``, ``depth``, ``num_layers``, ``layer_id``, ``no_weight_decay``).

Block outputs are taken before the encoder's final norm, as BEiT's segmentation backbone and ViTDet
do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ViTFeatures"]


# ---- block tokens -> feature maps ----


def _check_input_size(encoder: nn.Module, x: torch.Tensor) -> None:
    img = encoder.img_size
    expected = (img, img) if isinstance(img, int) else tuple(img)
    if tuple(x.shape[-2:]) != expected:
        raise ValueError(
            f"input is {tuple(x.shape[-2:])} but the encoder takes {expected}: its position tables "
            "are fixed to that grid. Resize the position tables when the model is built (build it "
            "at the task's image size), or use slide_inference / whole_inference for other sizes"
        )


def _check_indices(indices: Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices, validated and made non-negative."""
    indices = tuple(int(i) for i in indices)
    if not indices:
        raise ValueError("out_indices must name at least one block")
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise ValueError(f"out_indices {bad} out of range for an encoder of depth {depth}")
    return tuple(i % depth for i in indices)


def _block_maps(encoder: nn.Module, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """Images (B, C, H, W) -> the outputs of blocks ``indices`` as maps (B, D, H/p, W/p)."""
    _check_input_size(encoder, x)
    h, w = x.shape[-2] // encoder.patch_size, x.shape[-1] // encoder.patch_size
    tokens = encoder.forward_intermediates(x, list(indices))  # each (B, prefix + h*w, D)
    start = encoder.num_prefix_tokens
    # row-major patch order: token prefix + r*w + c is the patch at (r, c)
    return [t[:, start:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in tokens]


class ViTFeatures(nn.Module):
    """The outputs of blocks ``out_indices`` of a ViT encoder as feature maps (B, D, H/p, W/p)."""

    def __init__(self, encoder: nn.Module, *, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.out_indices = _check_indices(out_indices, encoder.depth)
        self.encoder = encoder
        self.embed_dim, self.patch_size = encoder.embed_dim, encoder.patch_size

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _block_maps(self.encoder, x, self.out_indices)


# ---- pyramid scales ----


def _log2_scale(scale: float, what: str) -> int:
    if not (scale > 0 and math.log2(scale).is_integer()):
        raise ValueError(f"{what} must be powers of 2 (4, 2, 1, 0.5, ...), got {scale}")
    return int(math.log2(scale))


def _check_scales(scales: Sequence[float], what: str) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError(f"{what} must not be empty")
    for s in scales:
        _log2_scale(s, what)
    if any(a <= b for a, b in itertools.pairwise(scales)):
        raise ValueError(f"{what} must be strictly decreasing (finest first), got {scales}")
    return scales
