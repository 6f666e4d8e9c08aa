"""``mimkit detect``: object detection (and instance segmentation) with a pretrained ViT backbone.

ViTDet (Li et al. 2022), which MAE's detection results use: a simple feature pyramid built from the
backbone's last feature map (deconvolutions for 4x and 2x, identity, max-pooling for 0.5x; one
block per scale as an option) feeding torchvision's Faster R-CNN, or Mask R-CNN where masks exist.
Inputs are fixed square canvases of ``model.img_size`` (resized on the longer side and padded, as
ViTDet), so the backbone's position tables are interpolated once. Layer-wise lr decay (0.7 for
ViT-B in ViTDet), AdamW, warm-up then cosine. COCO-style mAP from torchmetrics (pycocotools'
evaluation), at the network's input resolution. ``figures/detection.png``: predicted boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mimkit.config.dense import DetectConfig
from mimkit.data.dense_transforms import DenseView, DetectTransform, detection_collate
from mimkit.engine.distributed import sync_batchnorm
from mimkit.engine.rundir import prepare_run, record_resolved
from mimkit.engine.task import StepOutput
from mimkit.models.detection import Detector, build_detector
from mimkit.tasks.dense import (
    DenseResult,
    DenseTask,
    dense_data,
    dense_metadata,
    load_dense_encoder,
    run_dense,
)
from mimkit.tasks.downstream import pretraining_normalization

__all__ = ["DetectTask", "build_detector_from_config", "evaluate_detector", "run_detect"]

_TARGET_KEYS = ("boxes", "labels", "masks")


def _to(targets: list[dict], device: torch.device, *, masks: bool) -> list[dict]:
    keys = _TARGET_KEYS if masks else _TARGET_KEYS[:2]
    return [{k: t[k].to(device) for k in keys if k in t} for t in targets]


class DetectTask(DenseTask):
    """The trainer's task: (images, targets) -> the sum of the R-CNN losses."""

    name = "detect"

    def __init__(self, model: Detector, *, masks: bool, metadata: dict[str, Any]) -> None:
        super().__init__(model, metadata=metadata)
        self.masks = masks

    def step(self, batch: Any) -> StepOutput:
        images, targets = batch  # list of (C, S, S) in [0, 1], list of target dicts
        images = [img.to(self.device) for img in images]
        losses = self.model(images, _to(targets, self.device, masks=self.masks))
        loss = sum(losses.values())
        return StepOutput(loss, {k: v.detach() for k, v in losses.items()})


def build_detector_from_config(
    cfg: DetectConfig, *, num_classes: int, mean: list[float], std: list[float]
):
    """(detector, loaded encoder): ``model.init`` at ``model.img_size`` under ViTDet's pyramid."""
    loaded = load_dense_encoder(cfg)
    h = cfg.head
    model = build_detector(
        loaded.encoder,
        num_classes=num_classes,
        img_size=cfg.model.img_size,
        mean=mean,
        std=std,
        masks=bool(h.masks),
        out_channels=h.out_channels,
        scales=tuple(h.scales),
        out_indices=tuple(h.out_indices) if h.out_indices is not None else None,
        anchor_sizes=tuple(h.anchor_sizes) if h.anchor_sizes is not None else None,
        representation_size=h.representation_size,
        box_detections_per_img=h.detections_per_img,
        rpn_batch_size_per_image=h.rpn_batch_size_per_image,
        box_batch_size_per_image=h.box_batch_size_per_image,
        rpn_pre_nms_top_n=(h.rpn_pre_nms_top_n[0], h.rpn_pre_nms_top_n[1]),
        rpn_post_nms_top_n=(h.rpn_post_nms_top_n[0], h.rpn_post_nms_top_n[1]),
    )
    return model, loaded


@torch.no_grad()
def evaluate_detector(
    model: Detector,
    loader: DataLoader,
    *,
    device: torch.device,
    masks: bool = False,
    classes: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """COCO-style box (and mask) mAP, percent, from torchmetrics' ``MeanAveragePrecision``
    (pycocotools' evaluation): ``box_map`` (AP at IoU 0.50:0.95), ``box_map_50``, ``box_map_75``,
    by object size, and per class. Boxes are mapped back to the original image's pixels (targets'
    ``scale``); crowd regions (``iscrowd``) are ignored and the size buckets use the annotated
    ``area`` when the targets carry them (COCO); masks are compared at the input resolution."""
    from torchmetrics.detection import MeanAveragePrecision

    iou_type = ("bbox", "segm") if masks else "bbox"
    # under torchrun rank 0 evaluates alone: no gathering across processes
    metric = MeanAveragePrecision(iou_type=iou_type, class_metrics=True, sync_on_compute=False)
    was = model.training
    model.eval()
    for images, targets in loader:
        outs = model([img.to(device) for img in images])
        preds, truths = [], []
        for out, t in zip(outs, targets, strict=True):
            p = {k: out[k].cpu() for k in ("boxes", "scores", "labels")}
            g = {"boxes": t["boxes"], "labels": t["labels"]}
            if "iscrowd" in t:  # COCO: crowd regions ignored, size buckets by annotated area
                g |= {"iscrowd": t["iscrowd"], "area": t["area"]}
            if t.get("scale", 1.0) != 1.0:  # boxes back in the original image's pixels
                p["boxes"], g["boxes"] = p["boxes"] / t["scale"], g["boxes"] / t["scale"]
            if masks:
                p["masks"] = out["masks"][:, 0].cpu() > 0.5  # (N, 1, H, W) probabilities
                g["masks"] = t["masks"].bool()
            preds.append(p)
            truths.append(g)
        metric.update(preds, truths)
    model.train(was)
    res = metric.compute()
    prefixes = ("bbox_", "segm_") if masks else ("",)
    out: dict[str, Any] = {}
    for prefix in prefixes:
        name = "box" if prefix in ("", "bbox_") else "mask"
        for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
            v = float(res[f"{prefix}{key}"])
            out[key.replace("map", f"{name}_map")] = v * 100 if v >= 0 else None
    # per-class box AP (torchmetrics lists the classes it saw)
    ids = res["classes"].flatten().tolist()
    per_class = res[f"{prefixes[0]}map_per_class"].flatten().tolist()
    names = classes or ()
    out["box_ap_per_class"] = {
        (names[i] if 0 <= i < len(names) else str(i)): (round(v * 100, 2) if v >= 0 else None)
        for i, v in zip(ids, per_class, strict=True)
    }
    return out


def run_detect(cfg: DetectConfig, *, resume: bool = False) -> DenseResult:
    """Train and evaluate a detector as ``cfg`` says; write everything to ``cfg.run.dir``."""
    e, d, h = cfg.model, cfg.data, cfg.head
    run_dir, device = prepare_run(cfg, resume=resume, ddp_only="mimkit detect")
    mean, std = pretraining_normalization(e.init)
    data = dense_data(d, channels=e.in_chans, mean=mean, std=std)
    record_resolved(run_dir, {"data.mean": list(data.mean), "data.std": list(data.std)})
    model, loaded = build_detector_from_config(
        cfg, num_classes=data.num_classes, mean=data.mean, std=data.std
    )
    model, bn_note = sync_batchnorm(model.to(device), device)  # none in the default detector
    meta = dense_metadata(cfg, loaded, data, kind="detector")
    meta["layout"] = "torchvision-rcnn"
    task = DetectTask(model, masks=bool(h.masks), metadata=meta)
    train_view = DenseView(
        data.train,
        DetectTransform(size=e.img_size, train=True, scale=tuple(d.scale), hflip=d.hflip),
        seed=cfg.run.seed,
    )
    eval_view = DenseView(data.eval, DetectTransform(size=e.img_size, train=False))
    eval_loader = DataLoader(
        eval_view,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=d.num_workers,
        collate_fn=detection_collate,
    )

    def evaluate(model: Detector) -> dict[str, Any]:
        return evaluate_detector(
            model, eval_loader, device=device, masks=bool(h.masks), classes=data.classes
        )

    def figure(folder: Path) -> None:
        from mimkit.viz import save_detection_figure

        n = min(cfg.eval.figure_images, len(eval_view))
        samples = [eval_view[i] for i in range(n)]
        was = model.training
        model.eval()
        with torch.no_grad():
            outs = model([img.to(device) for img, _ in samples])
        model.train(was)
        save_detection_figure(
            [img for img, _ in samples],
            [{k: v.cpu() for k, v in o.items()} for o in outs],
            [t for _, t in samples],
            folder / "detection.png",
            classes=data.classes,
            score_threshold=h.score_threshold,
            title=f"{'Mask' if h.masks else 'Faster'} R-CNN on {e.method} ({e.init or 'scratch'})",
        )

    notes = [
        *loaded.notes,
        *([bn_note] if bn_note else []),
        f"{len(data.train)} training / {len(data.eval)} evaluation images, "
        f"{data.num_classes - 1} classes + background, "
        f"{'Mask' if h.masks else 'Faster'} R-CNN on a simple feature pyramid",
    ]
    return run_dense(
        cfg,
        run_dir=run_dir,
        device=device,
        resume=resume,
        task=task,
        train_view=train_view,
        collate_fn=detection_collate,
        evaluate=evaluate,
        primary="box_map",
        save_figure=figure,
        notes=notes,
    )
