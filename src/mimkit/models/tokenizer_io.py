"""Loading a visual tokenizer for BEiT: a mimkit dVAE or the converted DALL-E encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.config import ConfigError
from mimkit.models.dalle import DalleEncoder, load_dalle_encoder, map_pixels
from mimkit.models.tokenizer import DiscreteVAE
from mimkit.weights import load_weights, read_metadata

__all__ = ["DalleTokenizer", "load_tokenizer"]

_DVAE_KEYS = ("in_chans", "vocab_size", "hidden_dim", "codebook_dim", "downsample", "num_resblocks")


class DalleTokenizer(nn.Module):
    """OpenAI's DALL-E encoder as a tokenizer of [0, 1] images (grayscale repeated to RGB)."""

    def __init__(self, encoder: DalleEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.vocab_size = encoder.vocab_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise ConfigError(
                f"the DALL-E tokenizer reads grayscale or RGB images, not {images.shape[1]} "
                "channels: train a dVAE on your data (`mimkit tokenizer train`)"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.encoder.encode(map_pixels(images))  # (B, h, w), logit-Laplace input


def load_tokenizer(path: str | Path, *, device: torch.device | str = "cpu"):
    """(tokenizer with ``encode(images in [0, 1]) -> (B, h, w) ids``, normalized metadata).

    The metadata always has ``kind``, ``vocab_size``, ``downsample``, ``img_size`` (the size it
    expects) and ``in_chans`` (None when any channel count is accepted).
    """
    path = Path(path)
    meta: dict[str, Any] = read_metadata(path)
    kind = meta.get("kind")
    if kind == "dvae":
        state, _ = load_weights(path)
        model = DiscreteVAE(**{k: int(meta[k]) for k in _DVAE_KEYS})
        model.load_state_dict(state, strict=True)
        return model.to(device).eval().requires_grad_(False), meta
    if kind == "encoder":  # written by `mimkit convert dalle`
        enc = load_dalle_encoder(path, device=device)
        meta = {**meta, "kind": "dalle", "downsample": 8, "img_size": 112, "in_chans": None}
        meta["vocab_size"] = enc.vocab_size
        return DalleTokenizer(enc).to(device).eval().requires_grad_(False), meta
    raise ConfigError(
        f"{path}: not a tokenizer (metadata kind={kind!r}; expected a `mimkit tokenizer train` "
        "dVAE or a DALL-E encoder converted with `mimkit convert dalle`)"
    )
