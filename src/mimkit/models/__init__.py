"""Model factories: config -> modules."""

from __future__ import annotations

from mimkit.config import ModelConfig, PretrainConfig
from mimkit.models.beit import BEiT, BEiTEncoder
from mimkit.models.mae import MAE, MAEOutput, mae_loss
from mimkit.models.vit import VisionTransformer

__all__ = [
    "MAE",
    "BEiT",
    "BEiTEncoder",
    "MAEOutput",
    "VisionTransformer",
    "build_beit",
    "build_encoder",
    "build_mae",
    "mae_loss",
]


def build_encoder(
    cfg: ModelConfig, *, fixed_pos_embed: bool = True, mask_token: bool = True
) -> VisionTransformer | BEiTEncoder:
    """The encoder of ``cfg.method`` from a resolved :class:`ModelConfig` (presets filled in).

    Downstream models pass ``fixed_pos_embed=False`` (MAE fine-tuning trains the position
    embeddings) and ``mask_token=False`` (BEiT's mask embedding is for pretraining only).
    """
    common = {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "drop_path": cfg.drop_path,
    }
    if cfg.method == "beit":
        encoder = BEiTEncoder(
            **common,
            layer_scale=cfg.layer_scale,
            abs_pos_emb=cfg.abs_pos_emb,
            shared_rel_pos_bias=cfg.rel_pos_bias == "shared",
            rel_pos_bias=cfg.rel_pos_bias == "per_layer",
            mask_token=mask_token,
        )
    else:
        encoder = VisionTransformer(**common, fixed_pos_embed=fixed_pos_embed)
    encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    return encoder


def build_mae(cfg: PretrainConfig, *, vocab_size: int | None = None) -> MAE:
    """An MAE (encoder + decoder) from a resolved pretraining config; ``target.kind == "tokens"``
    predicts a tokenizer's ``vocab_size`` visual tokens instead of pixels (MAE Table 1d)."""
    m = cfg.model
    tokens = cfg.target.kind == "tokens"
    if tokens and vocab_size is None:
        raise ValueError("an MAE with visual-token targets needs the tokenizer's vocab_size")
    return MAE(
        build_encoder(m),
        decoder_embed_dim=m.decoder.embed_dim,
        decoder_depth=m.decoder.depth,
        decoder_num_heads=m.decoder.num_heads,
        mlp_ratio=m.mlp_ratio,
        mask_ratio=cfg.mask.ratio,
        norm_pix_loss=cfg.target.norm_pix,
        loss_on=cfg.target.loss_on,
        vocab_size=vocab_size if tokens else None,
        mask_token_in_encoder=m.mask_token_in_encoder,
    )


def build_beit(cfg: PretrainConfig, *, vocab_size: int | None) -> BEiT:
    """A BEiT (full-sequence encoder + MIM head) from a resolved pretraining config.

    ``target.kind == "tokens"`` gives a vocabulary head of ``vocab_size``; "pixels" a per-patch
    pixel regression head (BEiT Table 4).
    """
    m = cfg.model
    tokens = cfg.target.kind == "tokens"
    return BEiT(
        build_encoder(m),
        vocab_size=vocab_size if tokens else None,
        pixel_dim=None if tokens else m.patch_size**2 * m.in_chans,
        loss_on=cfg.target.loss_on,
    )
