"""Dataset views that apply transforms reproducibly, and a resumable distributed sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["AugmentedView", "ResumableSampler", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index) (SplitMix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        2**64 - 1
    )
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


class AugmentedView(Dataset):
    """``(transform(image, generator), label)`` generator seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable, *, seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        # explicit: indexing past the end is a repeated augmentation, never an IndexError
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # i >= len: a repeat of image i % len (repeated augmentation), augmented by its own seed
        img, label = self.base[i % len(self.base)]
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        return self.transform(img, g), label


class ResumableSampler(Sampler[int]):
    """A seeded, epoch-dependent shuffle, split across ranks, that can start mid-epoch.

    Like ``DistributedSampler`` (rank r takes every world_size-th index of one permutation; the
    tail is dropped so every rank gets the same count), plus ``set_start(k)``: skip the first k
    indices of this rank's share, so a resumed run continues with the very next batch.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        repeats: int = 1,
    ) -> None:
        if size < world_size:
            raise ValueError(f"dataset of {size} samples is smaller than world size {world_size}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.size, self.seed, self.shuffle, self.repeats = size, seed, shuffle, repeats
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.per_rank = size // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.repeats > 1:  # DeiT's repeated augmentation: k copies of each image, k views
            # copy c of image i is index i + c * size (the view reads image i, seeded apart);
            # consecutive copies go to consecutive ranks; an epoch keeps its length
            order = [i + c * self.size for i in order for c in range(self.repeats)]
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
