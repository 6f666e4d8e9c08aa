"""``mimkit visualize``: attention maps (BEiT Figure 3), MAE reconstructions and BEiT's token
predictions from checkpoints."""

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

__all__ = [
    "load_images",
    "visualize_attention",
    "visualize_predictions",
    "visualize_reconstruction",
]

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
    state, meta, file = _full_checkpoint(checkpoint, "the MAE decoder")
    if meta.get("target") == "visual_tokens":
        raise ConfigError(f"{file}: an MAE that predicts visual tokens reconstructs no pixels")
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
        mask_token_in_encoder=m.mask_token_in_encoder,
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


def _full_checkpoint(checkpoint: str, what: str) -> tuple[dict, dict, Path]:
    """(weights, metadata, file) of the full pretraining checkpoint ``checkpoint`` stands for: a
    run directory's newest ``checkpoints/ckpt-*`` (its encoder.safetensors lacks ``what``)."""
    from mimkit.weights import latest_checkpoint

    file = find_checkpoint(checkpoint)
    if file.name == "encoder.safetensors":
        latest = latest_checkpoint(file.parent / "checkpoints")
        if latest is None:
            raise ConfigError(f"{checkpoint}: no checkpoint with {what} in checkpoints/")
        file = latest / "model.safetensors"
    state, meta = load_weights(file)
    return state, meta, file


def _beit_checkpoint(checkpoint: str) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The full BEiT pretraining checkpoint (with ``lm_head``) ``checkpoint`` stands for."""
    state, meta, file = _full_checkpoint(checkpoint, "the MIM head")
    if meta.get("method") != "beit" or "lm_head.weight" not in state:
        raise ConfigError(
            f"{file}: predictions need a BEiT pretraining checkpoint with its MIM head (a run "
            "directory or its checkpoints/ckpt-*)"
        )
    if meta.get("target") != "visual_tokens":
        raise ConfigError(f"{file}: a BEiT that regresses pixels predicts no visual tokens")
    return file, state, meta


def visualize_predictions(
    checkpoint: str,
    *,
    paths: list[str] = (),
    fashion_mnist: list[int] = (),
    tokenizer: str | None = None,
    decoder: str | None = None,
    seed: int = 0,
    out: str | Path = "predictions.png",
) -> Path:
    """Image | mask | the true visual tokens decoded | the tokens the BEiT predicts where masked,
    decoded (BEiT's MIM, seen): for a BEiT pretraining checkpoint and its tokenizer.

    ``tokenizer``: default, the one the run recorded. A mimkit dVAE decodes itself; the DALL-E
    tokenizer's decoder is a file of its own (``decoder``: ``mimkit convert dalle`` of
    ``decoder.pkl``). Masks are blockwise with the pretraining's count, seeded by ``seed``.
    """
    from mimkit.data import BEiTTransform
    from mimkit.masking import MaskSampler, mask_from_bool
    from mimkit.models.beit import BEiT
    from mimkit.models.dalle import load_dalle_decoder
    from mimkit.models.tokenizer_io import load_tokenizer
    from mimkit.viz import save_grid

    file, state, meta = _beit_checkpoint(checkpoint)
    tok_path = tokenizer or (meta.get("tokenizer") or {}).get("checkpoint")
    if not tok_path or not Path(tok_path).is_file():
        raise ConfigError(
            f"{file}: its tokenizer {tok_path!r} is not there: give --tokenizer PATH (the "
            "tokenizer .safetensors the run used)"
        )
    tok, tok_meta = load_tokenizer(tok_path)
    if tok_meta["vocab_size"] != meta.get("vocab_size"):
        raise ConfigError(
            f"--tokenizer {tok_path}: {tok_meta['vocab_size']} tokens, the BEiT predicts "
            f"{meta.get('vocab_size')}"
        )
    if tok_meta["kind"] == "dvae":  # mimkit's dVAE decodes its own tokens
        decode = tok.decode
    elif decoder is None:
        raise ConfigError(
            "the DALL-E tokenizer decodes with a file of its own: convert decoder.pkl with "
            "`mimkit convert dalle --trust-pickle decoder.pkl decoder.safetensors` and give "
            "--decoder decoder.safetensors"
        )
    else:
        decode = load_dalle_decoder(decoder).decode
    m = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k != "decoder"})
    model = BEiT(build_encoder(m), vocab_size=meta["vocab_size"])
    keyed = {(k if k.startswith("lm_head") else f"encoder.{k}"): v for k, v in state.items()}
    model.load_state_dict(keyed, strict=True)
    model.eval()
    grid = (m.img_size // m.patch_size,) * 2
    n = grid[0] * grid[1]
    num_masked = int(meta.get("num_masked") or round(float(meta.get("mask_ratio", 0.4)) * n))
    sampler = MaskSampler("blockwise", grid, num_masked)
    mean, std = meta.get("mean") or [0.5] * m.in_chans, meta.get("std") or [0.5] * m.in_chans
    tf = BEiTTransform(m.img_size, grid[0] * int(tok_meta["downsample"]), mean, std,
                       mask_fn=sampler, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                       color_jitter=0.0)  # fmt: skip
    images = load_images(list(paths), list(fashion_mnist), channels=m.in_chans)
    views = [tf(img, torch.Generator().manual_seed(seed + i)) for i, img in enumerate(images)]
    imgs = torch.stack([v[0] for v in views])
    mask = torch.stack([v[2] for v in views])  # (B, N) True = masked
    with torch.no_grad():
        ids = tok.encode(torch.stack([v[1] for v in views])).flatten(1)  # (B, N)
        pred = model(imgs, mask_from_bool(mask, num_masked=num_masked))
        pred_ids = ids.clone()
        pred_ids[pred.positions] = pred.pred.argmax(-1)
        pred_ids[~mask] = ids[~mask]  # visible positions keep their true tokens (the paper's)
        acc = float((pred_ids[mask] == ids[mask]).float().mean())
        p = m.patch_size
        pixels = imgs * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        hidden = mask.view(-1, 1, *grid).repeat_interleave(p, 2).repeat_interleave(p, 3)
        columns = {
            "image": pixels.clamp(0, 1),
            "mask": torch.where(hidden, torch.full_like(pixels, float("nan")), pixels),
            "true tokens, decoded": decode(ids.view(-1, *grid)),
            "predicted at masked": decode(pred_ids.view(-1, *grid)),
        }
    step, kind = meta.get("step", "?"), tok_meta["kind"]
    title = (
        f"BEiT predictions ({num_masked} of {n} patches masked, {100 * acc:.0f}% of the masked "
        f"tokens right; step {step}, {kind} tokenizer)"
    )
    return save_grid(columns, out, title=title)
