"""The discrete VAE (dVAE) visual tokenizer that gives BEiT its prediction targets.

BEiT (Bao et al., 2021, Sec. 2.2 "Image Tokenizer") predicts, for each masked patch, the id of a
visual token from an image tokenizer: the discrete VAE of DALL-E (Ramesh et al., 2021, Sec. 2.1
"Stage One: Learning the Visual Codebook"). This module is a small, from-scratch version of it.

Shapes: B batch, C image channels, H x W image, K vocabulary size, h x w token grid
(``h = H / downsample``, ``w = W / downsample``), D codebook width. ``downsample`` is chosen so
that the token grid equals the ViT's patch grid, one token per patch.

- encoder: image (B, C, H, W) in [0, 1] -> logits (B, K, h, w) over the vocabulary per cell
- relaxation: Gumbel-softmax over K (Jang et al., 2017; Maddison et al., 2017), soft or
  straight-through hard one-hots (B, K, h, w)
- decoder: one-hots -> codebook vectors (B, D, h, w) -> image (B, C, H, W) in [0, 1]

Training minimizes :func:`dvae_loss` (reconstruction MSE + a weighted KL to the uniform prior, the
prior DALL-E uses in stage one) while the temperature anneals (:func:`gumbel_temperature`). After
training, :meth:`DiscreteVAE.encode` gives the token ids (B, h, w) that BEiT predicts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CodebookUsage",
    "DVAELoss",
    "DVAEOutput",
    "DiscreteVAE",
    "codebook_usage",
    "dvae_loss",
    "gumbel_temperature",
    "psnr",
]


class DVAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W) reconstruction in [0, 1]
    logits: torch.Tensor  # (B, K, h, w) unnormalized log-probabilities over the vocabulary
    soft_one_hot: torch.Tensor  # (B, K, h, w) Gumbel-softmax sample (hard one-hot if hard=True)


class DVAELoss(NamedTuple):
    total: torch.Tensor  # scalar: recon + kl_weight * kl
    recon: torch.Tensor  # scalar: mean squared error in pixel space
    kl: torch.Tensor  # scalar: KL(q || uniform), per cell, averaged over cells and batch


class CodebookUsage(NamedTuple):
    perplexity: float  # exp(entropy) of the code histogram: 1 (one code) .. K (all equally)
    fraction_used: float  # distinct codes seen / vocab_size


class _ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv3x3(relu(conv3x3(relu(x))))``, width kept."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class DiscreteVAE(nn.Module):
    """A convolutional discrete VAE: image -> token logits -> (relaxed) one-hots -> image.

    The encoder is a stem conv, then ``log2(downsample)`` stages (a stride-2 4x4 conv + ReLU, then
    ``num_resblocks`` residual blocks), then a 1x1 conv to ``vocab_size`` logits per cell. The
    decoder mixes a one-hot (soft or hard) with a learned codebook ``nn.Embedding(vocab_size,
    codebook_dim)``, applies a 1x1 conv, then ``log2(downsample)`` stages (``num_resblocks``
    residual blocks, a stride-2 4x4 transposed conv + ReLU) and a final 3x3 conv.

    The output is clamped to [0, 1] with a straight-through gradient (the value is clamped, the
    gradient is the identity's). A sigmoid output, trained with MSE, saturates: on mostly-dark
    images the decoder pushed every pixel to 0 within a few dozen Adam steps and then stopped
    learning; a plain clamp has the same dead zone for pixels pushed out of range.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        vocab_size: int = 8192,
        hidden_dim: int = 64,
        codebook_dim: int = 64,
        downsample: int = 8,
        num_resblocks: int = 1,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_chans", in_chans, 1),
            ("vocab_size", vocab_size, 2),
            ("hidden_dim", hidden_dim, 1),
            ("codebook_dim", codebook_dim, 1),
            ("num_resblocks", num_resblocks, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if downsample < 2 or not _is_power_of_two(downsample):
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        self.in_chans = in_chans
        self.vocab_size = vocab_size
        self.codebook_dim = codebook_dim
        self.downsample = downsample
        num_stages = downsample.bit_length() - 1  # log2(downsample)

        enc: list[nn.Module] = [nn.Conv2d(in_chans, hidden_dim, kernel_size=3, padding=1)]
        for _ in range(num_stages):
            enc += [
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size=4, stride=2, padding=1),
                nn.ReLU(),
            ]
            enc += [_ResBlock(hidden_dim) for _ in range(num_resblocks)]
        enc += [nn.ReLU(), nn.Conv2d(hidden_dim, vocab_size, kernel_size=1)]
        self.encoder = nn.Sequential(*enc)

        self.codebook = nn.Embedding(vocab_size, codebook_dim)
        dec: list[nn.Module] = [nn.Conv2d(codebook_dim, hidden_dim, kernel_size=1)]
        for _ in range(num_stages):
            dec += [_ResBlock(hidden_dim) for _ in range(num_resblocks)]
            dec += [
                nn.ConvTranspose2d(hidden_dim, hidden_dim, kernel_size=4, stride=2, padding=1),
                nn.ReLU(),
            ]
        dec += [nn.Conv2d(hidden_dim, in_chans, kernel_size=3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def token_grid(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an image of ``img_size`` (an int means square).

        Raises ValueError unless both sides are positive multiples of ``downsample``.
        """
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(hw) != 2 or any(s <= 0 or s % self.downsample for s in hw):
            raise ValueError(
                f"image size {img_size} must be positive and divisible by "
                f"downsample={self.downsample} on both sides"
            )
        return hw[0] // self.downsample, hw[1] // self.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"images must be (B, {self.in_chans}, H, W), got shape {tuple(images.shape)}"
            )
        self.token_grid((images.shape[2], images.shape[3]))

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> vocabulary logits (B, K, h, w)."""
        self._check_images(images)
        return self.encoder(images)  # (B, K, h, w)

    def decode_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(Soft or hard) one-hots (B, K, h, w) -> images (B, C, H, W) in [0, 1].

        A soft one-hot mixes codebook vectors with its weights; a hard one gathers one vector.
        """
        if one_hot.ndim != 4 or one_hot.shape[1] != self.vocab_size:
            raise ValueError(
                f"one_hot must be (B, {self.vocab_size}, h, w), got shape {tuple(one_hot.shape)}"
            )
        z = torch.einsum("bkhw,kd->bdhw", one_hot, self.codebook.weight)  # (B, D, h, w)
        x = self.decoder(z)  # (B, C, H, W), unbounded
        return x + (x.clamp(0.0, 1.0) - x).detach()  # values in [0, 1], identity gradient

    def forward(
        self, images: torch.Tensor, *, temperature: float, hard: bool = False
    ) -> DVAEOutput:
        """Encode, sample a Gumbel-softmax relaxation over K at ``temperature``, decode.

        ``hard=True`` is the straight-through estimator: exact one-hots in the forward pass,
        gradients of the soft sample in the backward pass.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = self.encode_logits(images)  # (B, K, h, w)
        soft_one_hot = F.gumbel_softmax(logits, tau=temperature, hard=hard, dim=1)  # (B, K, h, w)
        return DVAEOutput(
            recon=self.decode_one_hot(soft_one_hot), logits=logits, soft_one_hot=soft_one_hot
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> token ids (B, h, w), long: the argmax code per cell."""
        return self.encode_logits(images).argmax(dim=1)  # (B, h, w)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) -> images (B, C, H, W) in [0, 1], decoded from hard one-hots."""
        if ids.ndim != 3 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"ids must be an integer (B, h, w) tensor, got {ids.dtype} {ids.shape}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size})")
        dtype = self.codebook.weight.dtype
        one_hot = F.one_hot(ids.long(), self.vocab_size).to(dtype)  # (B, h, w, K)
        return self.decode_one_hot(one_hot.permute(0, 3, 1, 2))  # (B, K, h, w) -> (B, C, H, W)


def dvae_loss(
    recon: torch.Tensor, images: torch.Tensor, logits: torch.Tensor, *, kl_weight: float
) -> DVAELoss:
    """Reconstruction MSE plus ``kl_weight`` times the KL from q to the uniform prior.

    q = softmax(logits) over the vocabulary (dim 1); per cell, KL(q || U_K) = sum_k q_k log(q_k K).
    It is averaged over cells and batch. The uniform prior is DALL-E's stage-one prior
    (Ramesh et al., 2021, Sec. 2.1); the KL pushes the encoder to spread its probability mass.
    recon, images: (B, C, H, W); logits: (B, K, h, w).
    """
    if recon.shape != images.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and images {tuple(images.shape)} differ")
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, h, w), got shape {tuple(logits.shape)}")
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    rec = F.mse_loss(recon.float(), images.float())
    log_q = F.log_softmax(logits.float(), dim=1)  # (B, K, h, w)
    kl_per_cell = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=1)  # (B, h, w)
    kl = kl_per_cell.mean()
    return DVAELoss(total=rec + kl_weight * kl, recon=rec, kl=kl)


def psnr(pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / MSE)``, averaged over images.

    pred, target: (B, ...); the MSE is taken per image. Identical images give ``inf``.
    """
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (B, ...)"
        )
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (10.0 * torch.log10(data_range**2 / mse)).mean()


def codebook_usage(ids: torch.Tensor, vocab_size: int) -> CodebookUsage:
    """How the codebook is used by a set of token ids (any shape), over the flat histogram.

    perplexity = exp(entropy of the empirical code distribution), in [1, vocab_size];
    fraction_used = number of distinct codes / vocab_size.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be a non-empty integer tensor, got {ids.dtype} {ids.shape}")
    flat = ids.reshape(-1).long()  # (N,)
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:
        raise ValueError(f"ids must lie in [0, {vocab_size})")
    counts = torch.bincount(flat, minlength=vocab_size).double()  # (K,)
    p = counts[counts > 0] / counts.sum()
    entropy = -(p * p.log()).sum()
    return CodebookUsage(
        perplexity=float(entropy.exp()), fraction_used=float((counts > 0).sum()) / vocab_size
    )


def gumbel_temperature(
    step: int, *, start: float = 1.0, end: float = 1 / 16, anneal_steps: int
) -> float:
    """Gumbel-softmax temperature at ``step``: exponential from ``start`` to ``end``, then flat.

    ``tau(step) = start * (end / start) ** (min(step, anneal_steps) / anneal_steps)``. DALL-E
    annealed the relaxation temperature from 1 to 1/16 (Ramesh et al., 2021, Sec. 2.1 and App.
    A.2); a low final temperature makes the relaxation close to the hard one-hots used at
    tokenization time.
    """
    if anneal_steps < 1:
        raise ValueError(f"anneal_steps must be >= 1, got {anneal_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (start > 0 and end > 0):
        raise ValueError(f"start and end must be > 0, got start={start}, end={end}")
    frac = min(step, anneal_steps) / anneal_steps
    return start * (end / start) ** frac
