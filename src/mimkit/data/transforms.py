"""Transforms whose randomness comes from an explicit generator.

Per-sample randomness is a function of (seed, epoch, index) (see :mod:`mimkit.data.views`), so a
resumed run, any number of data-loader workers, or another rank sees exactly the same pixels.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "BEiTTransform",
    "EvalTransform",
    "FinetuneTransform",
    "PretrainTransform",
    "WithMask",
    "crop_params",
    "seeded_globals",
]


def crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn from ``generator``.

    Same rule as torchvision: 10 tries of area ~ U(scale) and log-uniform aspect ratio, then a
    central crop clamped to ``ratio``.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(
            torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        )
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """MAE pretraining augmentation: random resized crop, horizontal flip, normalize."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        self.img_size, self.mean, self.std = img_size, list(mean), list(std)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (C, H, W) -> normalized float (C, S, S)."""
        top, left, h, w = crop_params(
            img.shape[-2], img.shape[-1], self.scale, self.ratio, generator
        )
        x = TF.to_dtype(img, torch.float32, scale=True)
        x = TF.resized_crop(
            x, top, left, h, w, [self.img_size, self.img_size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        if torch.rand(1, generator=generator).item() < self.hflip:
            x = TF.horizontal_flip(x)
        return TF.normalize(x.clamp(0, 1), self.mean, self.std)


class EvalTransform:
    """Deterministic: resize the short side to ``img_size / crop_pct`` (bicubic), center crop
    ``img_size``, normalize. ``crop_pct`` is timm's: 0.875 (resize to 256, crop 224) is the
    official MAE / BEiT / DeiT ImageNet evaluation; 1.0 keeps the whole image."""

    def __init__(
        self, img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
    ) -> None:
        self.img_size, self.mean, self.std, self.crop_pct = (
            img_size,
            list(mean),
            list(std),
            crop_pct,
        )

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = TF.to_dtype(img, torch.float32, scale=True)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size) or self.crop_pct != 1.0:
            scale = math.floor(self.img_size / self.crop_pct)  # timm's transforms_factory
            x = TF.resize(x, [scale], interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, [self.img_size, self.img_size]).clamp(0, 1)
        return TF.normalize(x, self.mean, self.std)


def _jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter (brightness, contrast, and saturation for RGB) with factors ~ U(1 ± s)."""
    if strength <= 0:
        return x

    def factor() -> float:
        return 1.0 + (2 * torch.rand(1, generator=generator).item() - 1) * strength

    x = TF.adjust_brightness(x, factor())
    x = TF.adjust_contrast(x, factor())
    if x.shape[0] == 3:
        x = TF.adjust_saturation(x, factor())
    return x.clamp(0, 1)


class BEiTTransform:
    """BEiT's two views of one crop, plus the sample's mask (BEiT Sec. 2.5 and Appendix).

    One random resized crop (after colour jitter, with a flip) is resized twice: the patch view
    for the ViT (``img_size``, bicubic, normalized) and the tokenizer view (``tokenizer_size``,
    Lanczos, in [0, 1]), as the official code. The mask comes from ``mask_fn(generator) -> (N,)
    bool`` so it is reproducible too.
    """

    def __init__(
        self,
        img_size: int,
        tokenizer_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        mask_fn,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
    ) -> None:
        self.img_size, self.tokenizer_size = img_size, tokenizer_size
        self.mean, self.std, self.mask_fn = list(mean), list(std), mask_fn
        self.scale, self.ratio, self.hflip, self.color_jitter = (
            tuple(scale),
            tuple(ratio),
            hflip,
            color_jitter,
        )

    def __call__(self, img: torch.Tensor, generator: torch.Generator):
        """uint8 (C, H, W) -> (patch view (C, S, S), tokenizer view (C, T, T), mask (N,) bool)."""
        x = _jitter(TF.to_dtype(img, torch.float32, scale=True), self.color_jitter, generator)
        top, left, h, w = crop_params(x.shape[-2], x.shape[-1], self.scale, self.ratio, generator)
        if torch.rand(1, generator=generator).item() < self.hflip:
            x = TF.horizontal_flip(x)
            left = x.shape[-1] - left - w
        patch = TF.resized_crop(
            x, top, left, h, w, [self.img_size, self.img_size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        ).clamp(0, 1)  # fmt: skip
        size = [self.tokenizer_size, self.tokenizer_size]
        if x.shape[0] in (1, 3):  # resized with Lanczos on a PIL image, as the official code
            pil = TF.to_pil_image((x * 255).round().to(torch.uint8))
            lanczos = InterpolationMode.LANCZOS
            tok = TF.resized_crop(pil, top, left, h, w, size, interpolation=lanczos)
            tok = TF.to_dtype(TF.pil_to_tensor(tok), torch.float32, scale=True)  # (C, T, T)
        else:  # other channel counts have no PIL mode: bicubic on the tensor
            bicubic = InterpolationMode.BICUBIC
            tok = TF.resized_crop(x, top, left, h, w, size, interpolation=bicubic, antialias=True)
            tok = tok.clamp(0, 1)
        return TF.normalize(patch, self.mean, self.std), tok, self.mask_fn(generator)


class WithMask:
    """``(transform(img, g), mask_fn(g))``: a view plus the sample's own mask (e.g. blockwise)."""

    def __init__(self, transform, mask_fn) -> None:
        self.transform, self.mask_fn = transform, mask_fn

    def __call__(self, img: torch.Tensor, generator: torch.Generator):
        return self.transform(img, generator), self.mask_fn(generator)


@contextlib.contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators, and restore them afterwards.

    timm's augmentations (RandAugment, random erasing, Mixup) draw from the global generators;
    seeding them from the sample's own generator keeps per-sample randomness a function of
    (seed, epoch, index) without disturbing anyone else's random stream.
    """
    # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding, which
    # records a stack trace on every call (a third of the data path's time on CPU)
    cpu = torch.default_generator
    py, npy, pt = random.getstate(), np.random.get_state(), cpu.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    cpu.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        cpu.set_state(pt)


def _at_least_one_bit(level_fn):
    def clamped(magnitude, hparams):
        return tuple(max(1, int(v)) for v in level_fn(magnitude, hparams))

    return clamped


class FinetuneTransform:
    """Fine-tuning augmentation (DeiT, BEiT, MAE): random resized crop, flip, RandAugment,
    normalize, random erasing, with timm's operators."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        remode: str = "pixel",
    ) -> None:
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.random_erasing import RandomErasing

        self.crop = PretrainTransform(
            img_size, [0.0] * len(mean), [1.0] * len(std), scale=scale, ratio=ratio, hflip=hflip
        )
        self.mean, self.std = list(mean), list(std)
        fill = tuple(round(255 * m) for m in mean)
        self.rand_augment = (
            rand_augment_transform(
                rand_augment,
                {
                    "translate_const": int(img_size * 0.45),
                    "img_mean": fill if len(fill) > 1 else fill[0],
                },
            )
            if rand_augment
            else None
        )
        if self.rand_augment is not None:
            for op in self.rand_augment.ops:
                if "Posterize" in op.name and op.level_fn is not None:
                    # timm maps the top (or, with magnitude noise, the bottom) level to 0 bits,
                    # which current Pillow refuses: keep at least 1 bit
                    op.level_fn = _at_least_one_bit(op.level_fn)
        self.erase = (
            RandomErasing(reprob, mode=remode, max_count=1, device="cpu") if reprob > 0 else None
        )

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (C, H, W) -> normalized float (C, S, S)."""
        x = self.crop(img, generator)  # in [0, 1]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if self.rand_augment is None and self.erase is None:
            return TF.normalize(x, self.mean, self.std)  # nothing draws from the globals
        with seeded_globals(seed):
            if self.rand_augment is not None:
                pil = TF.to_pil_image((x * 255).round().to(torch.uint8))
                x = TF.to_dtype(TF.pil_to_tensor(self.rand_augment(pil)), torch.float32, scale=True)
            x = TF.normalize(x, self.mean, self.std)
            if self.erase is not None:
                x = self.erase(x)
        return x
