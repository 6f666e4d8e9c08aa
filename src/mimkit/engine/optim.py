"""Optimizer parameter groups and the learning-rate schedule (pure function of the step)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mimkit.config import OptimConfig

__all__ = [
    "adamw",
    "build_optimizer",
    "cosine_lr",
    "layer_decay_param_groups",
    "linear_lr",
    "param_groups",
    "schedule_lr",
    "set_lr",
]


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


def _exempt(model: nn.Module, name: str, p: nn.Parameter, skip: set[str]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or name in skip


def layer_decay_param_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float, head_lr_mult: float = 1.0
) -> list[dict]:
    """Groups for layer-wise lr decay (BEiT Sec. 3.1 fine-tuning; MAE's ``param_groups_lrd``).

    A parameter of layer ``i`` (``model.layer_id``: 0 the embeddings, 1..depth the blocks,
    ``num_layers - 1`` the final norm and head) gets ``lr_scale = layer_decay ** (num_layers - 1
    - i)``; weight decay as :func:`param_groups`. Each group also lists its parameter ``names``.
    The task head's parameters (``model.is_head(name)``, when the model says) get their scale
    times ``head_lr_mult`` (mmsegmentation's ``lr_mult`` for the decode head; SETR uses 10).
    """
    is_head = getattr(model, "is_head", None)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    top = model.num_layers - 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, exempt = model.layer_id(name), _exempt(model, name, p, skip)
        head = head_lr_mult != 1.0 and is_head is not None and bool(is_head(name))
        group = groups.setdefault(
            (layer, exempt, head),
            {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if exempt else weight_decay,
                "lr_scale": layer_decay ** (top - layer) * (head_lr_mult if head else 1.0),
                "layer_id": layer,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, or :func:`layer_decay_param_groups` when the config has
    ``layer_decay`` (fine-tuning); the lr is set every step by :func:`set_lr`."""
    layer_decay = getattr(cfg, "layer_decay", None)
    if layer_decay is not None:
        groups = layer_decay_param_groups(
            model,
            weight_decay=cfg.weight_decay,
            layer_decay=layer_decay,
            head_lr_mult=getattr(cfg, "head_lr_mult", 1.0),
        )
    else:
        groups = param_groups(model, cfg.weight_decay)
    return adamw(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)[0]


def adamw(groups: list[dict], **kw: Any) -> tuple[torch.optim.AdamW, str]:
    """AdamW, fused where torch has a fused kernel for these parameters (CPU and CUDA in fp32 and
    bf16), else foreach (one kernel per op over all tensors, not a Python loop per tensor);
    returns (optimizer, "fused" | "foreach"). ``benchmarks/optimizer_step.py`` times the three."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to ``min_lr`` (MAE/BEiT, per step)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0, then a linear decay to ``min_lr`` (BEiT Table 7, segmentation)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return lr + (min_lr - lr) * progress


def schedule_lr(schedule: str, step: int, **kwargs: float) -> float:
    """The lr of ``schedule`` ("cosine" | "linear") at ``step``."""
    fn = {"cosine": cosine_lr, "linear": linear_lr}.get(schedule)
    if fn is None:
        raise ValueError(f"unknown lr schedule {schedule!r} (cosine | linear)")
    return fn(step, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times its ``lr_scale`` (layer-wise decay) when present."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
