"""Why does Fashion-MNIST pretraining help classification so much more than the mosaic tasks?

A diagnostic for ``benchmarks/dense_mosaic.py``: it measures how well a frozen encoder's tokens
name the items of mosaic canvases. For each condition (canvas size, items per canvas, item scale)
it runs the encoder on ``--train`` training and ``--test`` test canvases (no augmentation; the
position tables interpolated to the canvas, as ``mimkit segment`` does), averages block
``--block``'s patch tokens over each item's mask (weighted by the mask's coverage of each patch),
standardizes, and fits a multinomial logistic regression (L-BFGS, a small L2 penalty) on the
training items. The figure is test-item top-1 (%). The first condition (one item at its native
28 px on a 28 px canvas) is the pretraining's own setting; the last is the mosaic recipe's::

    python benchmarks/mosaic_item_probe.py --init runs/mae_vit_tiny_fmnist_long none
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from dense_mosaic import SCRATCH  # the from-scratch ViT of the dense benchmark (same folder)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "segment" / "fmnist_mosaic_vit_tiny.yaml"
# (label, overrides): from the pretraining's setting to the mosaic recipe's
CONDITIONS = [
    ("1 item, 28 px canvas, scale 1", ["data.canvas=28", "model.img_size=28",
                                       "data.items=[1,1]", "data.item_scale=[1,1]"]),
    ("1 item, 56 px canvas, scale 1", ["data.items=[1,1]", "data.item_scale=[1,1]"]),
    ("1-3 items, 56 px canvas, scale 1", ["data.item_scale=[1,1]"]),
    ("1-3 items, 56 px canvas, scale 0.5-1.25 (the recipe)", []),
]  # fmt: skip


@torch.no_grad()
def _items(encoder, dataset, transform, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask-pooled tokens (K, D), item labels 0..9 (K,)) of the first ``n`` canvases."""
    from mimkit.models.features import _block_maps

    feats, labels = [], []
    for start in range(0, n, 100):
        batch = [dataset[i] for i in range(start, min(n, start + 100))]
        imgs = torch.stack([transform(img, t)[0] for img, t in batch])
        maps = _block_maps(encoder, imgs, [block])[0]  # (B, D, h, w)
        for (_, target), fmap in zip(batch, maps, strict=True):
            for mask, label in zip(target["masks"], target["labels"], strict=True):
                w = F.adaptive_avg_pool2d(mask[None].float(), fmap.shape[-2:])[0]  # (h, w)
                feats.append((fmap * w).sum((1, 2)) / w.sum())
                labels.append(int(label) - 1)  # mosaic labels are class + 1
    return torch.stack(feats), torch.tensor(labels)


def _logistic_top1(xtr, ytr, xte, yte, num_classes: int = 10) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * (lin(xte).argmax(1) == yte).float().mean().item()


def probe(init: str, overrides: list[str], *, block: int, train: int, test: int) -> dict:
    from mimkit.config import load_config
    from mimkit.config.dense import SegmentConfig
    from mimkit.data.dense_transforms import SegmentTransform
    from mimkit.tasks.dense import dense_data, load_dense_encoder

    model = SCRATCH if init == "none" else [f"model.init={init}"]
    cfg = load_config(RECIPE, [*model, *overrides], schema=SegmentConfig)
    torch.manual_seed(0)  # the random initialization of "none"
    encoder = load_dense_encoder(cfg).encoder.eval()
    data = dense_data(cfg.data, channels=cfg.model.in_chans)
    tf = SegmentTransform(size=cfg.model.img_size, mean=data.mean, std=data.std, train=False)
    block = block if block >= 0 else encoder.depth + block
    xtr, ytr = _items(encoder, data.train, tf, train, block)
    xte, yte = _items(encoder, data.eval, tf, test, block)
    return {"top1": _logistic_top1(xtr, ytr, xte, yte), "train_items": len(ytr),
            "test_items": len(yte), "block": block + 1}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", nargs="+", required=True, help="encoders; 'none' = random init")
    ap.add_argument("--block", type=int, default=-1, help="block whose tokens are read")
    ap.add_argument("--train", type=int, default=1500, help="training canvases")
    ap.add_argument("--test", type=int, default=300, help="test canvases")
    ap.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for init in args.init:
        for label, overrides in CONDITIONS:
            r = probe(init, overrides, block=args.block, train=args.train, test=args.test)
            results.setdefault(init, {})[label] = r
            print(f"{init:40s} {label:55s} {r['top1']:5.1f}% ({r['test_items']} test items)",
                  flush=True)  # fmt: skip
    lines = ["| condition | " + " | ".join(args.init) + " |", "|---" * (len(args.init) + 1) + "|"]
    for label, _ in CONDITIONS:
        cells = [f"{results[i][label]['top1']:.1f}" for i in args.init]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "table.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
