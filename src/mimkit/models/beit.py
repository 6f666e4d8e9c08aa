"""BEiT: a ViT over the full patch sequence with a mask embedding, and masked image modeling.

Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (2021), Sec. 2. Shapes: B batch,
N patches, D width, V vocabulary size, M predicted positions, P = patch_size**2 * channels.

The encoder's state dict is, key for key, that of timm's ``Beit`` (``num_classes=0``,
``use_fc_norm=False``) plus ``mask_token``, which is also the official BEiT pretraining layout:
``cls_token, mask_token, patch_embed.proj.*, [pos_embed],
[rel_pos_bias.relative_position_bias_table], blocks.{i}.{norm1, attn.qkv.weight, attn.q_bias,
attn.v_bias, [attn.relative_position_bias_table], attn.proj, norm2, mlp.fc1, mlp.fc2, gamma_1,
gamma_2}, norm``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.beit import Block as BeitBlock
from timm.models.beit import RelativePositionBias
from torch import nn

from mimkit.masking import Mask
from mimkit.models.vit import pool_tokens, run_block

__all__ = ["BEiT", "BEiTEncoder", "MIMOutput", "mim_pixel_loss", "mim_token_loss"]

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class BEiTEncoder(nn.Module):
    """The BEiT encoder: [S] token, patch embeddings with masked ones replaced by e[M], blocks.

    Position information comes from learnable absolute 1-D embeddings (``abs_pos_emb``), a
    relative position bias shared across layers (``shared_rel_pos_bias``, BEiT pretraining), or a
    relative position bias per layer (``rel_pos_bias``, BEiT fine-tuning). ``layer_scale`` is the
    initial value of the per-channel residual scales (CaiT); None disables them.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = 0.1,
        abs_pos_emb: bool = False,
        shared_rel_pos_bias: bool = True,
        rel_pos_bias: bool = False,
        mask_token: bool = True,
    ) -> None:
        super().__init__()
        if shared_rel_pos_bias and rel_pos_bias:
            raise ValueError("choose a shared relative position bias or one per layer, not both")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim)) if abs_pos_emb else None
        )
        self.rel_pos_bias = (
            RelativePositionBias(window_size=self.grid_size, num_heads=num_heads)
            if shared_rel_pos_bias
            else None
        )
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            BeitBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=r,
                init_values=layer_scale,
                norm_layer=LayerNorm,
                window_size=self.grid_size if rel_pos_bias else None,
            )
            for r in rates
        )
        self.norm = LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BEiT's init: truncated normal (std 0.02), then the "rescale" of residual branches."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=0.02)
        with torch.no_grad():
            # divide each block's output projections by sqrt(2 * layer), as the official code
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def embed(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1+N, D); masked patches become the mask embedding."""
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this encoder was built without a mask token (mask_token=False)")
            w = mask.mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1), 1 = masked
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def _blocks(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        outs = []
        for blk in self.blocks[:upto]:
            x = run_block(blk, x, self.grad_checkpointing, shared_rel_pos_bias=bias)
            outs.append(x)
        return outs

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (memory for compute)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Normed tokens (B, 1+N, D); with ``mask``, masked patches enter as e[M]."""
        return self.norm(self._blocks(self.embed(x, mask))[-1])

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int] | tuple[int, ...], *, norm: bool = False
    ) -> list[torch.Tensor]:
        """Token outputs (B, 1+N, D) of blocks ``indices`` (0-based, negative from the end)."""
        wanted = [i % self.depth for i in indices]
        outs = self._blocks(self.embed(x), max(wanted) + 1)
        return [self.norm(outs[i]) if norm else outs[i] for i in wanted]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    pool = staticmethod(pool_tokens)

    @property
    def num_layers(self) -> int:
        return self.depth + 2

    def no_weight_decay(self) -> set[str]:
        names = {"cls_token", "mask_token", "pos_embed"}
        names |= {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return names

    def layer_id(self, name: str) -> int:
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("rel_pos_bias"):
            return self.depth + 1  # the official code puts the shared table with the last layer
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1


def masked_index(mask: Mask) -> torch.Tensor:
    """The masked patches' indices (B, N-K), ascending per row, from a :class:`Mask`.

    The row-major order of ``x[mask.mask]``, computed from the shuffle (whose kept count K is
    a shape) instead of from the boolean values, so the device is never waited for.
    """
    ids_shuffle = torch.argsort(mask.ids_restore, dim=1)  # (B, N): kept first, then masked
    return ids_shuffle[:, mask.ids_keep.shape[1] :].sort(dim=1).values


def _all_index(mask: torch.Tensor) -> torch.Tensor:
    b, n = mask.shape
    return torch.arange(n, device=mask.device).expand(b, n)


class MIMOutput(NamedTuple):
    pred: torch.Tensor  # (M, V) logits or (M, P) pixels at the selected positions
    positions: torch.Tensor  # (B, N) bool: the positions pred covers, in row-major order
    tokens: torch.Tensor  # (B, 1+N, D) encoder output
    index: torch.Tensor | None = None  # (B, K) long: the same positions, ascending per row


class BEiT(nn.Module):
    """Masked image modeling over the full sequence: BEiT (visual tokens) and its ablations.

    ``vocab_size`` gives the MIM head, a linear softmax classifier over the visual vocabulary
    (``lm_head`` as the official code); ``pixel_dim`` instead regresses pixels per patch (BEiT
    Table 4, "w/o visual tokens"). ``loss_on`` is "masked" (the paper) or "all" positions.
    """

    def __init__(
        self,
        encoder: BEiTEncoder,
        *,
        vocab_size: int | None = None,
        pixel_dim: int | None = None,
        loss_on: str = "masked",
    ) -> None:
        super().__init__()
        if (vocab_size is None) == (pixel_dim is None):
            raise ValueError("give exactly one of vocab_size (visual tokens) or pixel_dim (pixels)")
        if loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be 'masked' or 'all', got {loss_on!r}")
        self.encoder, self.loss_on = encoder, loss_on
        self.vocab_size, self.pixel_dim = vocab_size, pixel_dim
        self.lm_head = nn.Linear(encoder.embed_dim, vocab_size or pixel_dim)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, imgs: torch.Tensor, mask: Mask) -> MIMOutput:
        tokens = self.encoder.forward_features(imgs, mask)  # (B, 1+N, D)
        patches = tokens[:, 1:]  # (B, N, D)
        positions = mask.mask if self.loss_on == "masked" else torch.ones_like(mask.mask)
        index = masked_index(mask) if self.loss_on == "masked" else _all_index(mask.mask)
        # a gather with a known count, not boolean indexing: no host-device synchronisation
        picked = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return MIMOutput(self.lm_head(picked.flatten(0, 1)), positions, tokens, index)  # (M, V|P)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def mim_token_loss(pred: torch.Tensor, target_ids: torch.Tensor, positions: torch.Tensor):
    """Cross-entropy of the visual tokens at ``positions``; returns (loss, accuracy).

    pred: (M, V) logits; target_ids: (B, N) token ids; positions: (B, N) bool with M True, or
    (B, K) long indices with B*K = M (``MIMOutput.index``, which never waits for the device).
    """
    target = _select(target_ids, positions)  # (M,)
    loss = F.cross_entropy(pred.float(), target)
    acc = (pred.argmax(-1) == target).float().mean()
    return loss, acc.detach()


def mim_pixel_loss(pred: torch.Tensor, target_patches: torch.Tensor, positions: torch.Tensor):
    """MSE of the (optionally normalized) pixels at ``positions``: (M, P) vs (B, N, P).

    ``positions`` is a (B, N) bool mask or (B, K) long indices, as for :func:`mim_token_loss`.
    """
    return (pred.float() - _select(target_patches, positions).float()).pow(2).mean()


def _select(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, ...) at ``positions``, flattened to (M, ...) in row-major order."""
    if positions.dtype == torch.bool:
        return x[positions]  # boolean indexing: the count is read from the device
    index = positions.reshape(*positions.shape, *([1] * (x.ndim - 2))).expand(
        *positions.shape, *x.shape[2:]
    )
    return x.gather(1, index).flatten(0, 1)
