"""What ``mimkit segment`` and ``mimkit detect`` share.

The data (the Fashion-MNIST mosaic, ADE20K's folder layout, COCO annotations), the encoder loaded
at the task's resolution (position embeddings and relative position tables interpolated, the final
norm dropped since the heads read block outputs), and the training run: the trainer's evaluation
every ``eval.every_epochs`` / ``eval.every_steps`` keeps ``model_last`` and ``model_best`` (by the
task's primary metric: mIoU, box mAP) with their metrics in ``eval.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from mimkit.config import ConfigError, to_dict
from mimkit.config.dense import DenseDataConfig, DetectConfig, SegmentConfig
from mimkit.data.dense import CocoDetection, FashionMosaic, SegmentationFolder
from mimkit.engine.distributed import is_main
from mimkit.engine.evaluation import BEST_FILE, LAST_FILE, Evaluation
from mimkit.engine.task import TaskHooks
from mimkit.engine.trainer import Trainer, TrainResult
from mimkit.tasks.downstream import LoadedEncoder, downstream_provenance, load_encoder

__all__ = [
    "DenseData",
    "DenseResult",
    "DenseTask",
    "dense_data",
    "dense_metadata",
    "load_dense_encoder",
    "run_dense",
]


@dataclasses.dataclass
class DenseData:
    train: Dataset  # (uint8 image (C, H, W), target dict) pairs
    eval: Dataset
    num_classes: int  # segmentation: label values 0..K-1; detection: K incl. background (0)
    classes: tuple[str, ...]
    mean: list[float]
    std: list[float]
    ignore_index: int


class DenseTask(TaskHooks):
    """What the segment and detect tasks share for the trainer: the model's own state dict as the
    checkpoint and provenance metadata. Subclasses give ``name`` and ``step``."""

    def __init__(self, model: torch.nn.Module, *, metadata: dict[str, Any]) -> None:
        self.model, self._meta = model, metadata
        self.device = next(model.parameters()).device

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def metadata(self) -> dict[str, Any]:
        return self._meta


def _first(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def dense_data(
    d: DenseDataConfig,
    *,
    channels: int,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DenseData:
    """Training and evaluation sets of ``d``; normalization: data.mean/std, else ``mean``/``std``
    (the pretraining's), else the dataset's."""
    try:
        if d.name == "fashion_mosaic":
            common = {
                "canvas": d.canvas,
                "items": tuple(d.items),
                "scale": tuple(d.item_scale),
                "seed": d.mosaic_seed,
            }
            train = FashionMosaic(d.root, "train", size=d.train_size, **common)
            evals = FashionMosaic(d.root, "test", size=d.eval_size, **common)
        elif d.name == "ade20k":
            common = {
                "reduce_zero_label": d.reduce_zero_label,
                "ignore_index": d.ignore_index,
                "channels": channels,
                "num_classes": d.num_classes,
            }
            train = SegmentationFolder(d.root, d.train_split, **common)
            evals = SegmentationFolder(d.root, d.eval_split, **common)
        else:  # coco
            common = {"channels": channels, "masks": d.masks}
            train = CocoDetection(d.root, d.ann_file, **common)
            # COCO's evaluation keeps crowd regions (detections on them are not counted)
            evals = CocoDetection(
                d.eval_root or d.root, d.eval_ann_file, skip_crowd=False, **common
            )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data ({d.name}): {err}") from None
    if d.name == "coco" and (train.classes, train.cat_ids) != (evals.classes, evals.cat_ids):
        raise ConfigError(
            f"data.ann_file and data.eval_ann_file have different categories: "
            f"{list(train.classes)[:8]} vs {list(evals.classes)[:8]}"
        )
    mean = list(d.mean) if d.mean is not None else mean
    std = list(d.std) if d.std is not None else std
    return DenseData(
        train=_first(train, d.max_samples),
        eval=_first(evals, d.eval_max_samples),
        num_classes=int(train.num_classes),
        classes=tuple(train.classes),
        mean=list(mean if mean is not None else train.mean),
        std=list(std if std is not None else train.std),
        ignore_index=d.ignore_index,
    )


def load_dense_encoder(cfg: SegmentConfig | DetectConfig) -> LoadedEncoder:
    """``model.init`` at ``model.img_size`` (tables interpolated); the final norm is dropped: the
    heads read block outputs (BEiT's segmentation backbone, ViTDet)."""
    return load_encoder(cfg.model, drop_norm=True)


def dense_metadata(
    cfg: SegmentConfig | DetectConfig, loaded: LoadedEncoder, data: DenseData, *, kind: str
) -> dict[str, Any]:
    e = cfg.model
    meta = downstream_provenance(
        kind, e, loaded, classes=data.classes, mean=data.mean, std=data.std,
        dataset=cfg.data.name, epochs=cfg.train.epochs,
    )  # fmt: skip
    meta.update(
        num_classes=data.num_classes,
        head=to_dict(cfg.head),
        max_steps=cfg.train.max_steps,
        model_config={k: v for k, v in to_dict(e.model_config()).items() if k != "decoder"},
    )
    return meta


@dataclasses.dataclass
class DenseResult:
    run_dir: Path
    train: TrainResult
    best: dict[str, Any]  # the best evaluation (step, epoch, metrics)
    last: dict[str, Any]
    best_path: Path | None
    last_path: Path | None
    notes: list[str]
    history: list[dict[str, Any]]


def run_dense(
    cfg: SegmentConfig | DetectConfig,
    *,
    run_dir: Path,
    device: torch.device,
    resume: bool,
    task: DenseTask,
    train_view: Dataset,
    collate_fn: Callable,
    evaluate: Callable[[torch.nn.Module], dict[str, Any]],
    primary: str,
    save_figure: Callable[[Path], None],
    notes: list[str],
) -> DenseResult:
    """Train ``task``, scored by ``evaluate(model)`` (a metrics dict holding ``primary``) every
    ``eval.every_epochs`` / ``eval.every_steps``; then its figure and the curves."""
    evaluation = Evaluation(
        evaluate=evaluate,
        metric=primary,
        every_epochs=cfg.eval.every_epochs,
        every_steps=cfg.eval.every_steps,
    )
    trainer = Trainer(
        task,
        train_view,
        optim=cfg.optim,
        train=cfg.train,
        run_dir=run_dir,
        device=device,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        evaluation=evaluation,
        collate_fn=collate_fn,
    )
    if is_main():
        for note in notes:
            print(f"{task.name}: {note}", flush=True)
    if resume:
        trainer.resume()
    result = trainer.fit()
    if is_main():
        from mimkit.viz import save_eval_curves

        save_figure(run_dir / "figures")
        save_eval_curves(
            run_dir, task.name, metric=primary, title=f"evaluation {primary}", label="eval"
        )
    best_path, last_path = run_dir / BEST_FILE, run_dir / LAST_FILE
    hist = result.evaluations
    return DenseResult(
        run_dir,
        result,
        result.best or {},
        hist[-1] if hist else {},
        best_path if best_path.exists() else None,
        last_path if last_path.exists() else None,
        notes,
        hist,
    )
