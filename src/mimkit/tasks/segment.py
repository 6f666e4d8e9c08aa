"""``mimkit segment``: semantic segmentation with a pretrained ViT backbone.

BEiT Sec. 3.2 / Table 7: the backbone (MAE or BEiT weights, position tables interpolated to the
task's input size) with the SETR-PUP task layer (progressive upsampling) or UperNet over four
blocks (the official BEiT segmentation code), layer-wise lr decay (0.65), AdamW, warm-up then
linear decay; per-pixel cross-entropy with an ignore index, plus an auxiliary FCN head (weight
0.4). Metrics from torchmetrics at the labels' resolution: mIoU (mean over classes that occur in
the truth or the prediction), per-class IoU and pixel accuracy; whole-image or sliding-window
inference. ``figures/segmentation.png``: image | truth | prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mimkit.config.dense import SegmentConfig
from mimkit.data.dense_transforms import DenseView, SegmentTransform, segmentation_collate
from mimkit.engine.distributed import sync_batchnorm
from mimkit.engine.rundir import prepare_run, record_resolved
from mimkit.engine.task import StepOutput
from mimkit.models.segmentation import Segmenter, slide_inference, whole_inference
from mimkit.tasks.dense import (
    DenseResult,
    DenseTask,
    dense_data,
    dense_metadata,
    load_dense_encoder,
    run_dense,
)
from mimkit.tasks.downstream import pretraining_normalization

__all__ = ["SegmentTask", "build_segmenter", "evaluate_segmenter", "run_segment"]


class SegmentTask(DenseTask):
    """The trainer's task: (images, label maps) -> cross-entropy (+ auxiliary head)."""

    name = "segment"

    def __init__(
        self, model: Segmenter, *, ignore_index: int, aux_weight: float, metadata: dict[str, Any]
    ) -> None:
        super().__init__(model, metadata=metadata)
        self.ignore_index, self.aux_weight = ignore_index, aux_weight

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
        # mean over labeled pixels; a crop with none (all ignore_index) gives 0, not NaN
        total = F.cross_entropy(
            logits.float(), labels, ignore_index=self.ignore_index, reduction="sum"
        )
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def step(self, batch: Any) -> StepOutput:
        imgs, labels = batch  # (B, C, H, W), (B, H, W)
        imgs, labels = imgs.to(self.device), labels.to(self.device)
        out = self.model(imgs, with_aux=True)  # a call of the model: DDP sees it
        loss = main = self.loss(out.logits, labels)
        logs = {}
        if out.aux_logits is not None and self.aux_weight > 0:
            aux = self.loss(out.aux_logits, labels)
            loss = main + self.aux_weight * aux
            logs = {"loss_main": main.detach(), "loss_aux": aux.detach()}
        return StepOutput(loss, logs)


def build_segmenter(cfg: SegmentConfig, *, num_classes: int):
    """(segmenter, loaded encoder): ``model.init`` at ``model.img_size`` under the chosen head."""
    loaded = load_dense_encoder(cfg)
    h = cfg.head
    model = Segmenter(
        loaded.encoder,
        num_classes=num_classes,
        head=h.kind,
        out_indices=tuple(h.out_indices) if h.out_indices is not None else None,
        channels=h.channels,
        aux_channels=h.aux_channels if h.aux_weight > 0 else None,
    )
    return model, loaded


@torch.no_grad()
def predict_logits(
    model: nn.Module, imgs: torch.Tensor, *, size: int, mode: str, stride: int, num_classes: int
) -> torch.Tensor:
    """Logits (B, K, H, W) for images of any size: resized to ``size`` ("whole") or covered by
    ``size`` windows at ``stride`` ("slide", mmsegmentation's sliding-window inference)."""
    if mode == "slide":
        return slide_inference(model, imgs, window=size, stride=stride, num_classes=num_classes)
    if tuple(imgs.shape[-2:]) == (size, size):
        return model(imgs)
    return whole_inference(model, imgs, size=size)


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    ignore_index: int,
    size: int,
    mode: str = "whole",
    stride: int | None = None,
    device: torch.device,
    classes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy (percent, torchmetrics) over ``loader``.

    IoU is accumulated over the whole set (intersection and union summed over images, as
    mmsegmentation); classes absent from both truth and prediction are left out of the mean.
    Predictions are made at the input's size and compared at the label's resolution.
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    # under torchrun rank 0 evaluates alone: no gathering across processes
    local = {"ignore_index": ignore_index, "sync_on_compute": False}
    iou = MulticlassJaccardIndex(
        num_classes, average="none", zero_division=float("nan"), **local
    ).to(device)
    acc = MulticlassAccuracy(num_classes, average="micro", **local).to(device)
    was = model.training
    model.eval()
    stride = stride or max(1, size * 2 // 3)
    for imgs, labels in loader:
        imgs, labels = imgs.to(device), labels.to(device)  # (B, C, h, w), (B, H, W)
        logits = predict_logits(
            model, imgs, size=size, mode=mode, stride=stride, num_classes=num_classes
        )
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)  # (B, H, W)
        iou.update(pred, labels)
        acc.update(pred, labels)
    model.train(was)
    per_class = iou.compute().cpu() * 100  # (K,), NaN: class absent from truth and prediction
    names = classes or tuple(str(i) for i in range(num_classes))
    return {
        "mIoU": float(per_class.nanmean()),
        "pixel_acc": float(acc.compute()) * 100,
        "per_class_iou": {
            n: (None if torch.isnan(v) else round(float(v), 2))
            for n, v in zip(names, per_class, strict=True)
        },
    }


def run_segment(cfg: SegmentConfig, *, resume: bool = False) -> DenseResult:
    """Train and evaluate a segmenter as ``cfg`` says; write everything to ``cfg.run.dir``."""
    e, d = cfg.model, cfg.data
    run_dir, device = prepare_run(cfg, resume=resume, ddp_only="mimkit segment")
    mean, std = pretraining_normalization(e.init)  # the encoder sees what it was trained on
    data = dense_data(d, channels=e.in_chans, mean=mean, std=std)
    record_resolved(run_dir, {"data.mean": list(data.mean), "data.std": list(data.std)})
    model, loaded = build_segmenter(cfg, num_classes=data.num_classes)
    model, bn_note = sync_batchnorm(model.to(device), device)  # SyncBN under torchrun on GPUs
    meta = dense_metadata(cfg, loaded, data, kind="segmenter")
    task = SegmentTask(
        model, ignore_index=d.ignore_index, aux_weight=cfg.head.aux_weight, metadata=meta
    )
    common = {
        "size": e.img_size,
        "mean": data.mean,
        "std": data.std,
        "ignore_index": d.ignore_index,
    }
    train_view = DenseView(
        data.train,
        SegmentTransform(**common, train=True, scale=tuple(d.scale), hflip=d.hflip),
        seed=cfg.run.seed,
    )
    eval_view = DenseView(
        data.eval, SegmentTransform(**common, train=False, eval_short_side=d.eval_short_side)
    )
    # ADE20K's images differ in size: one per batch
    eval_batch = cfg.eval.batch_size if d.name == "fashion_mosaic" else 1
    eval_loader = DataLoader(
        eval_view,
        batch_size=eval_batch,
        shuffle=False,
        num_workers=d.num_workers,
        collate_fn=segmentation_collate,
    )
    ev = cfg.eval

    def evaluate(model: Segmenter) -> dict[str, Any]:
        return evaluate_segmenter(
            model,
            eval_loader,
            num_classes=data.num_classes,
            ignore_index=d.ignore_index,
            size=e.img_size,
            mode=ev.mode,
            stride=ev.stride,
            device=device,
            classes=data.classes,
        )

    def figure(folder: Path) -> None:
        from mimkit.viz import save_segmentation_figure

        n = min(ev.figure_images, len(eval_view))
        samples = [(img, t["semantic"]) for img, t in (eval_view[i] for i in range(n))]
        was = model.training
        model.eval()
        preds = []
        for img, label in samples:
            logits = predict_logits(
                model,
                img[None].to(device),
                size=e.img_size,
                mode=ev.mode,
                stride=ev.stride or max(1, e.img_size * 2 // 3),
                num_classes=data.num_classes,
            )
            logits = F.interpolate(logits, label.shape[-2:], mode="bilinear", align_corners=False)
            preds.append(logits.argmax(1)[0].cpu())
        model.train(was)
        save_segmentation_figure(
            [img for img, _ in samples],
            [label for _, label in samples],
            preds,
            folder / "segmentation.png",
            classes=data.classes,
            mean=data.mean,
            std=data.std,
            ignore_index=d.ignore_index,
            title=f"{cfg.head.kind} on {e.method} ({e.init or 'scratch'})",
        )

    notes = [
        *loaded.notes,
        *([bn_note] if bn_note else []),
        f"{len(data.train)} training / {len(data.eval)} evaluation images, "
        f"{data.num_classes} classes, head {cfg.head.kind}",
    ]
    return run_dense(
        cfg,
        run_dir=run_dir,
        device=device,
        resume=resume,
        task=task,
        train_view=train_view,
        collate_fn=segmentation_collate,
        evaluate=evaluate,
        primary="mIoU",
        save_figure=figure,
        notes=notes,
    )
