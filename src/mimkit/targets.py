"""Patchify / unpatchify and pixel targets (pure functions).

Patch vectors are laid out (p, p, C) row-major, as the official MAE code and Hugging Face's ViTMAE,
so a decoder trained here predicts in their layout.
"""

from __future__ import annotations

import torch

__all__ = ["denormalize_patches", "normalize_patches", "patchify", "pixel_target", "unpatchify"]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) with N = (H/p) * (W/p)."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
    x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None
):
    """(B, N, p*p*C) -> (B, C, H, W); ``grid`` = (h, w) patches, square when omitted."""
    b, n, _ = x.shape
    p = patch_size
    if grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    x = x.reshape(b, h, w, p, p, channels)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(b, channels, h * p, w * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6):
    """Per-patch normalization (MAE "normalized pixels"): returns (normalized, mean, std)."""
    mean = patches.mean(dim=-1, keepdim=True)  # (B, N, 1)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as the official code
    std = (var + eps) ** 0.5
    return (patches - mean) / std, mean, std


def denormalize_patches(pred: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6):
    """Map norm-pix predictions back to pixels using the statistics of ``reference`` patches."""
    _, mean, std = normalize_patches(reference, eps)
    return pred * std + mean


def pixel_target(imgs: torch.Tensor, patch_size: int, *, norm_pix: bool) -> torch.Tensor:
    """The MAE regression target, (B, N, p*p*C)."""
    target = patchify(imgs, patch_size)
    return normalize_patches(target)[0] if norm_pix else target
