"""Losses as pure functions of (prediction, target, mask)."""

from __future__ import annotations

import torch

__all__ = ["masked_mse"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only (MAE Sec. 3, "Reconstruction target").

    pred, target: (B, N, D); mask: (B, N) bool or {0, 1}, True/1 = masked. The per-patch MSE is
    averaged over D, then over masked patches.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)
