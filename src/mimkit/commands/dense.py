"""``mimkit segment`` and ``mimkit detect``: dense tasks with a pretrained ViT
(:mod:`mimkit.tasks.segment`, :mod:`mimkit.tasks.detect`)."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command, print_skipped, print_stopped_early, resume_requested

__all__ = ["COMMANDS"]


def report(r, figure: str) -> None:
    """The closing summary of a segmentation or detection run."""
    print(f"\nrun directory: {r.run_dir}")
    print(f"  steps {r.train.step}, epochs {r.train.epoch}, last loss {r.train.loss:.4f}")
    for which, rec, path in (("best", r.best, r.best_path), ("last", r.last, r.last_path)):
        if rec:
            shown = ", ".join(
                f"{k} {v:.2f}"
                for k, v in rec.items()
                if isinstance(v, float) and k not in ("epoch",) and "_map_" not in k[4:]
            )
            print(f"  {which} (epoch {rec['epoch']:g}): {shown}: {path}")
    print(f"  metrics: {r.run_dir / 'metrics.jsonl'}, {r.run_dir / 'eval.json'}")
    print(f"  figures: {r.run_dir / 'figures' / figure}, {r.run_dir / 'figures'}/*_curves.png")
    print_skipped(r.run_dir)
    print_stopped_early(r.train, r.run_dir)


def run_segment(args: argparse.Namespace, cfg) -> int:
    """Train and evaluate a segmenter."""
    from mimkit.tasks.segment import run_segment as run

    report(run(cfg, resume=resume_requested(args, cfg)), "segmentation.png")
    return 0


def run_detect(args: argparse.Namespace, cfg) -> int:
    """Train and evaluate a detector."""
    from mimkit.tasks.detect import run_detect as run

    report(run(cfg, resume=resume_requested(args, cfg)), "detection.png")
    return 0


COMMANDS = (
    Command(
        "segment",
        help="semantic segmentation with a pretrained ViT (UperNet or SETR-PUP)",
        description="Semantic segmentation (BEiT Sec. 3.2): the ViT of model.init (position "
        "tables interpolated to model.img_size) under UperNet (four blocks) or SETR-PUP, "
        "layer-wise lr decay, warm-up then linear decay; mIoU, per-class IoU and pixel "
        "accuracy with whole-image or sliding-window inference. Data: the Fashion-MNIST mosaic "
        "or ADE20K's folder layout. Writes config.yaml, metrics.jsonl, eval.json, "
        "checkpoints/, model_best / model_last.safetensors and figures/segmentation.png to "
        "run.dir.",
        schema="mimkit.config.dense:SegmentConfig",
        run=run_segment,
        resume=True,
        dry_run="dense_plan",
    ),
    Command(
        "detect",
        help="object detection with a pretrained ViT (ViTDet pyramid + Faster/Mask R-CNN)",
        description="Detection (ViTDet): a simple feature pyramid from the ViT of model.init "
        "feeding torchvision's Faster R-CNN, or Mask R-CNN where masks exist; COCO-style box "
        "(and mask) mAP. Data: the Fashion-MNIST mosaic or COCO-format annotations. Writes "
        "config.yaml, metrics.jsonl, eval.json, checkpoints/, model_best / "
        "model_last.safetensors and figures/detection.png to run.dir.",
        schema="mimkit.config.dense:DetectConfig",
        run=run_detect,
        resume=True,
        dry_run="dense_plan",
    ),
)
