"""MAE: an encoder that sees only visible patches, and a light decoder that regresses pixels.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021). Shapes: B batch, N patches,
K visible patches, D encoder width, E decoder width, P = patch_size**2 * channels.

Pipeline: patchify -> mask -> encode (visible + cls) -> decode (+ mask tokens) -> per-patch pixels.
The model returns predictions; the loss is :func:`mae_loss`, a separate pure function.

The paper's ablations are options of the same model: the loss on every patch (``loss_on="all"``,
Sec. 4 "Reconstruction target"), a tokenizer's visual tokens as the target (``vocab_size``,
Table 1d "dVAE token"), and the mask token in the encoder (``mask_token_in_encoder``, Table 1c
"encoder w/ [M]": the encoder sees every position, the masked ones as a learned token; the slow
path MAE is measured against).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.losses import masked_mse
from mimkit.masking import Mask, random_masking
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import LayerNorm, VisionTransformer, init_vit_weights, run_block
from mimkit.targets import pixel_target

__all__ = ["MAE", "MAEOutput", "from_official_layout", "mae_loss", "to_official_layout"]


class MAEOutput(NamedTuple):
    pred: torch.Tensor  # (B, N, P) predicted patch pixels (norm-pix space), or (B, N, V) logits
    mask: Mask  # which patches were hidden
    latent: torch.Tensor  # (B, 1+K, D) encoder output ((B, 1+N, D) with the mask token in it)


class MAE(nn.Module):
    """Masked autoencoder around a :class:`VisionTransformer` encoder.

    Decoder parameter names follow the official code (``decoder_embed``, ``mask_token``,
    ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        loss_on: str = "masked",
        vocab_size: int | None = None,
        mask_token_in_encoder: bool = False,
    ) -> None:
        super().__init__()
        if loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be 'masked' or 'all', got {loss_on!r}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.loss_on, self.vocab_size = loss_on, vocab_size
        self.mask_token_in_encoder = mask_token_in_encoder
        if mask_token_in_encoder:  # pretraining-only, beside the decoder's keys
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        p, c = encoder.patch_size, encoder.in_chans
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, encoder.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, vocab_size or p * p * c)
        self._init_decoder()

    def _init_decoder(self) -> None:
        with torch.no_grad():
            emb = sincos_2d(
                self.decoder_pos_embed.shape[-1], self.encoder.grid_size, cls_token=True
            )
            self.decoder_pos_embed.copy_(emb[None])
        nn.init.normal_(self.mask_token, std=0.02)
        if self.mask_token_in_encoder:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        for name, module in self.named_modules():
            if not name.startswith("encoder"):
                init_vit_weights(module)

    def mask(self, batch_size: int, *, noise: torch.Tensor | None = None, device=None) -> Mask:
        return random_masking(
            batch_size, self.encoder.num_patches, self.mask_ratio, noise=noise, device=device
        )

    def encode_with_mask_token(self, imgs: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Every position through the encoder, the masked ones replaced by the encoder's mask
        token (before the position embeddings, as BEiT): (B, 1+N, D)."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (B, N, D)
        w = mask.mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        x = x * (1 - w) + self.encoder_mask_token.to(x.dtype) * w + enc.pos_embed[:, 1:, :]
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in enc.blocks:
            x = run_block(blk, x, enc.grad_checkpointing)
        return enc.norm(x)

    def decode(self, latent: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Encoder tokens (B, 1+K, D) -> predictions (B, N, P or V) for every patch; with the
        mask token in the encoder, its (B, 1+N, D) output is decoded as it is."""
        x = self.decoder_embed(latent)  # (B, 1+K, E)
        if x.shape[1] != mask.ids_restore.shape[1] + 1:  # visible patches only: fill and unshuffle
            b, n = mask.ids_restore.shape
            fill = self.mask_token.expand(b, n + 1 - x.shape[1], -1)  # (B, N-K, E)
            x_ = torch.cat([x[:, 1:], fill], dim=1)  # (B, N, E) in shuffled order
            idx = mask.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x_ = torch.gather(x_, 1, idx)  # (B, N, E) unshuffled, patch order
            x = torch.cat([x[:, :1], x_], dim=1)
        x = x + self.decoder_pos_embed  # (B, 1+N, E)
        for blk in self.decoder_blocks:
            x = run_block(blk, x, self.encoder.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+N, P)
        return x[:, 1:]  # (B, N, P) drop the cls token

    def forward(
        self, imgs: torch.Tensor, *, noise: torch.Tensor | None = None, mask: Mask | None = None
    ) -> MAEOutput:
        """imgs (B, C, H, W); ``noise`` (B, N) fixes the random mask (same noise -> same mask);
        ``mask`` gives one directly (e.g. blockwise, from the data pipeline; equal counts)."""
        if mask is None:
            mask = self.mask(imgs.shape[0], noise=noise, device=imgs.device)
        if self.mask_token_in_encoder:
            latent = self.encode_with_mask_token(imgs, mask)  # (B, 1+N, D)
        else:
            latent = self.encoder.forward_features(imgs, mask)  # (B, 1+K, D)
        return MAEOutput(pred=self.decode(latent, mask), mask=mask, latent=latent)

    def loss(
        self, imgs: torch.Tensor, out: MAEOutput, target_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixels: :func:`mae_loss`; visual tokens (``target_ids`` (B, N) from the tokenizer):
        cross-entropy. On the masked patches, or on all of them with ``loss_on="all"``."""
        where = out.mask.mask if self.loss_on == "masked" else torch.ones_like(out.mask.mask)
        if self.vocab_size is not None:
            if target_ids is None:
                raise ValueError("an MAE with visual-token targets needs target_ids")
            return F.cross_entropy(out.pred[where].float(), target_ids[where].long())
        t = pixel_target(imgs, self.encoder.patch_size, norm_pix=self.norm_pix_loss)
        return masked_mse(out.pred, t, where)

    def no_weight_decay(self) -> set[str]:
        enc = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        extra = {"encoder_mask_token"} if self.mask_token_in_encoder else set()
        return enc | {"mask_token", "decoder_pos_embed"} | extra


def mae_loss(
    pred: torch.Tensor, imgs: torch.Tensor, mask: Mask, patch_size: int, *, norm_pix: bool
) -> torch.Tensor:
    """MSE between predicted and true (optionally norm-pix) pixels, on masked patches only."""
    return masked_mse(pred, pixel_target(imgs, patch_size, norm_pix=norm_pix), mask.mask)


def to_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``MAE.state_dict()`` -> the official MAE layout (encoder keys at the top level, as timm)."""
    return {k.removeprefix("encoder."): v for k, v in state.items()}


def from_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official MAE layout -> keys of :class:`MAE` (encoder keys under ``encoder.``)."""
    return {(k if k.startswith(_DECODER_KEYS) else f"encoder.{k}"): v for k, v in state.items()}


_DECODER_KEYS = ("decoder_", "mask_token", "encoder_mask_token")
