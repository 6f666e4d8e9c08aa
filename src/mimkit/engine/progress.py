"""Progress of a long phase (features, k-NN, data reading): a tqdm bar on a terminal, elsewhere
(logs, SLURM, CI) a line every few seconds, so that no phase longer than that is silent."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from mimkit.engine.distributed import is_main

__all__ = ["progress"]

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, total: int | None = None, every_s: float = 10.0
) -> Iterator[T]:
    """Yield ``items``, showing how far they are: tqdm on a terminal (stderr), else a line on
    stdout every ``every_s`` seconds and one at the end when the phase took longer than that.
    Silent on ranks other than 0."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not is_main():
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, dynamic_ncols=True, leave=False)
        return
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            print(f"{desc}: {done}{of} batches, {now - start:.0f} s", flush=True)
    if last > start:  # a line was printed: say that it ended
        print(f"{desc}: done, {done} batches in {time.perf_counter() - start:.0f} s", flush=True)
