"""Write Fashion-MNIST mosaic canvases as PNG files: unlabeled images for pretraining.

The mosaic tasks' canvases (``mimkit.data.dense.FashionMosaic``: 1-3 items at scale 0.5-1.25 on
56 px) differ from Fashion-MNIST's centred 28 px items, and an encoder pretrained on the latter
names mosaic items poorly (``benchmarks/mosaic_item_probe.py``). Pretraining on the task's own
unlabeled images is the method's answer; this script makes them an image folder that
``mimkit pretrain`` reads (``data.name=folder``; labels are never written). Training canvases
come from the training split, with a seed of their own (``--seed``, default 1) so that they are
not the canvases the dense recipes train on (seed 0)::

    python benchmarks/mosaic_images.py --size 20000 --out runs/mosaic_images
    mimkit pretrain -c configs/pretrain/mae_vit_tiny_mosaic.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--size", type=int, default=20000, help="canvases")
    ap.add_argument("--canvas", type=int, default=56)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/mosaic_images"))
    args = ap.parse_args()
    from mimkit.data.dense import FashionMosaic

    ds = FashionMosaic(args.root, args.split, size=args.size, canvas=args.canvas, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        img, _ = ds[i]  # (1, H, W) uint8; the target is not written
        Image.fromarray(img[0].numpy(), mode="L").save(args.out / f"{i:06d}.png")
    print(f"{len(ds)} canvases ({args.split} split, seed {args.seed}) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
