"""Mask generators: pure, seedable functions returning one :class:`Mask` type.

Convention (all of mimkit): ``mask`` is boolean over *patch tokens only* (never the cls token),
``True`` = masked (hidden from the encoder). Shapes: B = batch, N = patches, K = kept patches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Mask", "num_visible", "random_masking"]


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
