"""How attention runs in training, and the self-attention probabilities of an encoder block.

:func:`set_attention` picks, for every timm attention layer of a model, between torch's fused
``scaled_dot_product_attention`` and the explicit path (``softmax(q k^T * scale + bias) v`` as
matmuls), which timm keeps behind each layer's ``fused_attn`` flag; ``train.attention`` chooses.

timm's attention layers use fused ``scaled_dot_product_attention``, which never materializes the
softmax probabilities, so they are recomputed here from the block's own weights: the block's input
tokens (from the encoder's public ``embed`` / ``forward_intermediates``), its ``norm1``, its q/k
projection (with BEiT's q bias and zero k bias), the scale, and for BEiT the relative position
bias (shared across blocks and/or the block's own).

Shapes: B batch, H heads, N patches, T = 1 + N tokens (cls first, then patches row-major).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from torch import nn

from mimkit.config.pretrain import ATTENTION_MODES

__all__ = ["ATTENTION_MODES", "attention_maps", "fused_attention_wanted", "set_attention"]


def fused_attention_wanted(mode: str, *, device_type: str, precision: str) -> bool:
    """Whether ``train.attention=mode`` means fused attention on this device and precision.

    ``auto``: fused everywhere except in bf16 on CPU. There torch's fused CPU kernel (flash
    attention) runs a ViT-B training step's attention forward + backward 2 to 5x slower than
    bf16 matmuls and a softmax do, and the explicit path makes the whole MAE ViT-B/16 step about
    1.25x faster (``benchmarks/README.md``). In fp32, and on GPUs, the fused kernels are kept.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}: one of {list(ATTENTION_MODES)}")
    if mode != "auto":
        return mode == "fused"
    return not (device_type == "cpu" and precision == "bf16")


def set_attention(model: nn.Module, mode: str, *, device_type: str, precision: str) -> int:
    """Set every timm attention layer of ``model`` (those with a ``fused_attn`` flag: ViT, MAE
    decoder and BEiT blocks) to fused or explicit attention, as :func:`fused_attention_wanted`
    says. Only how attention is computed changes: weights, outputs (up to rounding) and
    checkpoints do not. Returns the number of layers set."""
    fused = fused_attention_wanted(mode, device_type=device_type, precision=precision)
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in layers:
        m.fused_attn = fused
    return len(layers)


def _attention_probs(
    attn: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention (B, H, T, T) of a timm attention layer on its (normed) input (B, T, D)."""
    b, t, _ = x.shape
    heads = attn.num_heads
    beit = isinstance(attn, BeitAttention)
    if beit:
        # BEiT: qkv Linear without bias; q and v biases are parameters, the k bias a zero buffer
        bias = None
        if attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)  # (B, T, 3*H*hd)
    elif hasattr(attn, "qkv") and hasattr(attn, "scale"):
        qkv = attn.qkv(x)  # timm.layers.Attention (VisionTransformer blocks)
    else:
        raise TypeError(f"unsupported attention layer {type(attn).__name__}")
    q, k, _ = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd)
    if not beit:
        q, k = attn.q_norm(q), attn.k_norm(k)  # Identity unless built with qk_norm
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    if beit:
        if attn.relative_position_bias_table is not None:
            logits = logits + attn._get_rel_pos_bias()  # (1, H, T, T), the block's own table
        if shared_rel_pos_bias is not None:
            logits = logits + shared_rel_pos_bias  # (H, T, T), shared across blocks
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor, *, block: int = -1) -> torch.Tensor:
    """Attention probabilities (B, H, T, T) of block ``block`` (0-based, negative from the end).

    ``probs[b, h, i, j]`` is how much query token i attends to key token j in head h; each row
    sums to 1. Works for :class:`~mimkit.models.vit.VisionTransformer` and
    :class:`~mimkit.models.beit.BEiTEncoder` (images (B, C, H, W), no mask). Computed in eval
    mode (no dropout / drop path); the module's train flag is restored afterwards.
    """
    depth = len(encoder.blocks)
    if not -depth <= block < depth:
        raise IndexError(f"block {block} out of range for an encoder of depth {depth}")
    idx = block % depth
    was_training = encoder.training
    encoder.eval()
    try:
        if idx == 0:
            x = encoder.embed(images)  # (B, T, D)
        else:
            x = encoder.forward_intermediates(images, [idx - 1])[0]  # (B, T, D) input of block idx
        rel = getattr(encoder, "rel_pos_bias", None)  # BEiT's shared RelativePositionBias module
        shared = rel() if isinstance(rel, nn.Module) else None  # (H, T, T)
        blk = encoder.blocks[idx]
        return _attention_probs(blk.attn, blk.norm1(x), shared)
    finally:
        encoder.train(was_training)
