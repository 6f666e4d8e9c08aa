"""This process's place among torchrun's processes, read without importing PyTorch.

The process group's rank and size once it is joined, else torchrun's ``RANK`` / ``WORLD_SIZE``
(set before joining), else a single process. Read before the group is joined, so a config
resolved first (the absolute lr from the global batch) already counts every rank, and a data
stream built first already reads its own part.
"""

from __future__ import annotations

import os
import sys

__all__ = ["rank", "world_size"]


def _group():
    dist = sys.modules.get("torch.distributed")  # never imported here: joined only if imported
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This rank: the process group's, else torchrun's ``RANK``, else 0."""
    group = _group()
    return group.get_rank() if group else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: the group's, else torchrun's ``WORLD_SIZE``, else 1."""
    group = _group()
    return group.get_world_size() if group else int(os.environ.get("WORLD_SIZE", "1"))
