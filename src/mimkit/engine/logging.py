"""Run logging: ``metrics.jsonl`` (a JSON object per record) and TensorBoard scalars, rank 0."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mimkit.engine.distributed import is_main

__all__ = ["MetricsLogger"]


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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
