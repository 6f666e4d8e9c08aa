"""Run logging: ``metrics.jsonl`` (a JSON object per record) and TensorBoard scalars, rank 0."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mimkit.engine.distributed import is_main

__all__ = ["MetricsLogger"]


def _step_of(line: str) -> float:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:  # a line cut by a crash: dropped
        return math.inf
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int | float) else -math.inf


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.enabled = is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any], *, step: int, prefix: str) -> None:
        """Append ``{"kind": prefix, "step": step, **record}``; numbers also go to TensorBoard."""
        if not self.enabled:
            return
        row = {"kind": prefix, "step": step, "time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def resume_at(self, step: int) -> None:
        """A run resumed from the checkpoint of ``step``: rows logged after that step (written
        before a crash, and about to be computed again) leave ``metrics.jsonl`` and TensorBoard,
        so that every step is logged once."""
        if not self.enabled:
            return
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if _step_of(line) <= step]
            if len(kept) != len(lines):
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
        if self._tb is not None:  # TensorBoard's own way: drop events from step + 1 on
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = SummaryWriter(log_dir=log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
