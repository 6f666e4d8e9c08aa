"""Labels of a dataset, and seeded class-balanced label subsets (``data.label_fraction``)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["class_balanced_subset", "dataset_labels", "holdout_split", "labeled_subset"]


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The (M,) int64 labels of a mimkit dataset (-1 for unlabeled images), without decoding."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    if hasattr(dataset, "labels"):
        return torch.as_tensor(dataset.labels, dtype=torch.int64)
    if hasattr(dataset, "samples"):
        return torch.tensor([label for _, label in dataset.samples], dtype=torch.int64)
    if hasattr(dataset, "num_classes") and hasattr(dataset, "size"):  # SyntheticImages
        return torch.arange(len(dataset)) % dataset.num_classes
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


def class_balanced_subset(labels: torch.Tensor, fraction: float, *, seed: int) -> torch.Tensor:
    """Sorted indices of ``round(fraction * n_c)`` (at least 1) random samples of every class c.

    Only labeled samples (label >= 0) are drawn; the choice depends only on (labels, fraction,
    seed), so every method of a comparison sees the same labels.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    if not keep:
        raise ValueError("the dataset has no labeled samples (images must be in class subfolders)")
    return torch.cat(keep).sort().values


def labeled_subset(dataset: Dataset, *, fraction: float = 1.0, seed: int = 0) -> Subset:
    """The labeled samples of ``dataset`` (a class-balanced ``fraction`` of them)."""
    labels = dataset_labels(dataset)
    if fraction >= 1:
        idx = torch.nonzero(labels >= 0).flatten()
        if len(idx) == 0:
            raise ValueError(
                "the dataset has no labeled samples (images must be in class subfolders)"
            )
    else:
        idx = class_balanced_subset(labels, fraction, seed=seed)
    return Subset(dataset, idx.tolist())


def holdout_split(subset: Subset, fraction: float, *, seed: int) -> tuple[Subset, Subset]:
    """(train, validation): a seeded, class-balanced ``fraction`` of ``subset``'s samples (at least
    one of every class) held out for validation, the rest for training; disjoint, and a function
    of (labels, fraction, seed) only. Every class keeps at least one training sample."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    labels = dataset_labels(subset)
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            raise ValueError(
                f"class {c} has {len(idx)} labeled sample: a validation split needs at least 2 "
                "per class (raise the label fraction or set val_fraction=0)"
            )
        n = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    val = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    indices = torch.as_tensor(subset.indices)
    return (
        Subset(subset.dataset, indices[keep].tolist()),
        Subset(subset.dataset, indices[val].tolist()),
    )
