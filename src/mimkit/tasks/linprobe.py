"""``mimkit linprobe``: linear probing of a frozen encoder on cached features.

MAE's protocol (Appendix A.3): frozen encoder, a BatchNorm without affine parameters before a
linear classifier, LARS (or SGD) with a large batch, warm-up then cosine decay, no weight decay.
BEiT's linear probes report the best block (``probe.layers=all``): every block's pooled output is
probed at once, the block is chosen on a held-out part of the training split, and its test
accuracy is reported (every block's is recorded too). The encoder never changes, so its features
are computed once, without augmentation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mimkit.config.downstream import LinprobeConfig, ProbeConfig
from mimkit.data import SKIP_REPORT, AugmentedView, EvalTransform
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.logging import MetricsLogger
from mimkit.engine.optim import cosine_lr, set_lr
from mimkit.engine.progress import progress
from mimkit.engine.rundir import prepare_run, record_resolved
from mimkit.tasks.downstream import classify_data, downstream_provenance, load_encoder
from mimkit.tasks.knn import feature_autocast

__all__ = ["LinearProbes", "LinprobeResult", "block_features", "run_linprobe", "train_probes"]


def block_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    layers: list[int],
    pool: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    precision: str = "fp32",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (L, M, D) float32 on CPU, labels (M,)): pooled outputs of blocks ``layers``.

    Each block's tokens go through the encoder's final norm (the last block's is then exactly
    ``forward_features``) before pooling. ``pool``: "cls", "avg" (the patch tokens' mean), or
    "cls_avg" (both concatenated, D doubled: DINO's linear evaluation of ViT-B).
    """
    was = encoder.training
    encoder.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in layers]
    labels = []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    # as extract_features: the concatenation outside inference mode makes ordinary tensors
    with torch.inference_mode(), feature_autocast(encoder, device, precision):
        for imgs, y in progress(loader, desc=desc):
            outs = encoder.forward_intermediates(imgs.to(device), layers, norm=True)  # L x (B,T,D)
            for i, tokens in enumerate(outs):
                if pool == "cls_avg":
                    cls, avg = encoder.pool(tokens, "cls"), encoder.pool(tokens, "avg")
                    pooled = torch.cat([cls, avg], -1)
                else:
                    pooled = encoder.pool(tokens, pool)
                feats[i].append(pooled.float().cpu())
            labels.append(torch.as_tensor(y))
    encoder.train(was)
    return torch.stack([torch.cat(f) for f in feats]), torch.cat(labels)


class LinearProbes(nn.Module):
    """One BatchNorm (no affine) + linear classifier per feature set: (L, B, D) -> (L, B, C)."""

    def __init__(self, num_sets: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.ModuleList(
            nn.BatchNorm1d(dim, affine=False, eps=1e-6) for _ in range(num_sets)
        )
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_sets))
        for head in self.heads:  # MAE: trunc_normal(std=0.01), zero bias
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(bn(f)) for f, bn, h in zip(feats, self.bn, self.heads, strict=True)])


def _optimizer(probes: LinearProbes, p: ProbeConfig) -> torch.optim.Optimizer:
    weights = [h.weight for h in probes.heads]
    biases = [h.bias for h in probes.heads]
    if p.optimizer == "lars":
        from timm.optim import Lars

        # MAE's LARS: trust-ratio scaling for weight matrices, plain momentum SGD for biases
        return Lars(
            [
                {"params": weights, "weight_decay": p.weight_decay, "always_adapt": True},
                {"params": biases, "weight_decay": 0.0, "always_adapt": False},
            ],
            lr=p.lr,
            momentum=p.momentum,
        )
    return torch.optim.SGD(
        [
            {"params": weights, "weight_decay": p.weight_decay},
            {"params": biases, "weight_decay": 0},
        ],
        lr=p.lr,
        momentum=p.momentum,
    )


def _accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(L, M, C) logits -> (L,) top-k accuracy in percent."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (L, M, k)
    return 100.0 * (top == y[None, :, None]).any(-1).float().mean(-1)


def train_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    num_classes: int,
    p: ProbeConfig,
    seed: int,
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    log=None,
) -> tuple[LinearProbes, list[dict[str, Any]]]:
    """Train one probe per feature set of ``train_x`` (L, M, D); returns (probes, history).

    ``history`` holds, per epoch, the mean training loss and every probe's top-1 on ``eval_sets``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    L, M, D = train_x.shape
    probes = LinearProbes(L, D, num_classes)
    opt = _optimizer(probes, p)
    bs = min(p.batch_size, M)
    steps_per_epoch = max(1, M // bs)  # drop the last partial batch, as the official loaders
    total, warmup = p.epochs * steps_per_epoch, round(p.warmup_epochs * steps_per_epoch)
    history, step = [], 0
    for epoch in range(p.epochs):
        probes.train()
        order = torch.randperm(M, generator=g)
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            set_lr(
                opt, cosine_lr(step, lr=p.lr, min_lr=0.0, warmup_steps=warmup, total_steps=total)
            )
            logits = probes(train_x[:, idx])  # (L, B, C)
            loss = F.cross_entropy(logits.flatten(0, 1), train_y[idx].repeat(L)) * L
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() / L
            step += 1
        rec: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch}
        last = epoch + 1 == p.epochs
        if eval_sets and (last or (epoch + 1) % max(1, p.epochs // 10) == 0):
            probes.eval()
            with torch.no_grad():
                for name, (x, y) in eval_sets.items():
                    rec[f"{name}_top1"] = _accuracy(probes(x), y).tolist()
        if log is not None:
            log(rec)
        history.append(rec)
    probes.eval()
    return probes, history


@dataclasses.dataclass
class LinprobeResult:
    run_dir: Path
    layer: int  # the block whose probe is reported (0-based)
    top1: float
    top5: float
    per_layer_top1: list[float]  # test top-1 of every probed block (layers=all)
    val_top1: list[float] | None  # held-out top-1 used to choose the block
    raw_pixels: dict[str, float] | None
    num_train: int
    num_test: int


def run_linprobe(cfg: LinprobeConfig) -> LinprobeResult:
    """Linear probe as ``cfg`` says; writes eval.json, probe.safetensors, metrics and a figure."""
    run_dir, device = prepare_run(cfg, resume=False, single_process="mimkit linprobe")
    e, p = cfg.model, cfg.probe
    loaded = load_encoder(e)
    encoder = loaded.encoder.to(device)
    for note in loaded.notes:
        print(f"linprobe: {note}", flush=True)
    data = classify_data(
        cfg.data, img_size=e.img_size, channels=e.in_chans, seed=cfg.run.seed,
        mean=loaded.mean, std=loaded.std, report=run_dir / SKIP_REPORT,
    )  # fmt: skip
    record_resolved(run_dir, {"data.mean": data.mean, "data.std": data.std})
    for param in encoder.parameters():
        param.requires_grad_(False)
    layers = list(range(e.depth)) if p.layers == "all" else [e.depth - 1]
    if p.last_blocks > 1:  # DINO: the last N blocks, concatenated into one feature set
        layers = list(range(e.depth - p.last_blocks, e.depth))
    tf = EvalTransform(e.img_size, data.mean, data.std, cfg.data.eval_crop_pct)
    views = [AugmentedView(ds, tf) for ds in (data.train, data.eval)]
    opts = dict(
        layers=layers,
        pool=p.pool,
        batch_size=p.feature_batch_size,
        device=device,
        num_workers=cfg.data.num_workers,
        precision=p.precision,
    )
    print(
        f"linprobe: features ({p.precision}) of {len(views[0])} + {len(views[1])} images, blocks "
        f"{[i + 1 for i in layers]}",
        flush=True,
    )
    train_x, train_y = block_features(encoder, views[0], **opts, desc="linprobe: training features")
    test_x, test_y = block_features(encoder, views[1], **opts, desc="linprobe: test features")
    blocks = [i + 1 for i in layers]  # 1-based, as reported
    if p.last_blocks > 1:  # (N, M, D) -> (1, M, N * D), blocks in order
        train_x, test_x = (torch.cat(list(x), dim=-1)[None] for x in (train_x, test_x))
        layers = [e.depth - 1]

    # layers=all: choose the block on a held-out part of the training features
    fit_x, fit_y, val = train_x, train_y, None
    if len(layers) > 1:
        g = torch.Generator().manual_seed(cfg.run.seed)
        perm = torch.randperm(train_x.shape[1], generator=g)
        n_val = max(1, round(p.val_fraction * len(perm)))
        val = (train_x[:, perm[:n_val]], train_y[perm[:n_val]])
        fit_x, fit_y = train_x[:, perm[n_val:]], train_y[perm[n_val:]]
    logger = MetricsLogger(run_dir)
    evals = {"test": (test_x, test_y)} | ({"val": val} if val is not None else {})
    probes, _ = train_probes(
        fit_x,
        fit_y,
        num_classes=data.num_classes,
        p=p,
        seed=cfg.run.seed,
        eval_sets=evals,
        log=lambda rec: logger.log(
            {
                "epoch": rec["epoch"],
                "loss": rec["loss"],
                **({"test_top1": max(rec["test_top1"])} if "test_top1" in rec else {}),
            },
            step=rec["epoch"],
            prefix="linprobe",
        ),
    )
    with torch.no_grad():
        test_logits = probes(test_x)  # (L, M, C)
        per_layer = _accuracy(test_logits, test_y).tolist()
        top5 = _accuracy(test_logits, test_y, 5).tolist()
        val_top1 = _accuracy(probes(val[0]), val[1]).tolist() if val is not None else None
    best = int(torch.tensor(val_top1).argmax()) if val_top1 is not None else 0

    raw = None
    if p.raw_pixels:
        flat = [torch.stack([v[i][0].flatten() for i in range(len(v))])[None] for v in views]
        if flat[0].shape[-1] <= 65536:
            pr, _ = train_probes(
                flat[0], train_y, num_classes=data.num_classes, p=p, seed=cfg.run.seed
            )
            with torch.no_grad():
                lg = pr(flat[1])
            raw = {
                "top1": _accuracy(lg, test_y)[0].item(),
                "top5": _accuracy(lg, test_y, 5)[0].item(),
            }
    result = LinprobeResult(
        run_dir,
        layers[best],
        per_layer[best],
        top5[best],
        per_layer,
        val_top1,
        raw,
        fit_x.shape[1],
        test_x.shape[1],
    )
    record = {
        "linprobe": {
            **dataclasses.asdict(result),
            "run_dir": str(run_dir),
            "pool": p.pool,
            "optimizer": p.optimizer,
            "epochs": p.epochs,
            "blocks": blocks,
            "last_blocks": p.last_blocks,
            "feature_dim": train_x.shape[-1],
            "notes": loaded.notes,
        }
    }
    (run_dir / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.log(
        {"top1": result.top1, "top5": result.top5, "block": result.layer + 1},
        step=p.epochs,
        prefix="eval",
    )
    logger.close()
    state = {
        "bn.running_mean": probes.bn[best].running_mean,
        "bn.running_var": probes.bn[best].running_var,
        "head.weight": probes.heads[best].weight,
        "head.bias": probes.heads[best].bias,
    }
    ckpt.save_weights(
        run_dir / "probe.safetensors",
        state,
        {
            **downstream_provenance(
                "linear_probe",
                e,
                loaded,
                classes=data.classes,
                mean=data.mean,
                std=data.std,
                dataset=cfg.data.name,
                epochs=p.epochs,
            ),
            "block": layers[best] + 1,
            "pool": p.pool,
            "last_blocks": p.last_blocks,
            "top1": result.top1,
        },
    )
    if len(layers) > 1:
        from mimkit.viz import save_curves

        xs = [i + 1 for i in layers]
        panels = {
            "linear probe top-1 by block (%)": {
                "test": list(zip(xs, per_layer, strict=True)),
                "held-out (selects the block)": list(zip(xs, val_top1, strict=True)),
            }
        }
        save_curves(panels, run_dir / "figures" / "linprobe_layers.png", xlabel="block")
    return result
