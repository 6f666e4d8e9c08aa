"""``mimkit pretrain --dry-run``: what a recipe would do, at its real size, without training.

The model is built on PyTorch's ``meta`` device (shapes only: no memory, no weights), so a
ViT-H recipe is described in seconds on a laptop: parameter count, the global batch and its
accumulation on this number of processes, steps per epoch and in total, and the FLOPs of one
optimizer step (forward and backward, counted as :func:`mimkit.engine.perf.count_flops` counts
them on one micro-batch, times the micro-batches of a step and the processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimkit.config import PretrainConfig
from mimkit.config.pretrain import IMAGE_SUFFIXES
from mimkit.ranks import world_size

__all__ = ["Plan", "dense_plan", "finetune_plan", "format_plan", "pretrain_plan", "tokenizer_plan"]

FMNIST_SIZES = {"train": 60_000, "test": 10_000}


@dataclass
class Plan:
    method: str
    arch: str
    params: int  # the whole pretraining model's (encoder, decoder / MIM head)
    encoder_params: int
    processes: int
    batch_size: int  # per process, per micro-step
    accum_steps: int
    global_batch: int
    lr: float
    images: int | None  # one epoch's (None: a stream of unknown length)
    steps_per_epoch: int | None
    total_steps: int | None
    epochs: int
    flops_per_step: int  # all processes together
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _dataset_size(cfg: PretrainConfig) -> int | None:
    d = cfg.data
    if d.name == "synthetic":
        n = d.synthetic_size
    elif d.name == "fashion_mnist":
        n = FMNIST_SIZES.get(d.split, 60_000)
    elif d.name == "folder":
        n = sum(
            1
            for _, _, files in os.walk(d.root, followlinks=True)
            for f in files
            if Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    else:  # shards: a stream
        return None
    return min(n, d.max_samples) if d.max_samples else n


def pretrain_plan(cfg: PretrainConfig, *, vocab_size: int = 8192) -> Plan:
    """Describe ``cfg``'s run (see the module docstring); nothing is trained or written."""
    from mimkit.engine.perf import count_flops
    from mimkit.masking import mask_from_bool
    from mimkit.models import build_beit, build_mae
    from mimkit.models.beit import mim_token_loss
    from mimkit.tasks.pretrain import mask_sampler

    m, t, o = cfg.model, cfg.train, cfg.optim
    with torch.device("meta"):
        model = build_mae(cfg) if m.method == "mae" else build_beit(cfg, vocab_size=vocab_size)
    params = sum(p.numel() for p in model.parameters())
    enc = sum(p.numel() for n, p in model.named_parameters() if not _decoder_param(n))
    b = t.batch_size
    imgs = torch.empty(b, m.in_chans, m.img_size, m.img_size, device="meta")
    sampler = mask_sampler(cfg)
    if m.method == "mae":

        def step() -> None:
            model.loss(imgs, model(imgs)).backward()  # MAE masks inside its forward
    else:
        g = torch.Generator().manual_seed(0)  # the mask's shape is what counts: made on the CPU
        cpu_mask = mask_from_bool(torch.stack([sampler(g) for _ in range(b)]))
        mask = type(cpu_mask)(*(x.to("meta") for x in cpu_mask))
        n = (m.img_size // m.patch_size) ** 2
        ids = torch.zeros(b, n, dtype=torch.long, device="meta")

        def step() -> None:
            out = model(imgs, mask)
            mim_token_loss(out.pred, ids, out.index)[0].backward()

    procs = world_size()
    flops = count_flops(step) * o.accum_steps * procs
    images = _dataset_size(cfg)
    spe = images // procs // b // o.accum_steps if images is not None else None
    total = t.steps or (spe * t.epochs if spe is not None else None)
    return Plan(m.method, m.arch, params, enc, procs, b, o.accum_steps, b * o.accum_steps * procs,
                o.lr, images, spe, total, t.epochs, flops, t.precision)  # fmt: skip


def finetune_plan(cfg: Any) -> Plan:
    """The same description for a fine-tuning recipe: the classifier on the meta device (no
    weights read), the labeled training images after ``label_fraction`` and ``val_fraction``."""
    from mimkit.engine.perf import count_flops
    from mimkit.models import build_encoder
    from mimkit.models.heads import Classifier
    from mimkit.tasks.downstream import classify_data

    e, t, o = cfg.model, cfg.train, cfg.optim
    data = classify_data(cfg.data, img_size=e.img_size, channels=e.in_chans, seed=cfg.run.seed,
                         mean=[0.5] * e.in_chans, std=[0.5] * e.in_chans,
                         val_fraction=cfg.val_fraction)  # fmt: skip
    classes = e.num_classes or data.num_classes
    with torch.device("meta"):
        enc = build_encoder(e.model_config(), fixed_pos_embed=False, mask_token=False)
        model = Classifier(enc, num_classes=classes, pool=e.pool)
    b = t.batch_size
    imgs = torch.empty(b, e.in_chans, e.img_size, e.img_size, device="meta")
    target = torch.zeros(b, dtype=torch.long, device="meta")

    def step() -> None:
        torch.nn.functional.cross_entropy(model(imgs), target).backward()

    procs = world_size()
    flops = count_flops(step) * o.accum_steps * procs
    images = len(data.train)
    spe = images // procs // b // o.accum_steps
    n_model, n_enc = (sum(p.numel() for p in m.parameters()) for m in (model, enc))
    return Plan("classifier", f"{e.arch or 'custom'} ({e.method}, {classes} classes)",
                n_model, n_enc,
                procs, b, o.accum_steps, b * o.accum_steps * procs, o.lr, images, spe,
                t.steps or spe * t.epochs, t.epochs, flops, t.precision)  # fmt: skip


def dense_plan(cfg: Any) -> Plan:
    """The same for a segmentation or detection recipe: the model (encoder + head) on the meta
    device; FLOPs are counted for segmenters (a detector's proposal sampling and RoI ops need real
    tensors: its FLOPs are left at 0, said as not counted)."""
    from mimkit.config.dense import SegmentConfig
    from mimkit.engine.perf import count_flops
    from mimkit.tasks.dense import dense_data

    seg = isinstance(cfg, SegmentConfig)
    e, t, o = cfg.model, cfg.train, cfg.optim
    data = dense_data(cfg.data, channels=e.in_chans, mean=[0.5] * e.in_chans,
                      std=[0.5] * e.in_chans)  # fmt: skip
    init, e.init = e.init, None  # the architecture only: no weights are read
    try:
        with torch.device("meta"):
            if seg:
                from mimkit.tasks.segment import build_segmenter

                model, loaded = build_segmenter(cfg, num_classes=data.num_classes)
            else:
                from mimkit.tasks.detect import build_detector_from_config

                model, loaded = build_detector_from_config(
                    cfg, num_classes=data.num_classes, mean=data.mean, std=data.std
                )
    finally:
        e.init = init
    b, procs = t.batch_size, world_size()
    flops = 0
    if seg:
        imgs = torch.empty(b, e.in_chans, e.img_size, e.img_size, device="meta")
        labels = torch.zeros(b, e.img_size, e.img_size, dtype=torch.long, device="meta")

        def step() -> None:
            out = model(imgs)
            out = out[0] if isinstance(out, tuple) else out
            torch.nn.functional.cross_entropy(out, labels).backward()

        flops = count_flops(step) * o.accum_steps * procs
    images = len(data.train)
    spe = images // procs // b // o.accum_steps
    n_model = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in loaded.encoder.parameters())
    name = (
        f"{cfg.head.kind} on {e.arch or 'custom'}" if seg else f"detector on {e.arch or 'custom'}"
    )
    return Plan("segmenter" if seg else "detector", name, n_model, n_enc, procs, b,
                o.accum_steps, b * o.accum_steps * procs, o.lr, images, spe,
                t.steps or spe * t.epochs, t.epochs, flops, t.precision)  # fmt: skip


def tokenizer_plan(cfg: Any) -> Plan:
    """The same for ``mimkit tokenizer train``: the dVAE on the meta device."""
    from mimkit.engine.perf import count_flops
    from mimkit.models.tokenizer import dvae_loss
    from mimkit.tasks.tokenizer import build_dvae

    tk, t, o = cfg.tokenizer, cfg.train, cfg.optim
    with torch.device("meta"):
        model = build_dvae(cfg)
    b = t.batch_size
    imgs = torch.empty(b, tk.in_chans, tk.img_size, tk.img_size, device="meta")

    def step() -> None:
        out = model(imgs, temperature=1.0, hard=cfg.loss.straight_through)
        dvae_loss(out.recon, imgs, out.logits, kl_weight=cfg.loss.kl_weight).total.backward()

    procs = world_size()
    flops = count_flops(step) * o.accum_steps * procs
    images = _dataset_size(cfg)
    spe = images // procs // b // o.accum_steps if images is not None else None
    n = sum(p.numel() for p in model.parameters())
    return Plan("tokenizer", f"dVAE, {tk.vocab_size} codes", n, n, procs, b, o.accum_steps,
                b * o.accum_steps * procs, o.lr, images, spe,
                t.steps or (spe * t.epochs if spe is not None else None), t.epochs, flops,
                t.precision)  # fmt: skip


def _decoder_param(name: str) -> bool:
    return name.startswith(("decoder", "mask_token", "lm_head"))


def format_plan(p: Plan) -> str:
    def big(x: float) -> str:
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if x >= scale:
                return f"{x / scale:.2f}{unit}"
        return f"{x:.0f}"

    on = f" x {p.processes} processes" if p.processes > 1 else " (1 process)"
    epoch = (f"{p.images:,} images per epoch, {p.steps_per_epoch:,} steps per epoch"
             if p.images is not None else "a stream: steps per epoch unknown")  # fmt: skip
    total = f"{p.total_steps:,}" if p.total_steps is not None else "unknown"
    lines = [
        f"dry run: {p.method.upper()} {p.arch}, {big(p.params)} parameters"
        + (f" (encoder {big(p.encoder_params)})" if p.encoder_params != p.params else "")
        + f", {p.precision}",
        f"  global batch {p.global_batch:,} = batch_size {p.batch_size}{on} x accum_steps "
        f"{p.accum_steps}; lr {p.lr:.3g}",
        f"  {epoch}; {total} steps in total ({p.epochs} epochs)",
        (
            f"  {big(p.flops_per_step)}FLOP per optimizer step (forward + backward, all processes)"
            + (f", {big(p.flops_per_step * p.total_steps)}FLOP in total" if p.total_steps else "")
        )
        if p.flops_per_step
        else "  FLOPs not counted (a detector's sampling and RoI ops need real tensors)",
        "  nothing was trained or written (drop --dry-run to start)",
    ]
    return "\n".join(lines)
