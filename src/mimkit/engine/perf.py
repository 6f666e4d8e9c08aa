"""Measuring training steps: FLOPs, a matmul peak, peak memory, interleaved timed rounds.

The pieces ``mimkit bench`` is made of, with no knowledge of any model: a :class:`Workload` is a
loss closure over fixed inputs and its optimizer; :func:`time_rounds` times blocks of its steps
with a synchronization only at each block's ends; :func:`count_flops` counts one forward +
backward; :func:`matmul_peak` measures what the device's dense matmuls reach in a dtype, for MFU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = [
    "PeakMemory",
    "Workload",
    "count_flops",
    "device_name",
    "host_syncs",
    "machine_facts",
    "matmul_peak",
    "synchronize",
    "time_loader",
    "time_rounds",
]


_aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels but not the CPU one (torch 2.14): same formulas
_CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
    ),
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of what ``fn`` runs, as ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2
    per multiply-add of matmuls, convolutions and attention (CPU attention included), their
    backward passes too; elementwise ops, norms, softmax and optimizer updates are not counted."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


# ops whose result size or value must be read by the host: on CUDA each waits for the device
_SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "is_nonzero", "equal",
    "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc",
})  # fmt: skip


class _SyncCounter(TorchDispatchMode):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        )
        key = name if name in _SYNC_OPS else f"{name}[bool]" if bool_index else None
        if key is not None:
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs() -> Any:
    """Count the ops run inside that make the host wait for the device (on CUDA).

    Yields a dict, op name -> calls, filled as the block runs: reading a value (``.item()``,
    ``float()``, ``bool()``: ``_local_scalar_dense``), data-dependent sizes (``nonzero``, boolean
    indexing, ``masked_select``, ``unique``...). It works on any device, CPU included, so a test
    on CPU shows that a CUDA step would not stall. Ops inside autograd's backward are seen too.
    """
    counts: dict[str, int] = {}
    with _SyncCounter(counts):
        yield counts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype, *, size: int | None = None, repeats: int = 5
) -> float:
    """Dense matmul FLOP/s of ``device`` in ``dtype``: the median of ``repeats`` timed blocks of
    square ``size`` x ``size`` products (default 8192 on CUDA, 1024 on CPU). fp32 on CUDA follows
    ``torch.get_float32_matmul_precision()``, as the model's matmuls do."""
    n = size or (8192 if device.type == "cuda" else 1024)
    iters = 10 if device.type == "cuda" else 2
    a = torch.randn(n, n, device=device).to(dtype)
    b, out = torch.randn(n, n, device=device).to(dtype), torch.empty_like(a)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, allocation
    rates = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        synchronize(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - t0))
    return statistics.median(rates)


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _release_free_memory() -> None:
    """Give the C heap's free pages back (glibc ``malloc_trim``), so that memory freed by earlier
    work neither counts in the starting RSS nor hides new allocations."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """The peak memory of what runs inside, above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache). CPU: the
    process's peak RSS (``getrusage``) after returning free heap pages and resetting the kernel's
    high-water mark to the current RSS (Linux, ``/proc/self/clear_refs``); where that is refused,
    only what rose above the earlier peak is seen (a lower bound). RSS also counts one-time
    runtime allocations (BLAS and oneDNN buffers, threads): tens of MiB in the first
    measurement of a process, which matter only for tiny models.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes, self.kind, self.start = device, 0, "", 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.kind = "CUDA max_memory_allocated above the start"
            return self
        _release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS
            self.kind = "CPU peak RSS above the start (getrusage)"
        except OSError:
            self.kind = "CPU peak RSS above the earlier peak (getrusage; a lower bound)"
        self.start = _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak_bytes = max(0, _maxrss_bytes() - self.start)


@dataclasses.dataclass
class Workload:
    """One thing to time: a loss over fixed inputs (forward + loss) and its optimizer.

    ``bf16`` runs the loss under ``torch.autocast(device_type, torch.bfloat16)``; ``clip_grad``
    clips the gradient norm before the optimizer step, as the trainer does.
    """

    name: str
    label: str
    loss: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer
    device_type: str = "cpu"
    bf16: bool = False
    clip_grad: float | None = None

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16):
            loss = self.loss()
        loss.backward()

    def step(self) -> None:
        self.forward_backward()
        if self.clip_grad:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.optimizer.step()

    def warm_up(self, steps: int) -> int:
        """FLOPs of one forward + backward (that step is the first of the warm-up), then
        ``steps`` more training steps."""
        flops = count_flops(self.forward_backward)
        self.optimizer.step()
        for _ in range(steps):
            self.step()
        return flops


def time_rounds(
    workloads: Sequence[Workload], *, steps: int, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step of each workload, one value per round. A round runs every workload in
    turn (A B A B ...), a block of ``steps`` steps each, synchronized only at the block's ends;
    slow drifts of the machine then fall on all of them alike."""
    times: dict[str, list[float]] = {w.name: [] for w in workloads}
    for _ in range(rounds):
        for w in workloads:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                w.step()
            synchronize(device)
            times[w.name].append((time.perf_counter() - t0) / steps)
    return times


def time_loader(
    loader: Iterable[Any], *, batches: int, set_epoch: Callable[[int], None] | None = None
) -> float:
    """Seconds ``loader`` takes for ``batches`` batches after its first one (which starts the
    workers). Epochs follow each other as in training (``set_epoch(e)`` before epoch e), each
    starting its workers again."""
    seen, epoch, t0 = -1, 0, 0.0  # -1: the first batch is not counted
    while seen < batches:
        if set_epoch is not None:
            set_epoch(epoch)
        for _ in loader:
            seen += 1
            if seen == 0:
                t0 = time.perf_counter()
            elif seen == batches:
                break
        epoch += 1
    return time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device) -> dict[str, Any]:
    """What timings depend on: versions, the device, CPU count, threads, matmul precision."""
    from mimkit import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "mimkit": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
