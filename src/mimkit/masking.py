"""Mask generators: pure, seedable functions returning one :class:`Mask` type.

Convention (all of mimkit): ``mask`` is boolean over *patch tokens only* (never the cls token),
``True`` = masked (hidden from the encoder). Shapes: B = batch, N = patches, K = kept patches.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch

__all__ = [
    "Mask",
    "MaskSampler",
    "blockwise_mask",
    "grid_mask",
    "grid_step",
    "mask_from_bool",
    "num_visible",
    "random_masking",
]


class Mask(NamedTuple):
    mask: torch.Tensor  # (B, N) bool, True = masked
    ids_keep: torch.Tensor  # (B, K) long, indices of visible patches, in shuffled order
    ids_restore: (
        torch.Tensor
    )  # (B, N) long, undoes the shuffle: x_full = gather(x_shuf, ids_restore)


def num_visible(num_patches: int, ratio: float) -> int:
    """Visible patches kept by MAE: ``int(N * (1 - ratio))``, as the official code."""
    return int(num_patches * (1 - ratio))


def random_masking(
    batch_size: int,
    num_patches: int,
    ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Mask:
    """Per-sample random masking by shuffling (MAE paper, Sec. 3 "Masking" and A.1).

    Uniform noise is argsorted; the patches with the smallest noise are kept. Passing the same
    ``noise`` (B, N) reproduces a mask exactly; otherwise it is drawn from ``generator``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(
            f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}"
        )
    keep = num_visible(num_patches, ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N) ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :keep]  # (B, K)
    shuffled = torch.ones(batch_size, num_patches, dtype=torch.bool, device=noise.device)
    shuffled[:, :keep] = False
    mask = torch.gather(shuffled, 1, ids_restore)  # (B, N) back in patch order
    return Mask(mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)


def blockwise_mask(
    grid: tuple[int, int],
    num_masked: int,
    *,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    rng: random.Random | int | None = None,
    blocks: list[tuple[int, int, int, int]] | None = None,
) -> torch.Tensor:
    """Blockwise masking, Algorithm 1 of the BEiT paper, as the official generator does it.

    Repeat: draw a block area s ~ U(min_block, remaining budget) (capped by ``max_block``), an
    aspect ratio r log-uniform in (min_aspect, max_aspect = 1 / min_aspect), side lengths
    a = round(sqrt(s * r)) rows and b = round(sqrt(s / r)) columns, and a random top-left corner;
    the block is kept when it adds between 1 and the remaining budget of new patches (10 tries per
    block). Until ``num_masked`` patches are masked. If the blocks stall before that (small grids),
    the remainder is topped up with random unmasked patches, so the count is always exact.

    Returns a (h, w) bool tensor, True = masked. ``rng`` is a ``random.Random`` or a seed. If
    ``blocks`` is a list, the accepted blocks are appended to it as (top, left, rows, columns).
    """
    h, w = grid
    total = h * w
    if not 0 < num_masked < total:
        raise ValueError(f"num_masked must be in (0, {total}) for a {h}x{w} grid, got {num_masked}")
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    max_block = num_masked if max_block is None else max_block
    max_aspect = max_aspect or 1 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    mask = [[False] * w for _ in range(h)]
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            a = round(math.sqrt(area * aspect))  # rows
            b = round(math.sqrt(area / aspect))  # columns
            if not (a < h and b < w):  # strictly inside the grid, as the official code
                continue
            top, left = rng.randint(0, h - a), rng.randint(0, w - b)
            new = [
                (i, j) for i in range(top, top + a) for j in range(left, left + b) if not mask[i][j]
            ]
            if 0 < len(new) <= budget:
                for i, j in new:
                    mask[i][j] = True
                added = len(new)
                if blocks is not None:
                    blocks.append((top, left, a, b))
                break
        if added == 0:
            break
        count += added
    if count < num_masked:  # top up (BEiT v2 / BEiT-3 generators keep the count fixed likewise)
        free = [(i, j) for i in range(h) for j in range(w) if not mask[i][j]]
        for i, j in rng.sample(free, num_masked - count):
            mask[i][j] = True
    return torch.tensor(mask, dtype=torch.bool)


def grid_step(ratio: float) -> int:
    """The cell side ``s`` of grid-wise sampling for a mask ratio: one patch of every ``s x s``
    is kept, so ``ratio`` must be ``1 - 1/s**2`` (0.75: s = 2, as MAE Fig. 6; 0.889: s = 3)."""
    s = round((1 - ratio) ** -0.5) if 0 < ratio < 1 else 0
    if s < 2 or abs(1 - 1 / s**2 - ratio) > 0.01:
        raise ValueError(
            f"grid masking keeps one patch of every s x s cell: the ratio must be 1 - 1/s^2 "
            f"(0.75, 0.889, 0.9375, ...), got {ratio}"
        )
    return s


def grid_mask(grid: tuple[int, int], ratio: float) -> torch.Tensor:
    """MAE's grid-wise sampling (Fig. 6): keep the top-left patch of every ``s x s`` cell of the
    patch grid (``s`` from :func:`grid_step`); the same (h, w) bool mask for every image. A grid
    whose side is not a multiple of ``s`` keeps a little more than ``1 - ratio``."""
    s = grid_step(ratio)
    rows = torch.arange(grid[0]) % s == 0
    cols = torch.arange(grid[1]) % s == 0
    return ~(rows[:, None] & cols[None, :])


def mask_from_bool(mask: torch.Tensor, *, num_masked: int | None = None) -> Mask:
    """A :class:`Mask` from a (B, N) bool mask with the same count per row (visible first).

    Without ``num_masked`` the count is read from the values and checked (on CUDA, a wait for
    the device). The training step passes the count its mask sampler draws, so nothing is read.
    """
    n = mask.shape[1]
    if num_masked is None:
        counts = mask.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every sample must mask the same number of patches")
        num_masked = int(counts[0])
    # stable sort puts visible (False) before masked (True), each in patch order
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # (B, N)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return Mask(mask=mask, ids_keep=ids_shuffle[:, : n - num_masked], ids_restore=ids_restore)


class MaskSampler:
    """Per-sample masks inside the data pipeline: ``sampler(generator) -> (N,) bool``.

    ``strategy`` is "blockwise" (BEiT Algorithm 1), "random" (uniform, same count) or "grid"
    (:func:`grid_mask`, the same for every image: ``num_masked`` must be its count). The
    generator is the sample's own (seeded by seed, epoch, index), so masks are reproducible.
    """

    def __init__(
        self,
        strategy: str,
        grid: tuple[int, int],
        num_masked: int,
        *,
        min_block: int = 16,
        ratio: float | None = None,
    ) -> None:
        if strategy not in ("blockwise", "random", "grid"):
            raise ValueError(
                f"mask strategy must be 'blockwise', 'random' or 'grid', got {strategy!r}"
            )
        self.pattern = grid_mask(grid, ratio).flatten() if strategy == "grid" else None
        if self.pattern is not None and int(self.pattern.sum()) != num_masked:
            raise ValueError(f"the grid pattern masks {int(self.pattern.sum())}, not {num_masked}")
        n = grid[0] * grid[1]
        if not 0 < num_masked < n:
            raise ValueError(f"num_masked must be in (0, {n}), got {num_masked}")
        self.strategy, self.grid, self.num_masked = strategy, tuple(grid), num_masked
        self.min_block = min(min_block, num_masked)  # a small grid cannot hold a large block

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        n = self.grid[0] * self.grid[1]
        if self.pattern is not None:
            return self.pattern.clone()
        if self.strategy == "random":
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=generator)[: self.num_masked]] = True
            return mask
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return blockwise_mask(
            self.grid, self.num_masked, min_block=self.min_block, rng=random.Random(seed)
        ).flatten()
