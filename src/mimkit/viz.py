"""Figures as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Patch, Rectangle

from mimkit.models.mae import MAE
from mimkit.targets import denormalize_patches, patchify, unpatchify

__all__ = [
    "mae_reconstruction_panels",
    "save_attention_figure",
    "save_beit_figure",
    "save_curves",
    "save_detection_figure",
    "save_eval_curves",
    "save_grid",
    "save_reconstruction_figure",
    "save_segmentation_figure",
    "save_tokenizer_figure",
]

MASK_COLOR = torch.tensor([0.29, 0.44, 0.65])  # a muted blue, unlike any grayscale pixel


def _save(fig, path: str | Path, title: str | None, *, fontsize: int = 10) -> Path:
    """Title, tight layout, write the PNG (parents created), close the figure."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def mae_reconstruction_panels(
    model: MAE, imgs: torch.Tensor, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Original, masked, reconstruction and reconstruction with visible patches pasted back.

    All (B, C, H, W) in the model's normalized input space. Norm-pix predictions are mapped back
    to pixels with each true patch's mean and std (the usual way to show them).
    """
    was_training = model.training
    model.eval()
    enc = model.encoder
    b, n = imgs.shape[0], enc.num_patches
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    out = model(imgs, noise=noise)
    model.train(was_training)
    patches = patchify(imgs, enc.patch_size)  # (B, N, P)
    pred = out.pred.float()
    if model.norm_pix_loss:
        pred = denormalize_patches(pred, patches)
    m = out.mask.mask.unsqueeze(-1)  # (B, N, 1)

    def image(p):
        return unpatchify(p, enc.patch_size, enc.in_chans, enc.grid_size)

    return {
        "original": imgs,
        "masked": image(torch.where(m, torch.full_like(patches, float("nan")), patches)),
        "reconstruction": image(pred),
        "reconstruction + visible": image(torch.where(m, pred, patches)),
    }


def save_reconstruction_figure(
    model: MAE,
    imgs: torch.Tensor,
    path: str | Path,
    *,
    mean: list[float],
    std: list[float],
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Rows of original | masked | reconstruction | reconstruction + visible, de-normalized."""
    panels = mae_reconstruction_panels(model, imgs, seed=seed)
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    # de-normalized to [0, 1]; NaN (masked) stays NaN and is drawn in MASK_COLOR
    columns = {name: (batch.float() * s + m).clamp(0, 1) for name, batch in panels.items()}
    return save_grid(columns, path, title=title)


def save_grid(
    columns: dict[str, torch.Tensor], path: str | Path, *, title: str | None = None
) -> Path:
    """Columns of (B, C, H, W) images in [0, 1] (NaN = masked, drawn in MASK_COLOR) as a PNG."""
    rows, cols = next(iter(columns.values())).shape[0], len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False)
    for j, (name, batch) in enumerate(columns.items()):
        for i in range(rows):
            ax = axes[i][j]
            pic = batch[i].detach().cpu().float()
            if pic.ndim == 3:  # 1 band: gray; 3: RGB; others: the first three as false colour
                pic = pic[:3] if pic.shape[0] >= 3 else pic[:1]
                pic = pic.permute(1, 2, 0).expand(-1, -1, 3)
            if pic.ndim == 2:  # a map of token ids
                ax.imshow(pic.numpy(), cmap="tab20", interpolation="nearest")
            else:
                hidden = pic.isnan().any(-1, keepdim=True)
                ax.imshow(torch.where(hidden, MASK_COLOR, pic.clamp(0, 1)).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    return _save(fig, path, title)


@torch.no_grad()
def save_tokenizer_figure(model, imgs: torch.Tensor, path: str | Path, *, title: str | None = None):
    """Original | reconstruction through hard tokens | the token ids, for [0, 1] images."""
    was_training = model.training
    model.eval()
    ids = model.encode(imgs)  # (B, h, w)
    recon = model.decode(ids)
    model.train(was_training)
    columns = {"original": imgs, "through hard tokens": recon, "token ids": ids.float()}
    return save_grid(columns, path, title=title)


@torch.no_grad()
def save_beit_figure(task, samples, path: str | Path, *, mean, std, title: str | None = None):
    """Image | mask | decoded from the true tokens | decoded with predicted tokens where masked.

    ``samples`` are the BEiT views ``(patch view, tokenizer view, mask)``; ``task`` is a
    :class:`~mimkit.tasks.pretrain.BEiTPretrainTask` whose tokenizer can decode.
    """
    from mimkit.masking import mask_from_bool

    model, tokenizer = task.model, task.tokenizer
    dev = task.device
    imgs = torch.stack([s[0] for s in samples]).to(dev)  # (B, C, H, W) normalized
    tok_imgs = torch.stack([s[1] for s in samples]).to(dev)  # (B, C, T, T) in [0, 1]
    mask = torch.stack([s[2] for s in samples]).to(dev)  # (B, N) True = masked
    was_training = model.training
    model.eval()
    ids = task.target_ids(tok_imgs)  # (B, N)
    out = model(imgs, mask_from_bool(mask))
    model.train(was_training)
    pred_ids = ids.clone()
    pred_ids[out.positions] = out.pred.argmax(-1)
    keep = ~mask  # visible positions keep their true tokens, as in the paper's figure
    pred_ids[keep] = ids[keep]
    enc = model.encoder
    h, w = enc.grid_size
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    pixels = (imgs * s + m).clamp(0, 1)
    p = enc.patch_size
    hidden = mask.view(-1, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3)
    masked = torch.where(hidden, torch.full_like(pixels, float("nan")), pixels)
    columns = {
        "image": pixels,
        "mask": masked,
        "true tokens, decoded": tokenizer.decode(ids.view(-1, h, w)),
        "predicted at masked": tokenizer.decode(pred_ids.view(-1, h, w)),
    }
    return save_grid(columns, path, title=title)


@torch.no_grad()
def save_attention_figure(
    probs: torch.Tensor,
    image: torch.Tensor,
    path: str | Path,
    *,
    patches: list[tuple[int, int] | str],
    grid: tuple[int, int],
    mean: list[float],
    std: list[float],
    title: str | None = None,
) -> Path:
    """Self-attention of reference patches over the image, per head (BEiT paper, Figure 3).

    probs: (H, T, T) or (1, H, T, T) attention probabilities of one image (T = 1 + h*w, e.g. from
    :func:`~mimkit.models.attention.attention_maps`); image: (C, S, S') or (1, C, S, S') in the
    normalized input space; grid: the (h, w) patch grid. One row per entry of ``patches``, a
    (row, col) patch or "cls": the image with the reference patch outlined, then that query's
    attention over the h*w patch tokens (the cls key dropped, upsampled nearest to the image) as a
    heat map over the image for each head and for the mean over heads. Each heat map is scaled to
    its own maximum.
    """
    if probs.ndim == 4:
        if probs.shape[0] != 1:
            raise ValueError(f"probs must be of one image, got {tuple(probs.shape)}")
        probs = probs[0]
    image = image[0] if image.ndim == 4 else image
    h, w = grid
    heads, tokens = probs.shape[0], probs.shape[-1]
    if probs.ndim != 3 or probs.shape[1] != tokens or tokens != 1 + h * w:
        raise ValueError(f"probs {tuple(probs.shape)} do not fit a {h}x{w} grid plus a cls token")
    c, sh, sw = image.shape
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pic = (image.detach().cpu().float() * s + m).clamp(0, 1)  # (C, S, S') in [0, 1]
    pic = pic.permute(1, 2, 0).expand(-1, -1, 3) if c == 1 else pic.permute(1, 2, 0)
    gray = pic.mean(-1).numpy()  # (S, S')
    probs = probs.detach().cpu().float()
    ph, pw = sh / h, sw / w  # patch size in pixels

    queries: list[tuple[str, int, tuple[int, int] | None]] = []
    for ref in patches:
        if ref == "cls":
            queries.append(("cls", 0, None))
            continue
        r, col = ref
        if not (0 <= r < h and 0 <= col < w):
            raise ValueError(f"reference patch {ref} is outside the {h}x{w} grid")
        queries.append((f"patch ({r}, {col})", 1 + r * w + col, (r, col)))

    cols = heads + 2
    fig, axes = plt.subplots(
        len(queries), cols, figsize=(2.0 * cols, 2.0 * len(queries)), squeeze=False
    )
    for i, (name, q, ref) in enumerate(queries):
        maps = probs[:, q, 1:].reshape(heads, h, w)  # (H, h, w), the cls key dropped
        maps = torch.cat([maps, maps.mean(0, keepdim=True)])  # (H+1, h, w): heads, then mean
        up = F.interpolate(maps[None], size=(sh, sw), mode="nearest")[0]  # (H+1, S, S')
        ax = axes[i][0]
        ax.imshow(pic.numpy())
        if ref is not None:
            r, col = ref
            box = plt.Rectangle(
                (col * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor="red", linewidth=2
            )
            ax.add_patch(box)
        ax.set_title(f"query: {name}", fontsize=9)
        for j in range(heads + 1):
            ax = axes[i][j + 1]
            heat = up[j] / up[j].max().clamp_min(1e-12)
            ax.imshow(gray, cmap="gray", vmin=0.0, vmax=1.0)  # the image, muted, under the heat
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.65, vmin=0.0, vmax=1.0)
            if i == 0:
                ax.set_title(f"head {j}" if j < heads else "mean of heads", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path, title)


def save_curves(
    panels: dict[str, dict[str, list[tuple[float, float]]]],
    path: str | Path,
    *,
    xlabel: str = "step",
    title: str | None = None,
    errors: dict[str, dict[str, list[float]]] | None = None,
    logx: bool = False,
) -> Path:
    """Line plots: one panel per key of ``panels``, one line per ``{label: [(x, y), ...]}``.

    ``errors[panel][label]`` gives a symmetric error bar per point (e.g. the std over seeds).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items(), strict=True):
        for label, points in lines.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            err = (errors or {}).get(name, {}).get(label)
            if err is not None:
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=3, label=label)
            else:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, title, fontsize=11)


def save_eval_curves(
    run_dir: str | Path, name: str, *, metric: str, title: str, label: str
) -> Path | None:
    """``figures/<name>_curves.png`` from ``metrics.jsonl``: the training loss and an evaluation
    metric against the optimizer step; None when no evaluation logged ``metric``."""
    train, evals = [], []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            train.append((rec["step"], rec["loss"]))
        elif rec.get("kind") == "eval" and metric in rec:
            evals.append((rec["step"], rec[metric]))
    if not evals:
        return None
    panels = {"training loss": {"train": train}, title: {label: evals}}
    path = Path(run_dir) / "figures" / f"{name}_curves.png"
    return save_curves(panels, path, xlabel="optimizer step")


def _palette(num_classes: int) -> torch.Tensor:
    """(K, 3) colours in [0, 1]; class 0 (background in the mosaic) dark."""
    cmap = plt.get_cmap("tab20" if num_classes <= 20 else "hsv")
    cols = [cmap(i % 20 if num_classes <= 20 else i / num_classes)[:3] for i in range(num_classes)]
    cols[0] = (0.08, 0.08, 0.08)
    return torch.tensor(cols, dtype=torch.float32)


def _as_rgb(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (H, W, 3)."""
    img = img.clamp(0, 1)
    rgb = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    return rgb.permute(1, 2, 0).float().clone()


def save_segmentation_figure(
    images: list[torch.Tensor],
    truths: list[torch.Tensor],
    preds: list[torch.Tensor],
    path: str | Path,
    *,
    classes: tuple[str, ...],
    mean,
    std,
    ignore_index: int = 255,
    title: str | None = None,
) -> Path:
    """Rows of image | truth | prediction (normalized images (C, H, W); label maps (H, W))."""
    pal = _palette(len(classes))
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)

    def colour(label: torch.Tensor) -> torch.Tensor:
        out = pal[label.clamp(0, len(classes) - 1)]  # (H, W, 3)
        out[label == ignore_index] = 1.0  # ignored pixels white
        return out

    for row, (img, truth, pred) in enumerate(zip(images, truths, preds, strict=True)):
        img = torch.nn.functional.interpolate(
            img[None].float(), truth.shape[-2:], mode="bilinear", align_corners=False
        )[0]
        panels = (_as_rgb(img * s + m), colour(truth), colour(pred))
        for col, (ax, panel) in enumerate(zip(axes[row], panels, strict=True)):
            ax.imshow(panel.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(("image", "truth", "prediction")[col], fontsize=9)
    present = sorted({int(v) for t in (*truths, *preds) for v in t.unique() if v < len(classes)})
    handles = [Patch(color=pal[c].tolist(), label=classes[c]) for c in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7)
    fig.subplots_adjust(bottom=0.08)
    return _save(fig, path, title)


def save_detection_figure(
    images: list[torch.Tensor],
    predictions: list[dict[str, torch.Tensor]],
    targets: list[dict[str, torch.Tensor]],
    path: str | Path,
    *,
    classes: tuple[str, ...],
    score_threshold: float = 0.5,
    title: str | None = None,
) -> Path:
    """One panel per image (C, H, W) in [0, 1]: predicted boxes (solid, with class and score)
    above ``score_threshold``, ground-truth boxes dashed; masks shaded when predicted."""
    pal = _palette(max(len(classes), 2))
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, img, pred, truth in zip(axes[0], images, predictions, targets, strict=True):
        rgb = _as_rgb(img.float())
        keep = pred["scores"] >= score_threshold
        if "masks" in pred and keep.any():
            for mask, label in zip(pred["masks"][keep], pred["labels"][keep], strict=True):
                on = mask[0] > 0.5
                rgb[on] = 0.5 * rgb[on] + 0.5 * pal[int(label) % len(pal)]
        ax.imshow(rgb.numpy(), interpolation="nearest")
        for box in truth["boxes"]:
            x1, y1, x2, y2 = box.tolist()
            dashed = {"fill": False, "ls": "--", "lw": 0.8, "ec": "white"}
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, **dashed))
        for box, label, score in zip(
            pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep], strict=True
        ):
            x1, y1, x2, y2 = box.tolist()
            c = pal[int(label) % len(pal)].tolist()
            ax.add_patch(
                Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=c)
            )
            name = classes[int(label)] if int(label) < len(classes) else str(int(label))
            tag = {"color": "white", "fontsize": 6, "va": "bottom"}
            ax.text(x1, y1, f"{name} {float(score):.2f}", bbox={"fc": c, "ec": "none"}, **tag)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path, title)
