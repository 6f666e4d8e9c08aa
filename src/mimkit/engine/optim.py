"""Optimizer parameter groups and the learning-rate schedule (pure function of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mimkit.config import OptimConfig

__all__ = ["build_optimizer", "cosine_lr", "param_groups", "set_lr"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything exempt from weight decay.

    Exempt: 1-D parameters (norms, biases) and the names the model declares in
    ``no_weight_decay()`` (position embeddings, cls and mask tokens). Frozen parameters are left
    out (MAE's fixed sin-cos position embeddings).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the lr is set every step by :func:`set_lr`."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
    )


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to ``min_lr`` (MAE/BEiT, per step)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times its ``lr_scale`` (layer-wise decay) when present."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
