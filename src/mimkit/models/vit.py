"""The ViT encoder: timm's layers, timm's state-dict keys, a declared interface for wrappers.

Shapes: B batch, N patches, K kept (visible) patches, D width, T = 1 + N (or 1 + K) tokens.

The state dict is, key for key, that of ``timm.models.vision_transformer.VisionTransformer`` with
``num_classes=0`` (``cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*, norm.*``), which is
also the official MAE encoder layout. Wrappers (MAE, fine-tuning, probes) use only:

- ``forward_features(x, mask=None)``  -> normed tokens (B, T, D); with a mask, visible ones only
- ``forward_intermediates(x, indices)`` -> per-block token outputs
- ``pool(tokens, kind)``               -> (B, D) from "cls" or "avg" (mean of patch tokens)
- ``no_weight_decay()``, ``layer_id(name)``, ``num_layers`` for optimizer parameter groups
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.masking import Mask
from mimkit.models.pos_embed import sincos_2d

__all__ = ["VisionTransformer", "init_vit_weights", "pool_tokens", "run_block"]


def run_block(block: nn.Module, x: torch.Tensor, checkpoint: bool, **kw) -> torch.Tensor:
    """``block(x, **kw)``; with ``checkpoint`` while training with gradients, its activations
    are recomputed in the backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant;
    the RNG of dropout / drop path is replayed, so the gradients are the same)."""
    if checkpoint and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kw)
    return block(x, **kw)


LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialization for Linear and LayerNorm layers (xavier-uniform, zero bias)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def pool_tokens(tokens: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """(B, T, D) -> (B, D): the cls token, or the mean of the patch tokens ("avg")."""
    if kind == "cls":
        return tokens[:, 0]
    if kind == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'avg', got {kind!r}")


class VisionTransformer(nn.Module):
    """A plain ViT (Dosovitskiy et al.) with a cls token and optional token masking (MAE)."""

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
        fixed_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # MAE pretrains with fixed sin-cos embeddings; fine-tuning may make them trainable
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=not fixed_pos_embed
        )
        rates = torch.linspace(
            0, drop_path, depth, device="cpu"
        ).tolist()  # stochastic depth decay rule
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=r,
                norm_layer=LayerNorm,
            )
            for r in rates
        )
        self.norm = LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size, cls_token=True)[None])
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear layer
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    # ---- the forward pass, in pipeline order: embed -> mask -> blocks -> norm ----

    def embed(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, T, D) with position embeddings and the cls token."""
        x = self.patch_embed(x)  # (B, N, D)
        x = x + self.pos_embed[:, 1:, :]
        if mask is not None:
            idx = mask.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, D)
            x = torch.gather(x, 1, idx)  # (B, K, D) visible patches only
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1)  # (B, 1+K, D)

    def forward_features(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Normed output tokens (B, 1+N, D), or (B, 1+K, D) for the visible patches of ``mask``."""
        x = self.embed(x, mask)
        for blk in self.blocks:
            x = run_block(blk, x, self.grad_checkpointing)
        return self.norm(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (memory for compute)."""
        self.grad_checkpointing = enable

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int] | tuple[int, ...], *, norm: bool = False
    ) -> list[torch.Tensor]:
        """Token outputs (B, 1+N, D) of blocks ``indices`` (0-based, negative from the end)."""
        wanted = {i % self.depth for i in indices}
        out: dict[int, torch.Tensor] = {}
        x = self.embed(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                out[i] = self.norm(x) if norm else x
            if len(out) == len(wanted):
                break
        return [out[i % self.depth] for i in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    pool = staticmethod(pool_tokens)

    # ---- what optimizers and wrappers need to know ----

    @property
    def num_layers(self) -> int:
        """Layer ids run 0 (embeddings) .. depth + 1 (final norm and anything above)."""
        return self.depth + 2

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay (BEiT / MAE fine-tuning)."""
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1
