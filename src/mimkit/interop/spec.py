"""What the converters of every format share: mimkit's flat layout and a model's architecture.

mimkit's checkpoints are flat: the encoder's keys at the top level (timm's names), beside an MAE
decoder, a BEiT MIM head or a classifier head; :func:`flat_state` turns the state dict of a
module that holds the encoder as a submodule (``encoder.*``) into that layout.
:class:`ModelSpec` is what fixes the keys and tensor shapes, in mimkit's layout and in the
others: the official converter reads it from tensor shapes, the Hugging Face one from a config;
:func:`preset_name` names it after mimkit's ViT presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mimkit.config import VIT_PRESETS

__all__ = ["ModelSpec", "Tensors", "flat_state", "preset_name", "tensor_dict"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """The architecture of a ViT / BEiT checkpoint: what fixes its keys and tensor shapes."""

    method: str  # "mae" (timm's VisionTransformer) or "beit" (timm's Beit)
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    layer_scale: bool = False  # BEiT gamma_1 / gamma_2
    rel_pos: str = "none"  # BEiT relative position bias: shared | per_layer | none
    abs_pos: bool = True  # absolute position embeddings (a ViT always has them)
    mask_token: bool = False  # BEiT encoder mask embedding
    fc_norm: bool = False  # the final norm follows mean pooling (fc_norm) instead of norm
    num_classes: int = 0  # classifier (or linear probe) head rows
    vocab_size: int = 0  # BEiT MIM head (lm_head) rows
    dec_dim: int = 0  # MAE decoder width, depth and heads
    dec_depth: int = 0
    dec_heads: int = 0

    @property
    def grid(self) -> int:
        """Patches per side of the (square) image."""
        return self.img_size // self.patch_size

    @property
    def hidden(self) -> int:
        """The encoder's MLP hidden width."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def dec_hidden(self) -> int:
        """The MAE decoder's MLP hidden width (mimkit's decoder shares the encoder's ratio)."""
        return int(self.dec_dim * self.mlp_ratio)

    @property
    def pool(self) -> str:
        """A classifier's pooling: ``"avg"`` (with ``fc_norm``) or ``"cls"``."""
        return "avg" if self.fc_norm else "cls"


def preset_name(embed_dim: int, depth: int, num_heads: int, hint: Any = None) -> str:
    """The ``arch`` of a model: ``hint`` (the name mimkit saved with it) when it is a preset of
    the same width: a recipe's ``vit_tiny`` with ``depth: 6`` stays ``vit_tiny``, its explicit
    depth saved beside it; else the preset these dimensions match, else ``custom``."""
    dims = (embed_dim, depth, num_heads)
    if hint in VIT_PRESETS and VIT_PRESETS[hint][0] == embed_dim:
        return hint
    return next((name for name, v in VIT_PRESETS.items() if v == dims), "custom")


def tensor_dict(state: Any, key_label: str) -> Tensors:
    """``state`` as a dict of tensors; a ValueError names the first key whose value is not a
    tensor (``key_label`` starts that message, e.g. ``"state key"``)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    out: Tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{key_label} {k!r} is not a tensor ({type(v).__name__})")
        out[k] = v
    return out


def flat_state(state: Mapping[str, torch.Tensor]) -> Tensors:
    """``encoder.``-prefixed module state dicts (MAE, BEiT, Classifier) -> the flat layout."""
    return {k.removeprefix("encoder."): v for k, v in tensor_dict(state, "state key").items()}
