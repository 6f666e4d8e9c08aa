"""Processes and devices: single-process runs, and multi-process data parallelism under torchrun.

A run launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``
in the environment) joins the process group when it starts (:func:`init_distributed`): NCCL with
one GPU per process (``cuda:LOCAL_RANK``), gloo on CPU. Without those variables nothing is
initialized and everything below is a no-op: rank 0 of a world of 1.

Data parallelism is torch's ``DistributedDataParallel`` (:class:`DataParallelModel`): parameters
broadcast from rank 0 at wrapping, gradients averaged across ranks during backward. Rank 0 alone
logs, writes checkpoints and figures, and evaluates.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DataParallelModel",
    "all_agree",
    "all_gather_object",
    "barrier",
    "init_distributed",
    "is_main",
    "mean_across_ranks",
    "pick_device",
    "rank",
    "shutdown",
    "world_size",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This rank: the process group's, else torchrun's ``RANK`` (before joining), else 0."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: the group's, else torchrun's ``WORLD_SIZE``, else 1.

    Read from the environment before the group is joined, so a config resolved first (the
    absolute lr from the effective batch) already counts every rank.
    """
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


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


def init_distributed(device_name: str) -> torch.device:
    """The device of this process; joins torchrun's process group first when there is one.

    ``WORLD_SIZE`` > 1 in the environment (torchrun sets it) starts ``torch.distributed`` once:
    NCCL and ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU.
    """
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # rank 0 evaluates alone while the others wait in the next collective: allow for it
        dist.init_process_group(
            backend,
            device_id=device if device.type == "cuda" else None,
            timeout=datetime.timedelta(hours=2),
        )
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if _initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _initialized() and world_size() > 1:
        dist.barrier()


def all_agree(flag: bool | torch.Tensor, device: torch.device | None = None) -> bool:
    """True only if ``flag`` holds on every rank (one all-reduce; the flag itself otherwise)."""
    t = torch.as_tensor(flag, dtype=torch.int32, device=device)
    if _initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (itself in a single process)."""
    if not _initialized() or world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class DataParallelModel(DistributedDataParallel):
    """``DistributedDataParallel`` that still looks like the model it wraps.

    Tasks use their model's own attributes and methods (``model.encoder``, ``model.loss``,
    ``state_dict()`` without a ``module.`` prefix): those resolve on the wrapped module. Only a
    call of the wrapper itself (``model(...)``) synchronizes gradients, so the trainer checks
    that every training step made one (:attr:`calls`).
    """

    def __init__(
        self, module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False
    ) -> None:
        ids = [device] if device.type == "cuda" else None
        super().__init__(
            module,
            device_ids=ids,
            broadcast_buffers=True,
            find_unused_parameters=find_unused_parameters,
        )
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)
