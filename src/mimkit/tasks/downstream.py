"""What the downstream commands share: the encoder from ``model.init`` and the labeled data.

Loading a pretrained encoder for a downstream task follows the official code: the MAE decoder and
BEiT's MIM head and mask embedding are dropped; BEiT's shared relative position table is copied
into every block (per-layer tables, BEiT fine-tuning); position embeddings and relative position
tables are interpolated when the image size changes; with average pooling the final norm is
replaced by ``fc_norm``. Every such step is reported in ``notes``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from mimkit.config import ConfigError
from mimkit.config.downstream import ClassifyDataConfig, EncoderConfig
from mimkit.data import build_dataset, dataset_labels, holdout_split, labeled_subset
from mimkit.models import build_encoder
from mimkit.models.loading import EncoderWeights, load_encoder_weights
from mimkit.models.resize import expand_shared_rel_pos_bias, resize_encoder_state
from mimkit.weights import open_weights

__all__ = [
    "ClassifyData",
    "LoadedEncoder",
    "classify_data",
    "downstream_provenance",
    "evaluate_classifier",
    "load_encoder",
    "pretraining_normalization",
]

_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


@dataclass
class LoadedEncoder:
    encoder: nn.Module
    weights: EncoderWeights | None  # None: random init
    mean: list[float] | None  # the pretraining normalization (None: random init)
    std: list[float] | None
    notes: list[str]


def load_encoder(e: EncoderConfig, *, drop_norm: bool = False) -> LoadedEncoder:
    """Build the encoder ``e`` describes and load ``e.init`` into it (strictly).

    ``drop_norm``: the final norm's weights are not loaded (a classifier with ``fc_norm``).
    """
    encoder = build_encoder(e.model_config(), fixed_pos_embed=False, mask_token=False)
    if drop_norm:
        encoder.norm = nn.Identity()  # replaced by the classifier's fc_norm
    if e.init is None:
        return LoadedEncoder(encoder, None, None, None, ["random init (from scratch)"])
    w = load_encoder_weights(e.init)
    state, notes = dict(w.encoder), [f"weights from {w.path}"]
    saved = w.metadata.get("model_config", {})
    if _SHARED_TABLE in state and e.rel_pos_bias == "per_layer":
        state = expand_shared_rel_pos_bias(state, depth=e.depth)
        notes.append(f"shared relative position table copied into {e.depth} blocks")
    elif _SHARED_TABLE not in state and e.rel_pos_bias == "shared" and e.method == "beit":
        raise ConfigError(
            f"model.rel_pos_bias='shared' but {w.path} has no shared relative position table "
            "(use per_layer)"
        )
    if e.rel_pos_bias == "none":
        dropped = [k for k in state if "relative_position_bias_table" in k]
        if dropped:
            state = {k: v for k, v in state.items() if k not in dropped}
            notes.append(f"relative position tables dropped ({len(dropped)}; rel_pos_bias=none)")
    p = e.patch_size
    old = int(saved.get("img_size", e.img_size))
    if old != e.img_size:
        state = resize_encoder_state(
            state, old_grid=(old // p, old // p), new_grid=(e.img_size // p, e.img_size // p)
        )
        notes.append(f"position tables interpolated (bicubic) from {old}px to {e.img_size}px")
    if drop_norm:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.init={e.init!r}: the weights do not fit the encoder: missing keys "
            f"{sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}"
        )
    mean, std = w.metadata.get("mean"), w.metadata.get("std")
    return LoadedEncoder(encoder, w, mean, std, notes)


@dataclass
class ClassifyData:
    train: Dataset  # labeled (a class-balanced fraction) training samples, raw uint8 images
    eval: Dataset  # the evaluation (test) split
    val: Dataset | None  # held out of the labeled training samples (val_fraction > 0)
    num_classes: int
    classes: tuple[str, ...]
    mean: list[float]
    std: list[float]


def classify_data(
    d: ClassifyDataConfig,
    *,
    img_size: int,
    channels: int,
    seed: int,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    report: str | Path | None = None,
    val_fraction: float = 0.0,
) -> ClassifyData:
    """Training, validation and evaluation splits; normalization: data.mean/std, else
    ``mean``/``std`` (the pretraining's), else the training set's statistics.

    ``val_fraction`` > 0: a seeded, class-balanced share of the labeled training samples is held
    out as the validation split (the seed of the label subset, offset), disjoint from training."""
    kw = dict(img_size=img_size, channels=channels, report=report)  # bad images listed there
    train_base = build_dataset(d, **kw)
    if d.name == "folder":
        eval_cfg = dataclasses.replace(d, root=d.eval_root, max_samples=d.eval_max_samples)
        eval_base = build_dataset(eval_cfg, **kw)
    else:
        eval_cfg = dataclasses.replace(d, split=d.eval_split, max_samples=d.eval_max_samples)
        eval_base = build_dataset(eval_cfg, **kw)
    train_classes = tuple(getattr(train_base, "classes", ()) or ())
    eval_classes = tuple(getattr(eval_base, "classes", ()) or ())
    if d.name == "folder" and train_classes != eval_classes:
        raise ConfigError(
            f"data.root has classes {list(train_classes)[:10]} but data.eval_root has "
            f"{list(eval_classes)[:10]}: both need the same class subfolders"
        )
    seed = d.label_seed if d.label_seed is not None else seed
    try:
        train = labeled_subset(train_base, fraction=d.label_fraction, seed=seed)
        eval_set = labeled_subset(eval_base)
        val = None
        if val_fraction > 0:
            train, val = holdout_split(train, val_fraction, seed=seed + 104729)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    labels = dataset_labels(train_base)
    num_classes = len(train_classes) or int(labels.max()) + 1
    classes = train_classes or tuple(str(i) for i in range(num_classes))
    if d.mean is not None:
        mean = list(d.mean)
    if d.std is not None:
        std = list(d.std)
    mean = list(mean) if mean is not None else list(train_base.mean)
    std = list(std) if std is not None else list(train_base.std)
    return ClassifyData(train, eval_set, val, num_classes, classes, mean, std)


def pretraining_normalization(init: str | None) -> tuple[list | None, list | None]:
    """The mean/std recorded with ``init`` (None, None for random init), from the header only:
    fine-tuning needs it to build the data, and the data's class count to build the model."""
    if init is None:
        return None, None
    meta = open_weights(init).metadata  # the handle the config resolved: not read again
    return meta.get("mean"), meta.get("std")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: torch.utils.data.DataLoader, *, device: torch.device
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over ``loader``."""
    was = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for imgs, y in loader:
        imgs, y = imgs.to(device), torch.as_tensor(y).to(device)
        logits = model(imgs).float()  # (B, C)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top == y[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(y)
    model.train(was)
    return {
        "top1": 100.0 * correct1 / total,
        "top5": 100.0 * correct5 / total,
        "loss": loss_sum / total,
        "num_images": total,
    }


def downstream_provenance(
    kind: str,
    e: EncoderConfig,
    loaded: LoadedEncoder,
    *,
    classes,
    mean,
    std,
    dataset: str,
    epochs: int | None,
) -> dict:
    """The provenance every downstream checkpoint (classifier, probe, segmenter, detector)
    records: what it is, its input, its data and budget, and under ``pretrain`` what it was
    initialized from. Callers add their own fields."""
    from mimkit import __version__
    from mimkit.weights import Provenance, created_now, upstream_provenance

    pre = loaded.weights.metadata if loaded.weights is not None else {}
    extra = {
        "init": e.init or "none",
        "pretrain_method": pre.get("method", "none"),
        "num_classes": len(classes),
        "classes": list(classes),
        "img_size": e.img_size,
        "patch_size": e.patch_size,
        "in_chans": e.in_chans,
        "dataset": dataset,
        "epochs": epochs,
        "includes_decoder": False,
        "pretrain": upstream_provenance(pre),
    }
    return Provenance(
        kind=kind, method=e.method, mean=list(mean), std=list(std), created=created_now(),
        mimkit_version=__version__, extra=extra,
    ).to_metadata()  # fmt: skip
