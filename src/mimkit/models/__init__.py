"""Model factories: config -> modules."""

from __future__ import annotations

from mimkit.config import ModelConfig, PretrainConfig
from mimkit.models.mae import MAE, MAEOutput, mae_loss
from mimkit.models.vit import VisionTransformer

__all__ = ["MAE", "MAEOutput", "VisionTransformer", "build_encoder", "build_mae", "mae_loss"]


def build_encoder(cfg: ModelConfig, *, fixed_pos_embed: bool = True) -> VisionTransformer:
    """A ViT from a resolved :class:`ModelConfig` (presets already filled in)."""
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        drop_path=cfg.drop_path,
        fixed_pos_embed=fixed_pos_embed,
    )


def build_mae(cfg: PretrainConfig) -> MAE:
    """An MAE (encoder + decoder) from a resolved pretraining config."""
    m = cfg.model
    return MAE(
        build_encoder(m),
        decoder_embed_dim=m.decoder.embed_dim,
        decoder_depth=m.decoder.depth,
        decoder_num_heads=m.decoder.num_heads,
        mlp_ratio=m.mlp_ratio,
        mask_ratio=cfg.mask.ratio,
        norm_pix_loss=cfg.target.norm_pix,
    )
