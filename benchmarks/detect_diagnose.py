"""Where does a detector's box mAP go: finding objects, or naming them?

For trained ``mimkit detect`` runs (their ``config.yaml`` and ``model_last.safetensors``) this
evaluates the same test set four ways, all COCO-style box AP at IoU 0.50:0.95 from torchmetrics:

- ``box_map``: as ``mimkit detect`` reports it (``evaluate_detector``);
- ``agnostic_map``: every class merged into one (truth and predictions) -- how well objects are
  found and boxed, whatever their class;
- ``oracle_class_map``: each prediction relabelled with the class of the truth box it overlaps
  most (IoU >= 0.5; others keep theirs) -- the mAP the detector would get if it never confused
  classes;
- ``gt_box_acc``: the RoI head's classification on the truth boxes themselves (argmax over the
  object classes) -- naming alone, with localization removed;
- ``probe_initial`` / ``probe_tuned``: a linear classifier (L-BFGS, standardized features) on
  the encoder's last block averaged over each truth box (RoIAlign), fitted on the training
  canvases' boxes and scored on the test canvases' -- how much the encoder offers the detector's
  classifier before fine-tuning (the pretrained weights, or a random initialization for runs
  from scratch) and after it.

The two rescored mAPs are computed at the network's input resolution and, on COCO data, do not
set crowd regions aside as ``box_map`` does. ``oracle_class_map - box_map`` is what
classification costs, ``agnostic_map`` bounds what localization allows. Several runs are
compared side by side and, with ``--group``, averaged over seeds (run directories named
``<method>_s<seed>``, as ``benchmarks/dense_mosaic.py`` writes)::

    python benchmarks/detect_diagnose.py runs/dense_250/detect/*_s? --group \\
        --out benchmarks/results/dense_mosaic/detect_diagnosis_1000.md
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchvision.ops import box_iou


def _load(run: Path):
    from mimkit.config import load_config
    from mimkit.config.dense import DetectConfig
    from mimkit.data.dense_transforms import DenseView, DetectTransform, detection_collate
    from mimkit.tasks.dense import dense_data
    from mimkit.tasks.detect import build_detector_from_config
    from mimkit.tasks.downstream import pretraining_normalization

    cfg = load_config(run / "config.yaml", schema=DetectConfig)
    mean, std = pretraining_normalization(cfg.model.init)
    data = dense_data(cfg.data, channels=cfg.model.in_chans, mean=mean, std=std)

    def build():
        torch.manual_seed(cfg.run.seed)
        model, _ = build_detector_from_config(
            cfg, num_classes=data.num_classes, mean=data.mean, std=data.std
        )
        return model.eval()

    initial = build()  # before fine-tuning (the pretrained weights, or a random initialization)
    model = copy.deepcopy(initial)
    model.load_state_dict(load_file(str(run / "model_last.safetensors")))
    loaders = [
        DataLoader(
            DenseView(split, DetectTransform(size=cfg.model.img_size, train=False)),
            batch_size=50,
            shuffle=False,
            collate_fn=detection_collate,
        )
        for split in (data.train, data.eval)
    ]
    return model, initial, loaders[0], loaders[1]


@torch.no_grad()
def _box_features(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last block, RoIAlign-averaged over each truth box: (N, D) and labels."""
    from torchvision.ops import roi_align

    from mimkit.models.features import ViTFeatures

    rcnn = model.model
    enc = rcnn.backbone.encoder
    last_block = ViTFeatures(enc, out_indices=[enc.depth - 1])
    feats, labels = [], []
    for images, targets in loader:
        (fmap,) = last_block(rcnn.transform(images)[0].tensors)
        boxes = [t["boxes"] for t in targets]
        scale = 1 / enc.patch_size
        pooled = roi_align(fmap, boxes, output_size=7, spatial_scale=scale, aligned=True)
        feats.append(pooled.mean(dim=(2, 3)))
        labels.append(torch.cat([t["labels"] for t in targets]))
    return torch.cat(feats), torch.cat(labels)


def probe(model, train_loader, eval_loader, *, steps: int = 300) -> float:
    """Accuracy (%) of a linear classifier on the encoder's box features, trained on the
    training canvases' truth boxes, tested on the test canvases': what the encoder offers the
    detector's classifier."""
    xtr, ytr = _box_features(model, train_loader)
    xte, yte = _box_features(model, eval_loader)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float((lin(xte).argmax(1) == yte).float().mean())


def labels_from_truth(pred: dict, truth: dict, iou: float = 0.5) -> torch.Tensor:
    """``pred``'s labels, each replaced by the label of the truth box it overlaps most when that
    overlap is at least ``iou`` (the classification oracle)."""
    labels = pred["labels"].clone()
    if len(truth["boxes"]) and len(pred["boxes"]):
        best, j = box_iou(pred["boxes"], truth["boxes"]).max(dim=1)
        hit = best >= iou
        labels[hit] = truth["labels"][j[hit]]
    return labels


@torch.no_grad()
def diagnose(run: Path) -> dict[str, float]:
    from torchmetrics.detection import MeanAveragePrecision

    from mimkit.tasks.detect import evaluate_detector

    model, initial, train_loader, loader = _load(run)
    # the run's own metric, by the code that reported it
    box_map = evaluate_detector(model, loader, device=torch.device("cpu"))["box_map"]
    rcnn = model.model
    metrics = {k: MeanAveragePrecision(iou_type="bbox") for k in ("agnostic", "oracle")}
    correct = total = 0
    for images, targets in loader:
        outs = rcnn(images)
        truths, agn_p, agn_t, orc_p = [], [], [], []
        for out, t in zip(outs, targets, strict=True):
            p = {k: out[k] for k in ("boxes", "scores", "labels")}
            g = {"boxes": t["boxes"], "labels": t["labels"]}
            truths.append(g)
            agn_p.append(p | {"labels": torch.ones_like(p["labels"])})
            agn_t.append(g | {"labels": torch.ones_like(g["labels"])})
            orc_p.append(p | {"labels": labels_from_truth(p, g)})
        metrics["agnostic"].update(agn_p, agn_t)
        metrics["oracle"].update(orc_p, truths)
        # the RoI head on the truth boxes: classification with localization taken away
        image_list, _ = rcnn.transform(images)
        feats = rcnn.backbone(image_list.tensors)
        boxes = [t["boxes"] for t in targets]
        pooled = rcnn.roi_heads.box_roi_pool(feats, boxes, image_list.image_sizes)
        logits, _ = rcnn.roi_heads.box_predictor(rcnn.roi_heads.box_head(pooled))
        guess = logits[:, 1:].argmax(dim=1) + 1  # object classes only
        truth = torch.cat([t["labels"] for t in targets])
        correct += int((guess == truth).sum())
        total += len(truth)
    res = {k: float(m.compute()["map"]) * 100 for k, m in metrics.items()}
    return {
        "box_map": box_map,
        "agnostic_map": res["agnostic"],
        "oracle_class_map": res["oracle"],
        "gt_box_acc": 100.0 * correct / max(total, 1),
        "probe_initial": probe(initial, train_loader, loader),
        "probe_tuned": probe(model, train_loader, loader),
    }


COLUMNS = (
    "box_map",
    "agnostic_map",
    "oracle_class_map",
    "gt_box_acc",
    "probe_initial",
    "probe_tuned",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="detect run directories")
    ap.add_argument("--group", action="store_true", help="mean ± std over <method>_s<seed> runs")
    ap.add_argument("--out", type=Path, help="write the table (markdown) and a .json beside it")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, float]] = {}
    for run in args.runs:
        if not (run / "model_last.safetensors").is_file():
            print(f"skip {run}: no model_last.safetensors", file=sys.stderr)
            continue
        rows[str(run)] = diagnose(run)
        print(run, {k: round(v, 2) for k, v in rows[str(run)].items()}, flush=True)
    groups: dict[str, list[dict[str, float]]] = {}
    for name, r in rows.items():
        key = re.sub(r"_s\d+$", "", Path(name).name) if args.group else name
        groups.setdefault(key, []).append(r)
    head = (
        "| run | n | box mAP | class-agnostic mAP | mAP, classes from truth "
        "| RoI head acc. on truth boxes | linear probe on truth boxes: encoder before "
        "| ... after fine-tuning |"
    )
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for key, rs in groups.items():
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in rs]
            sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.2f}{sd}")
        lines.append(f"| {key} | {len(rs)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
