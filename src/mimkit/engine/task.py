"""The task protocol: everything the trainer knows of a method.

A task gives its ``model`` (an nn.Module), ``step(batch) -> StepOutput`` (the loss and scalars to
log), ``weights()`` / ``load_weights()`` (what a checkpoint holds), ``metadata()`` (provenance) and
``name`` (the progress bar's label). Its optional hooks have no-op defaults in :class:`TaskHooks`;
the trainer calls them with everything they need, so a task never reads the trainer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

__all__ = ["StepOutput", "Task", "TaskHooks"]


class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar, what is differentiated
    logs: dict[str, torch.Tensor]  # scalars to log (detached)


class Task(Protocol):
    name: str
    model: nn.Module

    def step(self, batch: Any) -> StepOutput: ...
    def weights(self) -> dict[str, torch.Tensor]: ...
    def load_weights(self, state: dict[str, torch.Tensor]) -> None: ...
    def metadata(self) -> dict[str, Any]: ...
    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None: ...
    def after_step(self, step: int) -> None: ...


class TaskHooks:
    """The optional hooks of :class:`Task`, doing nothing; a task overrides those it needs."""

    name = "train"

    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Before every micro-step of optimizer step ``step``: step-dependent schedules."""

    def after_step(self, step: int) -> None:
        """After every optimizer step (``step`` counts it): e.g. a weight EMA."""
