"""The trainer's evaluation hook: when a run is scored while it trains, and what is kept.

A command declares an :class:`Evaluation` (fine-tuning, segmentation, detection; the tokenizer's
held-out check) and hands it to the trainer, whose :class:`Evaluator` runs it on rank 0 every
``every_epochs`` epochs, every ``every_steps`` optimizer steps and at the end. Each evaluation is
logged (``metrics.jsonl``, TensorBoard); with a ``metric`` it also rewrites
``model_last.safetensors``, ``model_best.safetensors`` (the best so far by the metric) and
``eval.json`` (every evaluation and the best). A resumed run keeps the evaluations up to its
checkpoint and chooses the best among them again, as the uninterrupted run chose it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mimkit.engine import checkpoint as ckpt

__all__ = ["BEST_FILE", "EVAL_FILE", "LAST_FILE", "Evaluation", "Evaluator"]

EVAL_FILE, BEST_FILE, LAST_FILE = "eval.json", "model_best.safetensors", "model_last.safetensors"


@dataclass(frozen=True)
class Evaluation:
    """What a run is scored on while it trains, how often, and which weights it keeps."""

    evaluate: Callable[[nn.Module], dict[str, Any]]  # the metrics of the model given
    metric: str | None  # chooses model_best; None: evaluations are only logged (a health check)
    mode: Literal["max", "min"] = "max"  # whether a higher or a lower metric is better
    every_epochs: int = 1
    every_steps: int | None = None  # also every N optimizer steps (the last one excepted)
    weights: Callable[[nn.Module], dict[str, torch.Tensor]] = nn.Module.state_dict  # saved
    # other weights (an EMA) that ``evaluate`` scores under "<name>_" keys: model_best is the
    # best of them and the model ("model")
    rivals: Mapping[str, nn.Module] = field(default_factory=dict)
    # eval.json's best entry as a summary: epoch, step, the metric, ``which`` weights scored it
    # (also in model_best's metadata) and these keys of theirs; None: the whole evaluation
    best_keys: tuple[str, ...] | None = None
    split: str = "eval"  # what it runs on, as the printed lines name it
    # the printed line after "(step N): ", from (this evaluation, the best); None: every scalar
    report: Callable[[dict[str, Any], dict[str, Any]], str] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)  # more keys of eval.json


class Evaluator:
    """Runs an :class:`Evaluation` for the trainer (rank 0) and keeps its history and best."""

    def __init__(
        self, spec: Evaluation, run_dir: Path, log: Callable[[dict[str, Any], int], None]
    ) -> None:
        self.spec, self.run_dir, self._log = spec, Path(run_dir), log
        self.history: list[dict[str, Any]] = []  # eval.json's: {"step", "epoch", metrics...}
        self.best: dict[str, Any] | None = None
        self._best_key = -math.inf

    def due_after_epoch(self, epoch: int, *, final: bool) -> bool:
        """Every ``every_epochs`` epochs, and after the last one."""
        return final or epoch % self.spec.every_epochs == 0

    def due_after_step(self, step: int, *, total_steps: int) -> bool:
        """Every ``every_steps`` steps; the last step is evaluated as the last epoch's end."""
        every = self.spec.every_steps
        return bool(every) and step % every == 0 and step < total_steps

    def reset(self) -> None:
        """A fresh run: no earlier run's ``eval.json`` is continued."""
        if self.spec.metric is not None:
            (self.run_dir / EVAL_FILE).unlink(missing_ok=True)

    def restore(self, step: int) -> None:
        """A run resumed from the checkpoint of ``step``: the evaluations up to it are kept (the
        later ones are done again, the replay being exact) and the best is chosen among them."""
        path = self.run_dir / EVAL_FILE
        if self.spec.metric is None or not path.is_file():
            return
        self.history, self.best, self._best_key = [], None, -math.inf
        for entry in json.loads(path.read_text()).get("history", []):
            if entry["step"] <= step:
                self.history.append(entry)
                self._consider(entry)

    def run(self, model: nn.Module, *, step: int, epoch: float, metadata: dict[str, Any]) -> None:
        """Score ``model`` after optimizer step ``step`` (once per step), log it and, with a
        metric, write model_last, model_best when it is the best so far, and eval.json."""
        if self.history and self.history[-1]["step"] == step:
            return  # already evaluated at this step
        # never from the training RNG: an epoch's checkpoint is written before its evaluation,
        # and a resumed run must continue from the RNG state an uninterrupted one has
        with torch.random.fork_rng(devices=[]):
            record = {"epoch": epoch, **self.spec.evaluate(model)}
        self._log({k: v for k, v in record.items() if isinstance(v, int | float)}, step)
        entry = {"step": step, **record}
        self.history.append(entry)
        metric = self.spec.metric
        if metric is None:
            return
        meta = {**metadata, "step": step, "epoch": epoch, metric: record[metric]}
        last = self.spec.weights(model)
        ckpt.save_weights(self.run_dir / LAST_FILE, last, meta)
        chosen = self._consider(entry)
        if chosen is not None:
            which, score = chosen
            rival = self.spec.rivals.get(which)
            weights = last if rival is None else self.spec.weights(rival)
            if self.spec.best_keys is not None:
                meta |= {metric: score, "which": which}
            ckpt.save_weights(self.run_dir / BEST_FILE, weights, meta)
        state = {"history": self.history, "best": self.best, **self.spec.info}
        (self.run_dir / EVAL_FILE).write_text(json.dumps(state, indent=2) + "\n")
        text = (self.spec.report or self._report)(record, self.best)
        print(f"{self.spec.split} epoch {epoch:g} (step {step}): {text}", flush=True)

    def _key(self, score: float | None) -> float:
        """A score as a number where higher is better; a missing score (None) is the worst."""
        if score is None:
            return -math.inf
        return score if self.spec.mode == "max" else -score

    def _consider(self, entry: dict[str, Any]) -> tuple[str, float | None] | None:
        """Make ``entry`` the best if it beats it (strictly: the earlier wins a tie; the first
        evaluation always does): (the name of the weights that scored it, the score), else
        None."""
        metric = self.spec.metric
        scores = [("model", entry.get(metric))]
        scores += [(n, entry[k]) for n in self.spec.rivals if (k := f"{n}_{metric}") in entry]
        which, score = max(scores, key=lambda s: self._key(s[1]))  # the first on a tie
        if self.best is not None and self._key(score) <= self._best_key:
            return None
        self._best_key = self._key(score)
        keys = self.spec.best_keys
        if keys is None:
            self.best = dict(entry)
        else:
            prefix = "" if which == "model" else f"{which}_"
            self.best = {"epoch": entry["epoch"], "step": entry["step"], metric: score}
            self.best |= {"which": which, **{k: entry.get(prefix + k) for k in keys}}
        return which, score

    def _report(self, record: dict[str, Any], best: dict[str, Any]) -> str:
        """Every scalar of ``record``, then the best's metric and epoch."""
        shown = ", ".join(
            f"{k} {v:.2f}" for k, v in record.items() if isinstance(v, int | float) and k != "epoch"
        )
        value = best[self.spec.metric]
        value = "n/a" if value is None else f"{value:.2f}"
        return f"{shown}; best {self.spec.metric} {value} (epoch {best['epoch']:g})"
