"""``mimkit visualize``: attention maps (BEiT Figure 3) and MAE reconstructions from checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mimkit.config import ConfigError, ModelConfig
from mimkit.config.downstream import EncoderConfig, resolve_encoder
from mimkit.data import EvalTransform, FashionMNIST
from mimkit.data.datasets import load_image
from mimkit.engine.checkpoint import load_weights, read_metadata
from mimkit.models import MAE, build_encoder
from mimkit.models.attention import attention_maps
from mimkit.models.loading import find_checkpoint
from mimkit.models.mae import from_official_layout
from mimkit.tasks.downstream import load_encoder
from mimkit.viz import save_attention_figure, save_reconstruction_figure

__all__ = ["load_images", "visualize_attention", "visualize_reconstruction"]

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def load_images(paths: list[str], fashion_mnist: list[int], *, channels: int) -> list[torch.Tensor]:
    """uint8 (C, H, W) images from files and/or Fashion-MNIST test indices."""
    images = []
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"image not found: {p}")
        try:  # mimkit's decoder: raster formats only, the decompression-bomb limit, EXIF
            images.append(load_image(p, channels=channels))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{p}: not a readable image ({err})") from None
    if fashion_mnist:
        if channels != 1:
            raise ConfigError("--fashion-mnist images are grayscale; this model takes RGB")
        ds = FashionMNIST(os.environ.get("MIMKIT_FMNIST_ROOT", FMNIST_ROOT), "test")
        for i in fashion_mnist:
            if not 0 <= i < len(ds):
                raise ConfigError(f"--fashion-mnist {i}: the test split has {len(ds)} images")
            images.append(ds[i][0])
    if not images:
        raise ConfigError("give image files and/or --fashion-mnist INDEX")
    return images


def visualize_attention(
    checkpoint: str,
    *,
    images: list[torch.Tensor] | None = None,
    paths: list[str] = (),
    fashion_mnist: list[int] = (),
    patches: list[tuple[int, int] | str] | None = None,
    block: int = -1,
    out: str | Path = "attention.png",
) -> list[Path]:
    """Self-attention of ``block`` (default: the last) for reference patches, one PNG per image.

    ``patches``: (row, col) grid positions or "cls"; default the centre patch and the cls token.
    """
    e = EncoderConfig(init=checkpoint, drop_path=0.0)
    resolve_encoder(e)
    file = find_checkpoint(checkpoint)
    meta = read_metadata(file)
    classifier_avg = meta.get("kind") == "classifier" and meta.get("pool") == "avg"
    loaded = load_encoder(e, drop_norm=classifier_avg)
    encoder = loaded.encoder.eval()
    mean, std = loaded.mean or [0.5] * e.in_chans, loaded.std or [0.5] * e.in_chans
    tf = EvalTransform(e.img_size, mean, std)
    imgs = images if images is not None else load_images(paths, fashion_mnist, channels=e.in_chans)
    grid = (e.img_size // e.patch_size,) * 2
    patches = patches or [(grid[0] // 2, grid[1] // 2), "cls"]
    for p in patches:
        if p != "cls" and not (0 <= p[0] < grid[0] and 0 <= p[1] < grid[1]):
            raise ConfigError(f"--patch {p[0]},{p[1]} is outside the {grid[0]}x{grid[1]} grid")
    if not -e.depth <= block < e.depth:
        raise ConfigError(f"--block {block}: the encoder has {e.depth} blocks")
    out = Path(out)
    written = []
    for i, img in enumerate(imgs):
        x = tf(img)[None]  # (1, C, S, S)
        probs = attention_maps(encoder, x, block=block)  # (1, H, T, T)
        path = out if len(imgs) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        save_attention_figure(
            probs[0], x[0], path, patches=patches, grid=grid, mean=mean, std=std,
            title=f"self-attention of block {block % e.depth + 1}/{e.depth} "
            f"({meta.get('method', '?')}, {Path(str(file)).name})",
        )  # fmt: skip
        written.append(path)
    return written


def visualize_reconstruction(
    checkpoint: str,
    *,
    paths: list[str] = (),
    fashion_mnist: list[int] = (),
    mask_ratio: float | None = None,
    seed: int = 0,
    out: str | Path = "reconstruction.png",
) -> Path:
    """Original | masked | reconstruction | reconstruction with the visible patches pasted in, for
    an MAE checkpoint with its decoder (a ``checkpoints/ckpt-*`` directory or a run directory)."""
    file = find_checkpoint(checkpoint)
    if file.name == "encoder.safetensors":  # a run directory: its newest full checkpoint
        from mimkit.engine.checkpoint import latest_checkpoint

        latest = latest_checkpoint(file.parent / "checkpoints")
        if latest is None:
            raise ConfigError(f"{checkpoint}: no checkpoint with the MAE decoder in checkpoints/")
        file = latest / "model.safetensors"
    state, meta = load_weights(file)
    if meta.get("method") != "mae" or not any(k.startswith("decoder_") for k in state):
        raise ConfigError(
            f"{file}: reconstructions need an MAE checkpoint with its decoder (a pretraining "
            "run's checkpoints/ckpt-* directory)"
        )
    mc = dict(meta["model_config"])
    dec = mc.pop("decoder")
    m = ModelConfig(**mc)
    ratio = mask_ratio if mask_ratio is not None else float(meta.get("mask_ratio", 0.75))
    if not 0 < ratio < 1:
        raise ConfigError(f"--mask-ratio {ratio}: must be in (0, 1)")
    model = MAE(
        build_encoder(m), decoder_embed_dim=dec["embed_dim"], decoder_depth=dec["depth"],
        decoder_num_heads=dec["num_heads"], mlp_ratio=m.mlp_ratio, mask_ratio=ratio,
        norm_pix_loss=meta.get("target") == "norm_pixels",
    )  # fmt: skip
    model.load_state_dict(from_official_layout(state), strict=True)
    model.eval()
    mean, std = meta["mean"], meta["std"]
    tf = EvalTransform(m.img_size, mean, std)
    imgs = load_images(list(paths), list(fashion_mnist), channels=m.in_chans)
    x = torch.stack([tf(img) for img in imgs])
    return save_reconstruction_figure(
        model, x, out, mean=mean, std=std, seed=seed,
        title=f"MAE reconstructions (mask ratio {ratio}, step {meta.get('step', '?')})",
    )  # fmt: skip
