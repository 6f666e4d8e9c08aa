"""The DALL-E discrete VAE (dVAE): the image tokenizer that BEiT predicts.

Ramesh et al., "Zero-Shot Text-to-Image Generation" (2021); used as BEiT's visual tokenizer (Bao et
al., 2021), which feeds it 112x112 images to get a 14x14 grid of token ids from an 8192-entry
vocabulary. Shapes: B batch, C image channels, H x W image, V vocabulary, h x w = H/8 x W/8 tokens
(with the published ``group_count=4``; in general the factor is ``2 ** (group_count - 1)``).

The modules are our own code laid out so that OpenAI's published weights load key for key: the
``state_dict()`` keys and shapes equal those of ``dall_e.Encoder`` / ``dall_e.Decoder`` (the
``dall-e`` package), e.g. ``blocks.input.w``, ``blocks.group_1.block_1.id_path.w``,
``blocks.group_1.block_1.res_path.conv_1.b``, ``blocks.output.conv.w``. Convolutions keep their
weight and bias as ``w`` and ``b``. OpenAI published the weights as pickles; convert them once with
:func:`mimkit.interop.dalle_pickle.convert_dalle_pickle` and load the safetensors file with
:func:`load_dalle_encoder` / :func:`load_dalle_decoder`.

Pixels go through the logit-Laplace mapping first: ``encoder(map_pixels(x))`` where ``x`` is in
[0, 1]; :meth:`DalleDecoder.decode` undoes it. Unlike ``dall_e``, which runs most convolutions in
float16 on CUDA, every convolution here runs in the parameters' dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "DalleDecoder",
    "DalleEncoder",
    "infer_dalle_config",
    "load_dalle_decoder",
    "load_dalle_encoder",
    "map_pixels",
    "unmap_pixels",
]

LOGIT_LAPLACE_EPS = 0.1  # the dVAE's logit-Laplace epsilon


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Squeeze pixels from [0, 1] into [eps, 1 - eps], the dVAE's input range (any shape)."""
    _check_eps(eps)
    if not x.is_floating_point():
        raise TypeError(f"map_pixels expects a floating-point tensor, got {x.dtype}")
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1] (any shape)."""
    _check_eps(eps)
    if not x.is_floating_point():
        raise TypeError(f"unmap_pixels expects a floating-point tensor, got {x.dtype}")
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")


class _Conv2d(nn.Module):
    """A 'same'-padded square convolution whose parameters are named ``w`` and ``b``.

    Initialized as in ``dall_e``: weight ~ N(0, 1 / (n_in * kw**2)), zero bias.
    """

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if n_in < 1 or n_out < 1:
            raise ValueError(f"channel counts must be positive, got n_in={n_in}, n_out={n_out}")
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"kernel width must be odd and positive, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))  # (out, in, kw, kw)
        self.b = nn.Parameter(torch.zeros(n_out))  # (out,)
        with torch.no_grad():
            self.w.normal_(std=1 / math.sqrt(n_in * kw**2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w, self.b
        return F.conv2d(x.to(w.dtype), w, b, padding=(self.kw - 1) // 2)


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``: a bottleneck residual block (width n_out / 4).

    ``res_path`` is relu -> conv_1 -> relu -> conv_2 -> relu -> conv_3 -> relu -> conv_4 with the
    kernel widths given (encoder: 3, 3, 3, 1; decoder: 1, 3, 3, 3). ``id_path`` is a 1x1
    convolution when the width changes and the identity otherwise. ``post_gain`` is
    ``1 / n_layers**2`` with ``n_layers`` the total number of blocks in the network.
    """

    def __init__(
        self, n_in: int, n_out: int, *, n_layers: int, kernels: tuple[int, int, int, int]
    ) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path: nn.Module = _Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [(n_in, n_hid), (n_hid, n_hid), (n_hid, n_hid), (n_hid, n_out)]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, ((c_in, c_out), kw) in enumerate(zip(widths, kernels, strict=True), start=1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = _Conv2d(c_in, c_out, kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _check_common(group_count: int, n_hid: int, n_blk_per_group: int, vocab_size: int) -> None:
    if group_count < 1:
        raise ValueError(f"group_count must be >= 1, got {group_count}")
    if n_hid < 4 or n_hid % 4 != 0:
        raise ValueError(f"n_hid must be a positive multiple of 4, got {n_hid}")
    if n_blk_per_group < 1:
        raise ValueError(f"n_blk_per_group must be >= 1, got {n_blk_per_group}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")


def _check_images(x: torch.Tensor, channels: int, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} must be 4-d (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} has {x.shape[1]} channels but the model expects {channels}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


class DalleEncoder(nn.Module):
    """The dVAE encoder: mapped pixels (B, C, H, W) -> token logits (B, V, H/8, W/8).

    Layout (``group_count=4``): a 7x7 input conv to ``n_hid`` channels, four groups of
    ``n_blk_per_group`` residual blocks at widths 1, 2, 4, 8 x ``n_hid`` with a 2x2 max-pool after
    each group but the last, then ReLU and a 1x1 conv to ``vocab_size`` logits.
    """

    def __init__(
        self,
        *,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        _check_common(group_count, n_hid, n_blk_per_group, vocab_size)
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        n_layers = group_count * n_blk_per_group

        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        blocks["input"] = _Conv2d(input_channels, n_hid, 7)
        width = n_hid
        for g in range(1, group_count + 1):
            out = n_hid * 2 ** (g - 1)
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(1, n_blk_per_group + 1):
                group[f"block_{i}"] = _ResBlock(width, out, n_layers=n_layers, kernels=(3, 3, 3, 1))
                width = out
            if g < group_count:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            blocks[f"group_{g}"] = nn.Sequential(group)
        blocks["output"] = nn.Sequential(
            OrderedDict([("relu", nn.ReLU()), ("conv", _Conv2d(width, vocab_size, 1))])
        )
        self.blocks = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token logits (B, V, h, w) for images already passed through :func:`map_pixels`."""
        _check_images(x, self.input_channels, "encoder input")
        return self.blocks(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w), int64, for mapped images (B, C, H, W): argmax over the logits.

        ``x`` is the same input as for :meth:`forward`, i.e. ``map_pixels(images)``; BEiT's data
        pipeline applies ``map_pixels`` in its tokenizer transform.
        """
        return self(x).argmax(dim=1)  # (B, V, h, w) -> (B, h, w)


class DalleDecoder(nn.Module):
    """The dVAE decoder: one-hot tokens (B, V, h, w) -> pixel statistics (B, 2 C, 8 h, 8 w).

    Layout (``group_count=4``): a 1x1 input conv from ``vocab_size`` to ``n_init`` channels, four
    groups of ``n_blk_per_group`` residual blocks at widths 8, 4, 2, 1 x ``n_hid`` with a 2x
    nearest upsampling after each group but the last, then ReLU and a 1x1 conv to
    ``2 * output_channels`` channels: the logit-Laplace location (first ``output_channels``,
    pre-sigmoid) and log-scale (the rest) per pixel.
    """

    def __init__(
        self,
        *,
        group_count: int = 4,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        _check_common(group_count, n_hid, n_blk_per_group, vocab_size)
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        if output_channels < 1:
            raise ValueError(f"output_channels must be >= 1, got {output_channels}")
        self.group_count = group_count
        self.n_init = n_init
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.output_channels = output_channels
        self.vocab_size = vocab_size
        n_layers = group_count * n_blk_per_group

        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        blocks["input"] = _Conv2d(vocab_size, n_init, 1)
        width = n_init
        for g in range(1, group_count + 1):
            out = n_hid * 2 ** (group_count - g)
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(1, n_blk_per_group + 1):
                group[f"block_{i}"] = _ResBlock(width, out, n_layers=n_layers, kernels=(1, 3, 3, 3))
                width = out
            if g < group_count:
                group["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            blocks[f"group_{g}"] = nn.Sequential(group)
        blocks["output"] = nn.Sequential(
            OrderedDict([("relu", nn.ReLU()), ("conv", _Conv2d(width, 2 * output_channels, 1))])
        )
        self.blocks = nn.Sequential(blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel statistics (B, 2 C, H, W) from one-hot (or soft) token maps (B, V, h, w)."""
        _check_images(z, self.vocab_size, "decoder input")
        return self.blocks(z)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from token ids (B, h, w).

        Sigmoid of the location channels, then :func:`unmap_pixels`; use :meth:`forward` when
        gradients are needed.
        """
        if ids.ndim != 3:
            raise ValueError(f"token ids must be 3-d (B, h, w), got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        dtype = next(self.parameters()).dtype
        z = F.one_hot(ids.long(), self.vocab_size)  # (B, h, w, V)
        z = z.permute(0, 3, 1, 2).to(dtype)  # (B, V, h, w)
        stats = self(z)  # (B, 2 C, H, W)
        return unmap_pixels(torch.sigmoid(stats[:, : self.output_channels]))  # (B, C, H, W)


def _group_indices(state: Mapping[str, torch.Tensor]) -> dict[int, set[int]]:
    """``{g: {block indices}}`` from keys ``blocks.group_{g}.block_{i}.*``."""
    groups: dict[int, set[int]] = {}
    for key in state:
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].startswith("group_"):
            continue
        g = parts[1].removeprefix("group_")
        if not g.isdigit():
            raise ValueError(f"not a DALL-E dVAE state dict: unexpected key {key!r}")
        blocks = groups.setdefault(int(g), set())
        i = parts[2].removeprefix("block_")
        if parts[2].startswith("block_") and i.isdigit():
            blocks.add(int(i))
    return groups


def infer_dalle_config(
    state: Mapping[str, torch.Tensor], kind: str | None = None
) -> tuple[str, dict[str, int]]:
    """``(kind, constructor kwargs)`` of the encoder or decoder that a state dict belongs to.

    ``kind`` ("encoder" or "decoder") is read off the input convolution (7x7 in the encoder, 1x1
    in the decoder) unless given. Raises ``ValueError`` when the keys are not a dVAE's.
    """
    required = ("blocks.input.w", "blocks.output.conv.w")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not a DALL-E dVAE state dict: missing {missing}")
    w_in, w_out = state["blocks.input.w"], state["blocks.output.conv.w"]
    if w_in.ndim != 4 or w_out.ndim != 4:
        raise ValueError("not a DALL-E dVAE state dict: convolution weights must be 4-d")
    if kind is None:
        kind = "encoder" if w_in.shape[-1] != 1 else "decoder"
    groups = _group_indices(state)
    if not groups or sorted(groups) != list(range(1, len(groups) + 1)) or not groups[1]:
        raise ValueError(f"not a DALL-E dVAE state dict: groups {sorted(groups)}")
    common = {"group_count": len(groups), "n_blk_per_group": max(groups[1])}
    if kind == "encoder":
        return kind, {
            **common,
            "n_hid": w_in.shape[0],
            "input_channels": w_in.shape[1],
            "vocab_size": w_out.shape[0],
        }
    if kind == "decoder":
        return kind, {
            **common,
            "n_init": w_in.shape[0],
            "n_hid": w_out.shape[1],
            "output_channels": w_out.shape[0] // 2,
            "vocab_size": w_in.shape[1],
        }
    raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True, assign=True)`` with an error that names every mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: "
            f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {wrong_shape}"
        )
    model.load_state_dict(state, strict=True, assign=True)


def _load(path: str | Path, kind: str, device: str | torch.device) -> nn.Module:
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata: dict[str, Any] = f.metadata() or {}
    if metadata.get("kind", kind) != kind:
        raise ValueError(f"{path} holds a DALL-E {metadata['kind']}, expected the {kind}")
    state = load_file(str(path), device=str(device))
    found, config = infer_dalle_config(state, metadata.get("kind"))
    if found != kind:
        raise ValueError(f"{path} holds a DALL-E {found}, expected the {kind}")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model: nn.Module = DalleEncoder(**config) if kind == "encoder" else DalleDecoder(**config)
    _load_strict(model, state, str(path))
    return model.eval().requires_grad_(False)


def load_dalle_encoder(path: str | Path, *, device: str | torch.device = "cpu") -> DalleEncoder:
    """A frozen :class:`DalleEncoder` (eval mode) from a safetensors file.

    The configuration is read off the tensor shapes; the load is strict and a mismatch raises
    ``ValueError`` naming the missing, unexpected and mis-shaped keys.
    """
    model = _load(path, "encoder", device)
    assert isinstance(model, DalleEncoder)
    return model


def load_dalle_decoder(path: str | Path, *, device: str | torch.device = "cpu") -> DalleDecoder:
    """A frozen :class:`DalleDecoder` (eval mode) from a safetensors file (see the encoder)."""
    model = _load(path, "decoder", device)
    assert isinstance(model, DalleDecoder)
    return model
