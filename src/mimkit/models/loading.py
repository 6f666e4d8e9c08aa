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

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# finding a model.init's file is the weights layer's; read here too by older imports
from mimkit.weights import checkpoint_model_config, find_checkpoint, open_weights

__all__ = ["EncoderWeights", "checkpoint_model_config", "find_checkpoint", "load_encoder_weights"]

# keys of a full pretraining model (and of an imported linear probe) that are not the encoder's
_PRETRAIN_ONLY = ("decoder_", "mask_token", "encoder_mask_token", "lm_head.", "probe.")
_HEAD_KEYS = ("head.", "fc_norm.")


@dataclass
class EncoderWeights:
    encoder: dict[str, torch.Tensor]  # encoder keys (timm layout), no pretraining / probe keys
    head: dict[str, torch.Tensor]  # fc_norm.* / head.* of a fine-tuned classifier (else empty)
    metadata: dict[str, Any]
    path: Path


def load_encoder_weights(path: str | Path) -> EncoderWeights:
    """Encoder (and classifier head) weights of any mimkit checkpoint, decoder/MIM head dropped."""
    handle = open_weights(path)
    state, meta = handle.load(), copy.deepcopy(handle.metadata)
    encoder = {k: v for k, v in state.items() if not k.startswith(_PRETRAIN_ONLY + _HEAD_KEYS)}
    head = {k: v for k, v in state.items() if k.startswith(_HEAD_KEYS)}
    return EncoderWeights(encoder, head, meta, handle.path)
