"""The training loop. It knows the task protocol (:mod:`mimkit.engine.task`), never the method.

Everything else lives here: optimizer, schedule, accumulation, clipping, precision, logging,
checkpoints, resume, and the run's declared :class:`~mimkit.engine.evaluation.Evaluation`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from mimkit.config import ConfigError, OptimConfig, TrainConfig
from mimkit.data import AugmentedView, ResumableSampler, make_loader
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.distributed import (
    DataParallelModel,
    FullyShardedModel,
    all_agree,
    all_gather_object,
    barrier,
    is_main,
    mean_across_ranks,
    rank,
    world_size,
)
from mimkit.engine.evaluation import Evaluation, Evaluator
from mimkit.engine.logging import MetricsLogger
from mimkit.engine.optim import build_optimizer, schedule_lr, set_lr
from mimkit.engine.task import Task
from mimkit.models.attention import set_attention

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer"]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm is NaN/inf; the optimizer step was not taken."""


@dataclass
class TrainResult:
    step: int
    epoch: int
    loss: float
    stopped_early: bool  # stopped by train.max_steps before the last epoch
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)  # eval.json's history (rank 0)
    best: dict | None = None  # eval.json's best (rank 0)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs a :class:`Task` over an :class:`AugmentedView` for ``train.epochs`` epochs.

    ``data`` may also be a stream (an ``IterableDataset`` with ``set_epoch``, ``len`` per rank
    and ``batches_per_epoch(batch_size, num_workers)``, such as
    :class:`~mimkit.data.shards.ShardStream`): it splits itself over ranks and loader workers;
    a resumed epoch re-reads the stream and drops the batches already trained on.

    ``evaluation`` scores the model while it trains (rank 0, with the full weights);
    ``on_epoch_end(epoch, final)`` is called on rank 0 after every epoch (e.g. figures).
    """

    def __init__(
        self,
        task: Task,
        data: AugmentedView | IterableDataset,
        *,
        optim: OptimConfig,
        train: TrainConfig,
        run_dir: str | Path,
        device: torch.device,
        seed: int,
        num_workers: int = 0,
        evaluation: Evaluation | None = None,
        on_epoch_end: Callable[[int, bool], None] | None = None,
        collate_fn: Callable | None = None,
    ) -> None:
        self.task, self.data, self.optim_cfg, self.cfg = task, data, optim, train
        # fused or explicit attention (train.attention; auto: explicit in bf16 on CPU)
        set_attention(task.model, train.attention, device_type=device.type,
                      precision=train.precision)  # fmt: skip
        self.run_dir, self.device, self.seed = Path(run_dir), device, seed
        self.on_epoch_end = on_epoch_end
        # a stream (IterableDataset: tar shards) splits itself over ranks and workers
        self.streaming = isinstance(data, IterableDataset)
        self.sampler = None
        if self.streaming:
            per_rank = len(data)
            self.batches_per_epoch = data.batches_per_epoch(train.batch_size, num_workers)
        else:
            self.sampler = ResumableSampler(
                len(data), seed=seed, rank=rank(), world_size=world_size(),
                repeats=train.repeated_aug,
            )  # fmt: skip
            per_rank = self.sampler.per_rank
            self.batches_per_epoch = per_rank // train.batch_size
        self.loader = make_loader(
            data,
            batch_size=train.batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            drop_last=True,
            seed=seed,
            collate_fn=collate_fn,
        )
        self.steps_per_epoch = self.batches_per_epoch // optim.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the data set is too small: an epoch of {per_rank} images"
                + (" on each process" if world_size() > 1 else "")
                + f" gives no optimizer step with train.batch_size={train.batch_size} and "
                f"optim.accum_steps={optim.accum_steps} (incomplete batches are dropped): lower "
                "train.batch_size or add images"
            )
        if train.steps:  # a budget in steps: the last epoch may end early
            self.total_steps = train.steps
            self.num_epochs = math.ceil(train.steps / self.steps_per_epoch)
        else:
            self.total_steps = self.steps_per_epoch * train.epochs
            self.num_epochs = train.epochs
        self.warmup_steps = round(optim.warmup_epochs * self.steps_per_epoch)
        self.max_steps = min(self.total_steps, train.max_steps or self.total_steps)
        # several processes (torchrun): DDP around the task's model, swapped in for each step;
        # or FSDP2, sharding the model in place once a resume has loaded its weights
        self.parallel = train.parallel if world_size() > 1 else "none"
        self.ddp = DataParallelModel(task.model, device) if self.parallel == "ddp" else None
        self.fsdp: FullyShardedModel | None = None
        self.optimizer = None if self.parallel == "fsdp" else build_optimizer(optim, task.model)
        self.autocast = train.precision in ("bf16", "fp16")
        self.amp_dtype = torch.float16 if train.precision == "fp16" else torch.bfloat16
        # fp16: the loss is scaled; steps whose gradients overflow are skipped by the scaler
        self.scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None
        self.skipped_steps = 0  # non-finite steps skipped by train.on_nonfinite=skip
        self.amp_skipped_steps = 0  # fp16 steps skipped by the GradScaler (overflow)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.logger = MetricsLogger(self.run_dir)
        self.evaluator = None
        if evaluation is not None:
            self.evaluator = Evaluator(evaluation, self.run_dir, self._log_eval)
        self._resumed = False
        self.ckpt_root = self.run_dir / "checkpoints"
        self._saved_step = -1
        self._compiled = False

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        """The training state; with several ranks, every rank's RNG state (a collective call).
        Under FSDP the optimizer's shards are written apart (:meth:`save`)."""
        rng = _rng_state()
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng if world_size() == 1 else all_gather_object(rng),
            "world_size": world_size(),
            "parallel": self.parallel,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.fsdp is None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _shard(self) -> None:
        """Before the first step, once: under ``train.parallel=fsdp`` shard the model and build
        its optimizer; with ``train.compile`` compile it (after sharding, as FSDP2 wants)."""
        if self.parallel == "fsdp" and self.fsdp is None:
            self.fsdp = FullyShardedModel(self.task.model)
            self.optimizer = build_optimizer(self.optim_cfg, self.task.model)
        if self.cfg.compile and not self._compiled:
            # in place (nn.Module.compile): parameters and state_dict keys stay the same
            self.task.model.compile(mode=self.cfg.compile_mode, backend=self.cfg.compile_backend)
            self._compiled = True

    @contextlib.contextmanager
    def full_model(self) -> Iterator[None]:
        """Every rank enters: under FSDP, rank 0's task sees the full weights inside (its full
        copy, refreshed: a collective call); otherwise nothing changes."""
        if self.fsdp is None:
            yield
            return
        replica, model = self.fsdp.gather(self.step), self.task.model
        if replica is not None:
            self.task.model = replica
        try:
            yield
        finally:
            self.task.model = model

    def save(self) -> Path | None:
        """A checkpoint of this step, written once (by rank 0; under FSDP every rank writes its
        optimizer shards); every rank must call it."""
        if self._saved_step == self.step:
            return None
        self._saved_step = self.step
        train_state = self.state_dict()
        if self.fsdp is not None:  # the optimizer's shards first, by every rank, in the staging
            stage = ckpt.staging_dir(self.ckpt_root, self.step, create=is_main())
            barrier()
            self.fsdp.save_optimizer(self.optimizer, stage / "optimizer")
            barrier()
        with self.full_model():
            if not is_main():
                return None
            meta = {**self.task.metadata(), "step": self.step, "epoch": self.epoch}
            return ckpt.save_checkpoint(
                self.ckpt_root,
                self.step,
                weights=self.task.weights(),
                metadata=meta,
                train_state=train_state,
                keep_last=self.cfg.keep_last,
                staged=self.fsdp is not None,
            )

    def resume(self) -> bool:
        """Restore the newest complete checkpoint of ``run_dir``; False when there is none."""
        found = ckpt.checkpoints_newest_first(self.ckpt_root)
        if not found:
            self._shard()
            return False
        path, state, weights, problems = ckpt.load_newest_usable(found)
        if problems and is_main():
            for bad, err in problems:
                print(f"mimkit: {bad} is unusable ({err}); trying the previous checkpoint",
                      file=sys.stderr)  # fmt: skip
            print(f"mimkit: resuming from {path} (the newer checkpoints are unusable)",
                  file=sys.stderr, flush=True)  # fmt: skip
        saved_world = int(state.get("world_size", 1))
        if saved_world != world_size():
            raise ConfigError(
                f"{path} was written by {saved_world} process(es), this run has {world_size()}: "
                "resume with the same number of processes (the data order and RNG streams are "
                "per rank)"
            )
        saved = state.get("parallel", "ddp" if saved_world > 1 else "none")
        if (saved == "fsdp") != (self.parallel == "fsdp"):
            raise ConfigError(
                f"{path} was written with train.parallel={saved}, this run has "
                f"train.parallel={self.parallel}: resume with the same value"
            )
        self.task.load_weights(weights)  # under FSDP, into the whole model before sharding
        self._shard()
        if self.fsdp is not None:
            self.fsdp.load_optimizer(self.optimizer, path / "optimizer")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp_skipped_steps = int(state.get("amp_skipped_steps", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        _set_rng_state(rng[rank()] if isinstance(rng, list) else rng)
        self._saved_step = self.step
        self.logger.resume_at(self.step)
        if self.evaluator is not None and is_main():
            self.evaluator.restore(self.step)
        self._resumed = True
        return True

    def _in_step(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The epoch's batches; several ranks streaming shards stop together at the first rank
        whose stream ran out (skipped samples make a rank's epoch shorter)."""
        if not (self.streaming and world_size() > 1):
            yield from batches
            return
        it = iter(batches)
        while True:
            batch = next(it, None)
            if not all_agree(batch is not None, self.device):
                return
            yield batch

    @contextlib.contextmanager
    def _micro_step(self, sync: bool) -> Iterator[None]:
        """Around a micro-step's forward and backward: with several ranks, the task's model is
        the DDP wrapper (or is sharded by FSDP), and gradients are reduced only when ``sync``
        (the last micro-batch before an optimizer step: accumulation uses ``no_sync``)."""
        wrapper = self.ddp or self.fsdp
        if wrapper is None:
            yield
            return
        model, calls = self.task.model, wrapper.calls
        if self.ddp is not None:
            self.task.model = self.ddp
        try:
            with contextlib.nullcontext() if sync else wrapper.no_sync():
                yield
        finally:
            self.task.model = model
        if wrapper.calls == calls:
            raise RuntimeError(
                f"{type(self.task).__name__}.step did not call its model: with several processes "
                "only a call of the model (not of one of its methods) synchronizes gradients"
            )

    # ---- the loop ----

    def fit(self) -> TrainResult:
        """Train to the end (or ``train.max_steps``). Under FSDP, rank 0's task holds the full
        trained model afterwards (the other ranks' stays sharded)."""
        self._shard()
        model, cfg, accum = self.task.model, self.cfg, self.optim_cfg.accum_steps
        model.train()
        show = is_main()
        if self.evaluator is not None and show and not self._resumed:
            self.evaluator.reset()
        interactive = show and sys.stderr.isatty()  # a progress bar on a terminal, lines otherwise
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc=self.task.name,
            disable=not interactive,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        if show and not interactive:  # the first step's line may be a while away (workers)
            batch = self.cfg.batch_size * self.optim_cfg.accum_steps * world_size()
            print(
                f"{self.task.name}: steps {self.step + 1}-{self.max_steps} "
                f"({self.steps_per_epoch} per epoch), {batch} images per step"
                + (f" ({world_size()} processes)" if world_size() > 1 else "")
                + f", {self.cfg.precision}",
                flush=True,
            )
        last_loss, loss_mean, t0, seen = math.nan, None, time.perf_counter(), 0
        last_line = time.perf_counter()
        history: list[dict] = []
        while self.epoch < self.num_epochs and self.step < self.max_steps:
            self.data.set_epoch(self.epoch)
            batches: Iterable[Any] = self.loader
            if self.streaming:  # a resumed epoch re-reads, and drops, the batches already seen
                batches = itertools.islice(self.loader, self.batch_in_epoch, None)
            else:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.batch_in_epoch * cfg.batch_size)
            loss_sum = torch.zeros((), device=self.device)
            for batch in self._in_step(batches):
                if self.batch_in_epoch >= self.steps_per_epoch * accum:
                    break  # a partial accumulation at the end of an epoch is dropped
                self.task.on_step(self.step, self.total_steps, self.steps_per_epoch)
                with self._micro_step(sync=(self.batch_in_epoch + 1) % accum == 0):
                    with torch.autocast(self.device.type, self.amp_dtype, enabled=self.autocast):
                        out = self.task.step(batch)
                    loss = out.loss / accum
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                loss_sum += out.loss.detach()
                self.batch_in_epoch += 1
                seen += cfg.batch_size
                if self.batch_in_epoch % accum:
                    continue
                lr = self._optimizer_step(loss_sum / accum)
                ev = self.evaluator
                if ev is not None and ev.due_after_step(self.step, total_steps=self.total_steps):
                    self._evaluate(round(self.step / self.steps_per_epoch, 3))
                # all ranks' batches; read on the host only when logged (a device sync)
                loss_mean = mean_across_ranks(loss_sum) / accum
                loss_sum.zero_()
                if self.step % cfg.log_every_steps == 0 or self.step == self.max_steps:
                    last_loss = float(loss_mean)
                    dt = time.perf_counter() - t0
                    rec = {
                        "epoch": self.epoch,
                        "loss": last_loss,
                        "lr": lr,
                        "img_per_s": seen * world_size() / max(dt, 1e-9),
                        **{k: float(v) for k, v in out.logs.items()},
                    }
                    if self.cfg.on_nonfinite == "skip":
                        rec["skipped_steps"] = self.skipped_steps
                    if self.scaler is not None:
                        rec["amp_skipped_steps"] = self.amp_skipped_steps
                        rec["loss_scale"] = self.scaler.get_scale()
                    self.logger.log(rec, step=self.step, prefix="train")
                    history.append({"step": self.step, **rec})
                    t0, seen = time.perf_counter(), 0
                    if (
                        show
                        and not interactive
                        and (t0 - last_line >= 30 or self.step in (1, self.max_steps))
                    ):
                        last_line = t0
                        print(
                            f"step {self.step}/{self.max_steps} epoch {self.epoch} "
                            f"loss {last_loss:.4f} lr {lr:.2e} {rec['img_per_s']:.0f} img/s",
                            flush=True,
                        )
                bar.update(1)
                if interactive:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", epoch=self.epoch)
                if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0:
                    self.save()
                if self.step >= self.max_steps:
                    break
            done = self.step >= self.total_steps  # the step budget may end an epoch early
            # a stream may end its epoch early (skipped corrupt samples): the epoch is over, and
            # a partial accumulation is dropped
            ended = self.streaming and self.step < self.max_steps
            if ended and self.batch_in_epoch % accum:
                self.optimizer.zero_grad(set_to_none=True)
            if self.batch_in_epoch >= self.steps_per_epoch * accum or done or ended:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                final = self.epoch >= self.num_epochs or done
                if final or self.epoch % cfg.ckpt_every_epochs == 0:
                    self.save()
                self._epoch_end(final)
        bar.close()
        if loss_mean is not None:
            last_loss = float(loss_mean)
        # stopped by train.max_steps with epochs left (a stream's short epochs are not a stop)
        stopped_early = self.epoch < self.num_epochs and self.step < self.total_steps
        if stopped_early:
            self.save()  # stopped by max_steps: keep the exact place to resume from
            if self.evaluator is not None:
                self._evaluate(self.epoch)
        if self.fsdp is not None:
            replica = self.fsdp.gather(self.step)
            if replica is not None:
                self.task.model = replica
        self.logger.close()
        ev = self.evaluator
        evaluations, best = (ev.history, ev.best) if ev is not None else ([], None)
        return TrainResult(
            self.step, self.epoch, last_loss, stopped_early, history, evaluations, best
        )

    def _log_eval(self, record: dict[str, Any], step: int) -> None:
        self.logger.log(record, step=step, prefix="eval")

    def _evaluate(self, epoch: float) -> None:
        """The evaluation, on rank 0 with the full weights; every rank enters (FSDP gathers)."""
        with self.full_model():
            if is_main():
                meta = self.task.metadata()
                self.evaluator.run(self.task.model, step=self.step, epoch=epoch, metadata=meta)

    def _epoch_end(self, final: bool) -> None:
        """After an epoch's checkpoint: its evaluation when one is due, then ``on_epoch_end`` on
        rank 0 with the full weights; every rank enters."""
        ev = self.evaluator
        if ev is not None and ev.due_after_epoch(self.epoch, final=final):
            self._evaluate(self.epoch)
        if self.on_epoch_end is not None:
            with self.full_model():
                if is_main():
                    self.on_epoch_end(self.epoch, final)

    def _nonfinite(self, loss: torch.Tensor) -> None:
        """A non-finite loss or gradient norm: stop (``train.on_nonfinite=stop``), or skip this
        optimizer step (``skip``, at most ``train.max_skipped_steps`` times). A skipped step
        still counts in the schedule, as GradScaler's skipped steps do."""
        cfg, where = self.cfg, f"at step {self.step}, epoch {self.epoch}"
        if cfg.on_nonfinite == "skip" and self.skipped_steps < cfg.max_skipped_steps:
            self.skipped_steps += 1
            if self.scaler is not None:
                self.scaler.update()  # closes this step's unscale_
            if is_main():
                print(f"mimkit: non-finite loss or gradient {where}: step skipped "
                      f"({self.skipped_steps} of at most {cfg.max_skipped_steps})",
                      file=sys.stderr, flush=True)  # fmt: skip
            return
        limit = (
            f"; train.on_nonfinite=skip had skipped {self.skipped_steps}, the most "
            f"train.max_skipped_steps={cfg.max_skipped_steps} allows"
            if cfg.on_nonfinite == "skip"
            else " (train.on_nonfinite=skip skips such steps instead)"
        )
        raise NonFiniteLossError(
            f"non-finite loss or gradient (loss {float(loss)}) {where}: the optimizer step was "
            f"not taken; the last checkpoint is intact (try a lower optim.lr or set "
            f"optim.clip_grad){limit}"
        )

    def _optimizer_step(self, loss: torch.Tensor) -> float:
        lr = schedule_lr(
            getattr(self.optim_cfg, "schedule", "cosine"),
            self.step,
            lr=self.optim_cfg.lr,
            min_lr=self.optim_cfg.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )
        set_lr(self.optimizer, lr)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        finite = torch.isfinite(loss)
        if self.optim_cfg.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.clip_grad)
            if hasattr(norm, "full_tensor"):  # FSDP: a DTensor of the global norm
                norm = norm.full_tensor()
            if self.scaler is None:  # fp16: overflowing gradients are the scaler's to skip
                finite = finite & torch.isfinite(norm)
        if not all_agree(finite, self.device):  # every rank skips, or none does
            self._nonfinite(loss)
        elif self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
            self.amp_skipped_steps += int(self.scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.task.after_step(self.step)
        return lr
