"""Process and device facts. Single-process runs need no initialization; rank 0 logs and saves."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_main", "pick_device", "rank", "world_size"]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    from mimkit.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} is not allowed: CUDA is not available here")
    return torch.device(name)
