"""``mimkit eval``: score a classifier checkpoint on a split, training nothing (the official
repos' ``--eval``).

Any classifier mimkit reads: a mimkit fine-tuning (``model_best.safetensors``), an official MAE /
BEiT fine-tuned checkpoint or a timm / Hugging Face classifier once converted with
``mimkit convert`` (safetensors with its head). The recipe is a fine-tuning recipe: its
``model.*`` says the architecture (null keys come from the checkpoint), ``data.*`` the split
(``data.eval_split`` or ``data.eval_root``) and the normalization (``data.mean/std``, else the
checkpoint's, else the data set's); ``train.precision`` the autocast of the forward passes.
Writes ``eval.json`` (and the resolved ``config.yaml``) to ``run.dir``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimkit.config import ConfigError, save_config
from mimkit.config.downstream import FinetuneConfig
from mimkit.data import SKIP_REPORT, AugmentedView, EvalTransform
from mimkit.engine.distributed import pick_device
from mimkit.tasks.downstream import classify_data, pretraining_normalization
from mimkit.tasks.finetune import build_classifier

__all__ = ["EvalResult", "run_eval"]


@dataclass
class EvalResult:
    run_dir: Path
    split: str
    metrics: dict[str, Any]  # top1, top5 (percent), loss, num_images
    logits: torch.Tensor | None  # (M, C) float32, when asked for
    labels: torch.Tensor | None


def _eval_dir(cfg: Any) -> Path:
    """``run.dir`` for the evaluation's own files; never a training run's (its eval.json and
    config.yaml would be overwritten, and its --resume refused)."""
    run_dir = Path(cfg.run.dir)
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run.dir={str(run_dir)!r} holds a training run (checkpoints/, metrics.jsonl): "
            "mimkit eval writes its own eval.json and config.yaml, give it a run.dir of its own "
            "(e.g. run.dir=runs/eval)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_eval(cfg: FinetuneConfig, *, keep_logits: bool = False) -> EvalResult:
    """Score ``cfg.model.init`` on the evaluation split of ``cfg.data`` (see the module)."""
    e = cfg.model
    if e.init is None:
        raise ConfigError("model.init=None is not allowed: mimkit eval scores a checkpoint")
    from mimkit.models.loading import load_encoder_weights

    head = load_encoder_weights(e.init).head
    if "head.weight" not in head:
        raise ConfigError(
            f"model.init={e.init!r} has no classifier head (head.weight): mimkit eval scores a "
            "fine-tuned classifier (a pretrained encoder: mimkit linprobe or knn)"
        )
    num_classes = int(head["head.weight"].shape[0])
    if e.num_classes not in (None, num_classes):
        raise ConfigError(
            f"model.num_classes={e.num_classes} is not allowed: the checkpoint's head has "
            f"{num_classes} classes"
        )
    e.pool = "avg" if "fc_norm.weight" in head else "cls"  # as the checkpoint was trained
    run_dir = _eval_dir(cfg)
    device = pick_device(cfg.run.device)
    mean, std = pretraining_normalization(e.init)
    data = classify_data(cfg.data, img_size=e.img_size, channels=e.in_chans, seed=cfg.run.seed,
                         mean=mean, std=std, report=run_dir / SKIP_REPORT)  # fmt: skip
    model, _, notes = build_classifier(cfg, num_classes=num_classes)
    for note in notes:
        print(f"eval: {note}", flush=True)
    model.to(device).eval()
    view = AugmentedView(
        data.eval, EvalTransform(e.img_size, data.mean, data.std, cfg.data.eval_crop_pct)
    )
    loader = torch.utils.data.DataLoader(view, batch_size=cfg.train.batch_size,
                                         num_workers=cfg.data.num_workers)  # fmt: skip
    bf16 = cfg.train.precision in ("bf16", "fp16")
    dtype = torch.float16 if cfg.train.precision == "fp16" else torch.bfloat16
    logits, labels = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=bf16):
        for imgs, y in loader:
            logits.append(model(imgs.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    out, y = torch.cat(logits), torch.cat(labels)
    top = out.topk(min(5, out.shape[1]), dim=1).indices
    hits = top == y[:, None]
    metrics = {
        "top1": 100.0 * float(hits[:, 0].float().mean()),
        "top5": 100.0 * float(hits.any(dim=1).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(out, y)),
        "num_images": len(y),
    }
    split = str(cfg.data.eval_root) if cfg.data.name == "folder" else cfg.data.eval_split
    record = {"split": split, **metrics, "weights": str(e.init), "precision": cfg.train.precision,
              "classes": num_classes, "pool": e.pool}  # fmt: skip
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "eval.json").write_text(json.dumps({"eval": record}, indent=2) + "\n")
    return EvalResult(run_dir, split, metrics, out if keep_logits else None,
                      y if keep_logits else None)  # fmt: skip


def run_dense_eval(cfg: Any) -> EvalResult:
    """Score a segmenter (``SegmentConfig``: mIoU, pixel accuracy) or a detector (``DetectConfig``:
    box / mask mAP) checkpoint written by ``mimkit segment`` / ``detect`` on the recipe's
    evaluation split, with the head it was trained with (from the checkpoint's provenance);
    ``eval.json`` in ``run.dir``, nothing trained."""
    from mimkit.config.dense import SegmentConfig
    from mimkit.data.dense_transforms import (
        DenseView,
        DetectTransform,
        SegmentTransform,
        detection_collate,
        segmentation_collate,
    )
    from mimkit.engine import checkpoint as ckpt
    from mimkit.models.loading import find_checkpoint
    from mimkit.tasks.dense import dense_data

    seg = isinstance(cfg, SegmentConfig)
    kind = "segmenter" if seg else "detector"
    e, d = cfg.model, cfg.data
    if e.init is None:
        raise ConfigError("model.init=None is not allowed: mimkit eval scores a checkpoint")
    file = find_checkpoint(e.init)
    meta = ckpt.read_metadata(file)
    if meta.get("kind") != kind:
        raise ConfigError(
            f"model.init={e.init!r} holds a {meta.get('kind', 'checkpoint without provenance')}, "
            f"not a {kind}: give the model_best.safetensors of a `mimkit "
            f"{'segment' if seg else 'detect'}` run"
        )
    for key, value in (meta.get("head") or {}).items():  # the head it was trained with
        if hasattr(cfg.head, key):
            setattr(cfg.head, key, value)
    run_dir = _eval_dir(cfg)
    device = pick_device(cfg.run.device)
    data = dense_data(d, channels=e.in_chans, mean=meta.get("mean"), std=meta.get("std"))
    if data.num_classes != meta.get("num_classes", data.num_classes):
        raise ConfigError(
            f"data.name={d.name!r} has {data.num_classes} classes, the {kind} in "
            f"{file} was trained on {meta['num_classes']}"
        )
    init, e.init = e.init, None  # the architecture alone; every weight comes from the file
    try:
        if seg:
            from mimkit.tasks.segment import build_segmenter, evaluate_segmenter

            model, _ = build_segmenter(cfg, num_classes=data.num_classes)
        else:
            from mimkit.tasks.detect import build_detector_from_config, evaluate_detector

            model, _ = build_detector_from_config(cfg, num_classes=data.num_classes,
                                                  mean=data.mean, std=data.std)  # fmt: skip
    finally:
        e.init = init
    state, _ = ckpt.load_weights(file)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    if seg:
        common = {"size": e.img_size, "mean": data.mean, "std": data.std,
                  "ignore_index": d.ignore_index}  # fmt: skip
        tf = SegmentTransform(**common, train=False, eval_short_side=d.eval_short_side)
        view = DenseView(data.eval, tf)
        batch = cfg.eval.batch_size if d.name == "fashion_mosaic" else 1
        loader = torch.utils.data.DataLoader(view, batch_size=batch, shuffle=False,
                                             num_workers=d.num_workers,
                                             collate_fn=segmentation_collate)  # fmt: skip
        metrics = evaluate_segmenter(
            model, loader, num_classes=data.num_classes, ignore_index=d.ignore_index,
            size=e.img_size, mode=cfg.eval.mode, stride=cfg.eval.stride, device=device,
            classes=data.classes,
        )  # fmt: skip
    else:
        view = DenseView(data.eval, DetectTransform(size=e.img_size, train=False))
        loader = torch.utils.data.DataLoader(view, batch_size=cfg.eval.batch_size, shuffle=False,
                                             num_workers=d.num_workers,
                                             collate_fn=detection_collate)  # fmt: skip
        metrics = evaluate_detector(model, loader, device=device, masks=bool(cfg.head.masks),
                                    classes=data.classes)  # fmt: skip
    metrics["num_images"] = len(view)
    record = {"split": d.name, **metrics, "weights": str(init), "kind": kind}
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "eval.json").write_text(json.dumps({"eval": record}, indent=2) + "\n")
    return EvalResult(run_dir, d.name, metrics, None, None)
