"""Data: datasets, reproducible transforms, views and loaders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mimkit.config import DataConfig
from mimkit.data.datasets import (
    BadImageError,
    BadImagePolicy,
    FashionMNIST,
    ImageFolder,
    SyntheticImages,
    read_idx,
)
from mimkit.data.dense import (
    ADE20K_NUM_CLASSES,
    MOSAIC_CLASSES,
    CocoDetection,
    FashionMosaic,
    SegmentationFolder,
)
from mimkit.data.dense_transforms import (
    DenseView,
    DetectTransform,
    SegmentTransform,
    detection_collate,
    segmentation_collate,
)
from mimkit.data.labels import (
    class_balanced_subset,
    dataset_labels,
    holdout_split,
    labeled_subset,
)
from mimkit.data.transforms import (
    BEiTTransform,
    EvalTransform,
    FinetuneTransform,
    PretrainTransform,
    WithMask,
)
from mimkit.data.views import AugmentedView, ResumableSampler, sample_seed

__all__ = [
    "ADE20K_NUM_CLASSES",
    "MOSAIC_CLASSES",
    "SKIP_REPORT",
    "AugmentedView",
    "BEiTTransform",
    "BadImageError",
    "BadImagePolicy",
    "CocoDetection",
    "DenseView",
    "DetectTransform",
    "EvalTransform",
    "FashionMNIST",
    "FashionMosaic",
    "FinetuneTransform",
    "ImageFolder",
    "PretrainTransform",
    "ResumableSampler",
    "SegmentTransform",
    "SegmentationFolder",
    "SyntheticImages",
    "WithMask",
    "bad_image_policy",
    "build_dataset",
    "class_balanced_subset",
    "dataset_labels",
    "dataset_stats",
    "detection_collate",
    "holdout_split",
    "labeled_subset",
    "make_loader",
    "read_idx",
    "sample_seed",
    "segmentation_collate",
]


SKIP_REPORT = "skipped_images.jsonl"  # in the run directory: the images that were skipped


def bad_image_policy(cfg: DataConfig, report: str | Path | None) -> BadImagePolicy:
    """``data.bad_images`` / ``data.max_bad_images``, listing skipped files in ``report``."""
    return BadImagePolicy(cfg.bad_images, cfg.max_bad_images, report)


def build_dataset(
    cfg: DataConfig,
    *,
    img_size: int,
    channels: int,
    split: str | None = None,
    report: str | Path | None = None,
) -> Dataset:
    """The raw dataset (uint8 images, int labels) of ``cfg``; ``split`` overrides cfg.split.

    An image folder handles undecodable files by ``data.bad_images`` / ``data.max_bad_images``,
    listing the skipped ones in ``report`` (:class:`~mimkit.data.datasets.BadImagePolicy`)."""
    split = split or cfg.split
    if cfg.name == "fashion_mnist":
        return FashionMNIST(cfg.root, split, cfg.max_samples if split == cfg.split else None)
    if cfg.name == "folder":
        policy = bad_image_policy(cfg, report)
        return ImageFolder(cfg.root, channels=channels, max_samples=cfg.max_samples, policy=policy)
    if cfg.name == "synthetic":
        size = cfg.synthetic_size
        if cfg.max_samples:
            size = min(size, cfg.max_samples)
        seed = 0 if split == "train" else 1
        return SyntheticImages(size, img_size=img_size, channels=channels, seed=seed)
    raise ValueError(f"unknown dataset {cfg.name!r}")


def dataset_stats(cfg: DataConfig, dataset: Dataset) -> tuple[list[float], list[float]]:
    """Normalization mean/std: the config's when given, else the dataset's own."""
    mean = cfg.mean if cfg.mean is not None else list(dataset.mean)
    std = cfg.std if cfg.std is not None else list(dataset.std)
    return list(mean), list(std)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: torch.utils.data.Sampler,
    num_workers: int,
    drop_last: bool,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    # an explicit generator keeps the loader from drawing on the global RNG (exact resume)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        collate_fn=collate_fn,
    )
