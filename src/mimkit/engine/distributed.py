"""Processes and devices: single-process runs, and multi-process data parallelism under torchrun.

A run launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``
in the environment) joins the process group when it starts (:func:`init_distributed`): NCCL with
one GPU per process (``cuda:LOCAL_RANK``), gloo on CPU. Without those variables nothing is
initialized and everything below is a no-op: rank 0 of a world of 1.

Data parallelism is torch's ``DistributedDataParallel`` (:class:`DataParallelModel`): parameters
broadcast from rank 0 at wrapping, gradients averaged across ranks during backward. Rank 0 alone
logs, writes checkpoints and figures, and evaluates.

``train.parallel=fsdp`` shards parameters, gradients and optimizer states instead
(:class:`FullyShardedModel`: FSDP2's ``fully_shard`` on every transformer block, then the whole
model). The optimizer's shards are checkpointed with ``torch.distributed.checkpoint`` (every rank
writes its own); rank 0 keeps a full copy of the weights only (no gradients or optimizer states),
refreshed at checkpoints and epoch ends, for ``model.safetensors``, figures and evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# rank and size are read without PyTorch (the data and config layers need them); re-exported here
from mimkit.ranks import rank, world_size

__all__ = [
    "DataParallelModel",
    "FullyShardedModel",
    "all_agree",
    "all_gather_object",
    "barrier",
    "init_distributed",
    "is_main",
    "mean_across_ranks",
    "pick_device",
    "rank",
    "shutdown",
    "sync_batchnorm",
    "world_size",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


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


def shutdown(*, wait: bool = False) -> None:
    """Leave the process group (at the end of a command). ``wait``: first wait for every rank
    (after a command that succeeded), so that no rank tears its connections down while rank 0
    still evaluates and writes; a rank that destroyed its gloo group early could abort."""
    if _initialized():
        if wait and world_size() > 1:
            dist.barrier()
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


def sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, str | None]:
    """BatchNorm across processes, as the official BEiT segmentation's SyncBN: with several
    ranks on GPUs, every BatchNorm becomes ``SyncBatchNorm`` (the same state-dict keys, so
    checkpoints load in one process). torch syncs only on accelerators: on CPU each rank
    normalizes its own share of the batch (DDP broadcasts rank 0's running statistics).
    Returns the model and a note for the run's log (None when nothing applies)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world_size() <= 1 or not has_bn:
        return model, None
    if device.type == "cpu":
        return model, (
            f"BatchNorm statistics per process ({world_size()} on CPU: torch's SyncBatchNorm "
            "needs a GPU); the running statistics are rank 0's"
        )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, f"BatchNorm synchronized across {world_size()} processes (SyncBatchNorm)"


class DataParallelModel(DistributedDataParallel):
    """``DistributedDataParallel`` that still looks like the model it wraps.

    Tasks use their model's own attributes and methods (``model.encoder``, ``model.loss``,
    ``state_dict()`` without a ``module.`` prefix): those resolve on the wrapped module. Only a
    call of the wrapper itself (``model(...)``) synchronizes gradients, so the trainer checks
    that every training step made one (:attr:`calls`).
    """

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        ids = [device] if device.type == "cuda" else None
        super().__init__(module, device_ids=ids, broadcast_buffers=True)
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


class FullyShardedModel:
    """FSDP2 around a model, in place: ``fully_shard`` on each block, then on the whole model.

    Every ``nn.ModuleList`` whose name ends in ``blocks`` (the encoder's and a decoder's
    transformer blocks) gives one unit per block, gathered just before its forward and freed after
    it; the rest (embeddings, norms, heads, shared relative position bias) is the root unit. The
    ranks start from rank 0's weights (they were seeded apart). Build the optimizer after this:
    its parameters are the shards (``DTensor``).
    """

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # one initialization for all ranks (DDP broadcasts it too)
            for t in itertools.chain(model.parameters(), model.buffers()):
                dist.broadcast(t.data, src=0)
        # rank 0's full copy of the weights (not sharded): checkpoints, figures, evaluation
        self.replica = copy.deepcopy(model) if is_main() else None
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks"):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        self.model, self.calls, self.gathered_step = model, 0, -1
        model.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no reduce-scatter) inside the block."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def gather(self, step: int) -> nn.Module | None:
        """Collective: rank 0's full copy updated to the weights of optimizer step ``step``, and
        returned (None on the other ranks). Tensors are gathered one at a time; a second call at
        the same step (a checkpoint, then the epoch's figures) gathers nothing."""
        from torch.distributed.tensor import DTensor

        if step == self.gathered_step:
            return self.replica
        self.gathered_step = step
        full: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            t = v.full_tensor() if isinstance(v, DTensor) else v
            if self.replica is not None:
                full[k] = t
        if self.replica is not None:
            self.replica.load_state_dict(full, strict=True)
        return self.replica

    def save_optimizer(self, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
        """Collective: every rank writes its optimizer shards under ``path`` (DCP format)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self.model, optimizer)}
        dcp.save(state, checkpoint_id=str(path))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
        """Collective: the optimizer shards written by :meth:`save_optimizer` (same world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"optimizer": get_optimizer_state_dict(self.model, optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(self.model, optimizer, state["optimizer"])
