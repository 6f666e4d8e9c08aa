"""Pretraining health: is a long run learning? Scored while it trains, on held-out images.

Every ``eval.health.every_epochs`` epochs (and at the end) the pretraining model is scored on
``eval.health.images`` images of the evaluation split (Fashion-MNIST's test split, the k-NN test
folder, or a synthetic set of its own seed; an image folder without one is scored on its first
images, and the records say ``health_split: train``):

- ``health_loss``: the pretraining loss on them, with fixed seeded masks (MAE: the
  reconstruction error; BEiT: the masked-token cross-entropy, and ``health_mim_acc``);
- ``health_feature_std``: the spread of the encoder's mean-pooled features across images (near
  zero: collapsed features, every image mapped to one point);
- ``health_knn_top1``: a small weighted k-NN where labels exist.

They go to ``metrics.jsonl`` and TensorBoard (through the trainer's :class:`Evaluation`, which
never draws from the training RNG, so resuming stays exact) and to
``figures/health_curves.png``. A warning is printed when the held-out loss has not improved for
``eval.health.window`` evaluations, or the features collapse; the tokenizer warns on a
collapsing codebook (:mod:`mimkit.tasks.tokenizer`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from mimkit.config import PretrainConfig
from mimkit.data import AugmentedView, EvalTransform, build_dataset
from mimkit.engine.evaluation import Evaluation
from mimkit.masking import mask_from_bool, random_masking

__all__ = ["COLLAPSED_STD", "health_evaluation"]

COLLAPSED_STD = 1e-3  # features whose spread across images is below this have collapsed


def _held_out(cfg: PretrainConfig) -> tuple[Any, str] | None:
    """(dataset, split name) of the images the run is scored on, or None (nothing to read)."""
    d, h, k, m = cfg.data, cfg.eval.health, cfg.eval.knn, cfg.model
    if d.name == "shards" and k.test_root is None:
        return None  # a stream has no random access: give eval.knn.test_root
    held = d.name in ("fashion_mnist", "synthetic") or k.test_root is not None
    data = dataclasses.replace(
        d, name="folder" if d.name == "shards" else d.name, root=k.test_root or d.root,
        max_samples=h.images, split="test" if held else d.split,
    )  # fmt: skip
    split = "test" if held else "train"
    return build_dataset(data, img_size=m.img_size, channels=m.in_chans, split=split), split


class _Watch:
    """The warnings: a held-out loss that stopped improving, collapsed features."""

    def __init__(self, window: int) -> None:
        self.window, self.losses = window, []

    def __call__(self, record: dict[str, Any]) -> None:
        self.losses.append(record["health_loss"])
        best_before = min(self.losses[: -self.window], default=None)
        recent = self.losses[-self.window :]
        if best_before is not None and min(recent) >= best_before:
            print(f"mimkit: warning: the held-out loss has not improved for {self.window} "
                  f"evaluations ({best_before:.4f} before, {recent[-1]:.4f} now): check the "
                  "learning rate and the data", file=sys.stderr, flush=True)  # fmt: skip
        if record["health_feature_std"] < COLLAPSED_STD:
            spread = record["health_feature_std"]
            print(f"mimkit: warning: the encoder's features have collapsed (spread across "
                  f"images {spread:.2e})", file=sys.stderr, flush=True)  # fmt: skip


def health_evaluation(cfg: PretrainConfig, task, *, mean, std, device) -> Evaluation | None:
    """The logged-only :class:`Evaluation` of a pretraining run's health (None when off)."""
    from mimkit.tasks.pretrain import mask_sampler

    h = cfg.eval.health
    if h.every_epochs is None:
        return None
    found = _held_out(cfg)
    if found is None:
        return None
    dataset, split = found
    view = AugmentedView(dataset, EvalTransform(cfg.model.img_size, mean, std), seed=cfg.run.seed)
    imgs = torch.stack([view[i][0] for i in range(len(view))])
    labels = torch.tensor([view[i][1] for i in range(len(view))])
    grid = cfg.model.img_size // cfg.model.patch_size
    g = torch.Generator().manual_seed(cfg.run.seed)
    sampler = mask_sampler(cfg)
    if sampler is not None:  # the pipeline's masks (blockwise, grid; BEiT's)
        bool_masks = torch.stack([sampler(g) for _ in range(len(imgs))])
        mask = mask_from_bool(bool_masks, num_masked=sampler.num_masked)
    else:  # MAE's random masks, fixed by seeded noise
        mask = random_masking(len(imgs), grid * grid, cfg.mask.ratio, generator=g)
    tok_ids = _token_targets(cfg, task, dataset, device)
    knn_train = _knn_train(cfg, mean, std) if h.knn_train and (labels >= 0).all() else None
    watch = _Watch(h.window)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        x, msk = imgs.to(device), mask._replace(**{f: getattr(mask, f).to(device)
                                                  for f in mask._fields})  # fmt: skip
        record: dict[str, Any] = {"health_held_out": int(split == "test")}
        if cfg.model.method == "mae":
            ids = None if tok_ids is None else tok_ids.to(device)
            record["health_loss"] = float(model.loss(x, model(x, mask=msk), ids))
            encoder = model.encoder
        else:
            from mimkit.models.beit import mim_pixel_loss, mim_token_loss
            from mimkit.targets import pixel_target

            out = model(x, msk)
            if tok_ids is not None:
                loss, acc = mim_token_loss(out.pred, tok_ids.to(device), out.index)
                record |= {"health_loss": float(loss), "health_mim_acc": float(acc)}
            else:
                t = pixel_target(x, cfg.model.patch_size, norm_pix=cfg.target.norm_pix)
                record["health_loss"] = float(mim_pixel_loss(out.pred, t, out.index))
            encoder = model.encoder
        feats = encoder.forward_features(x)[:, 1:].mean(1).float()  # (B, D) mean-pooled
        record["health_feature_std"] = float(feats.std(0).mean())
        if knn_train is not None:
            from mimkit.tasks.knn import knn_evaluate

            test = [(imgs[i], int(labels[i])) for i in range(len(imgs))]
            k = cfg.eval.knn
            r = knn_evaluate(encoder, knn_train, test, k=k.k, temperature=k.temperature,
                             pool="avg", device=device)  # fmt: skip
            record["health_knn_top1"] = r.top1
        model.train(was_training)
        watch(record)
        return record

    return Evaluation(evaluate=evaluate, metric=None, every_epochs=h.every_epochs, split="health")


def _token_targets(cfg: PretrainConfig, task, dataset, device) -> torch.Tensor | None:
    """Visual-token targets (BEiT, or MAE Table 1d): the tokens (B, N) of the held-out images,
    computed once."""
    if cfg.target.kind != "tokens":
        return None
    from mimkit.data import BEiTTransform

    size = task.tokenizer_meta.get("downsample", 1) * (cfg.model.img_size // cfg.model.patch_size)
    tf = BEiTTransform(cfg.model.img_size, size, [0.0] * cfg.model.in_chans,
                       [1.0] * cfg.model.in_chans, mask_fn=lambda g: torch.zeros(1),
                       scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0)  # fmt: skip
    views = torch.stack([tf(dataset[i][0], torch.Generator())[1] for i in range(len(dataset))])
    return task.target_ids(views.to(device)).cpu()


def _knn_train(cfg: PretrainConfig, mean, std):
    """The k-NN memory bank: the first ``eval.health.knn_train`` labeled training images."""
    d, m = cfg.data, cfg.model
    if d.name == "shards":
        return None
    data = dataclasses.replace(d, max_samples=cfg.eval.health.knn_train, split="train")
    base = build_dataset(data, img_size=m.img_size, channels=m.in_chans, split="train")
    return AugmentedView(base, EvalTransform(m.img_size, mean, std), seed=cfg.run.seed)
