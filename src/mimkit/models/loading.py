"""Finding and reading mimkit checkpoints for downstream use (fine-tuning, probes, figures).

A downstream ``model.init`` may name any of:

- a pretraining run directory (its ``encoder.safetensors``), a fine-tuning run directory (its
  ``model_best.safetensors``), or a run directory with only ``checkpoints/`` (the latest one);
- a ``checkpoints/ckpt-*`` directory (its ``model.safetensors``);
- a ``.safetensors`` file written by mimkit: an encoder (timm layout), a full pretraining model
  (official MAE / BEiT layout: decoder or MIM head beside the encoder keys) or a fine-tuned
  classifier (timm layout with ``fc_norm`` / ``head``).

Every mimkit file carries provenance metadata (``model_config`` among it), so the architecture is
known before any weight is read. Only safetensors are read here: nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimkit.engine.checkpoint import (
    NotSafetensorsError,
    latest_checkpoint,
    load_weights,
    read_metadata,
    verify_checkpoint,
)
from mimkit.safetensors_header import provenance_model_config

__all__ = ["EncoderWeights", "checkpoint_model_config", "find_checkpoint", "load_encoder_weights"]

# keys of a full pretraining model (and of an imported linear probe) that are not the encoder's
_PRETRAIN_ONLY = ("decoder_", "mask_token", "lm_head.", "probe.")
_HEAD_KEYS = ("head.", "fc_norm.")


def find_checkpoint(path: str | Path) -> Path:
    """The safetensors file that ``path`` (a file, a run or a checkpoint directory) stands for."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise NotSafetensorsError(
                f"{p} is not a .safetensors file: mimkit reads weights only as safetensors "
                "(never unpickles); convert an official or timm checkpoint with `mimkit convert`"
            )
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    for name in ("encoder.safetensors", "model_best.safetensors", "model.safetensors"):
        if (p / name).is_file():
            return p / name
    latest = latest_checkpoint(p / "checkpoints")
    if latest is not None:
        verify_checkpoint(latest, files=("model.safetensors",))
        return latest / "model.safetensors"
    raise FileNotFoundError(
        f"{p}: no encoder.safetensors, model_best.safetensors, model.safetensors or complete "
        "checkpoints/ inside"
    )


def checkpoint_model_config(path: str | Path) -> dict[str, Any]:
    """The architecture (the pretraining ``model`` section) recorded in a checkpoint's metadata."""
    file = find_checkpoint(path)
    return provenance_model_config(read_metadata(file), file)


@dataclass
class EncoderWeights:
    encoder: dict[str, torch.Tensor]  # encoder keys (timm layout), no pretraining / probe keys
    head: dict[str, torch.Tensor]  # fc_norm.* / head.* of a fine-tuned classifier (else empty)
    metadata: dict[str, Any]
    path: Path


def load_encoder_weights(path: str | Path) -> EncoderWeights:
    """Encoder (and classifier head) weights of any mimkit checkpoint, decoder/MIM head dropped."""
    file = find_checkpoint(path)
    state, meta = load_weights(file)
    encoder = {k: v for k, v in state.items() if not k.startswith(_PRETRAIN_ONLY + _HEAD_KEYS)}
    head = {k: v for k, v in state.items() if k.startswith(_HEAD_KEYS)}
    return EncoderWeights(encoder, head, meta, file)
