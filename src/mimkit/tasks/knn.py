"""Weighted k-NN classification on frozen encoder features (Wu et al. 2018; DINO's protocol).

Features are L2-normalized; each test image takes its k most cosine-similar training images,
whose votes are weighted by exp(similarity / temperature).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mimkit.engine.progress import progress
from mimkit.models.vit import VisionTransformer

__all__ = [
    "KnnResult",
    "extract_features",
    "feature_autocast",
    "knn_evaluate",
    "knn_evaluate_pixels",
    "knn_predict",
    "run_knn",
]


def extract_features(
    encoder: VisionTransformer,
    dataset: Dataset,
    *,
    pool: str = "avg",
    layer: int = -1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    precision: str = "fp32",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (M, D) float32 on CPU, labels (M,)) of a dataset yielding (image, label).

    ``layer``: the block whose output is pooled (-1, the last: ``forward_features``); an earlier
    block's tokens go through the final norm too. ``precision``: fp32, or bf16 autocast.
    """
    last = layer in (-1, encoder.depth - 1)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    # inference mode, not no_grad: no autograd bookkeeping at all (~10% faster on CPU); the
    # concatenation outside it makes ordinary tensors that a probe can train on
    with torch.inference_mode(), feature_autocast(encoder, device, precision):
        for imgs, y in progress(loader, desc=desc):
            x = imgs.to(device)
            if last:
                tokens = encoder.forward_features(x)  # (B, 1+N, D)
            else:
                tokens = encoder.forward_intermediates(x, [layer], norm=True)[0]
            feats.append(encoder.pool(tokens, pool).float().cpu())
            labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@contextlib.contextmanager
def feature_autocast(
    encoder: torch.nn.Module, device: torch.device | str, precision: str
) -> Iterator[None]:
    """The context of a frozen encoder's forward at ``precision``: bf16 autocast (with the
    attention path ``train.attention=auto`` picks for it), or fp32. The encoder's attention
    flags are restored on exit."""
    from mimkit.models.attention import set_attention

    device_type = torch.device(device).type
    layers = [m for m in encoder.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in layers]
    set_attention(encoder, "auto", device_type=device_type, precision=precision)
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m.fused_attn = flag


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class (M_test,) by temperature-weighted voting of the k nearest neighbours."""
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    train = F.normalize(train_feats, dim=1)
    preds = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk], dim=1)  # (m, D)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (m, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx], weights)  # (m, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@dataclass
class KnnResult:
    top1: float  # accuracy in percent
    k: int
    temperature: float
    pool: str
    num_train: int
    num_test: int


def knn_evaluate(
    encoder: VisionTransformer,
    train_set: Dataset,
    test_set: Dataset,
    *,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "avg",
    layer: int = -1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> KnnResult:
    """Top-1 accuracy of weighted k-NN with ``encoder``'s frozen features (block ``layer``)."""
    opts = dict(pool=pool, layer=layer, batch_size=batch_size, device=device, precision=precision)
    tr_f, tr_y = extract_features(encoder, train_set, **opts, desc="k-NN: training features")
    te_f, te_y = extract_features(encoder, test_set, **opts, desc="k-NN: test features")
    pred = knn_predict(tr_f, tr_y, te_f, k=k, temperature=temperature)
    top1 = 100.0 * (pred == te_y).float().mean().item()
    return KnnResult(top1, k, temperature, pool, len(tr_f), len(te_f))


def knn_evaluate_pixels(
    train_set: Dataset, test_set: Dataset, *, k: int = 20, temperature: float = 0.07
) -> KnnResult:
    """The same k-NN on flattened normalized pixels: the baseline a representation must beat."""

    def flat(ds):
        loader = DataLoader(ds, batch_size=1024, shuffle=False)
        xs, ys = zip(*((x.flatten(1), torch.as_tensor(y)) for x, y in loader), strict=True)
        return torch.cat(xs), torch.cat(ys)

    (tr_f, tr_y), (te_f, te_y) = flat(train_set), flat(test_set)
    pred = knn_predict(tr_f, tr_y, te_f, k=k, temperature=temperature)
    top1 = 100.0 * (pred == te_y).float().mean().item()
    return KnnResult(top1, k, temperature, "pixels", len(tr_f), len(te_f))


def run_knn(cfg) -> dict[str, KnnResult]:
    """``mimkit knn``: k-NN of ``model.init`` (or a random init) on the data's two splits.

    Writes ``eval.json`` (and a line in ``metrics.jsonl``) to ``run.dir``; returns the results
    ("encoder" and, with ``knn.raw_pixels``, "raw_pixels").
    """
    import dataclasses
    import json

    from mimkit.data import SKIP_REPORT, AugmentedView, EvalTransform
    from mimkit.engine.rundir import prepare_run, record_resolved
    from mimkit.tasks.downstream import classify_data, load_encoder

    run_dir, device = prepare_run(cfg, resume=False, single_process="mimkit knn")
    e, k = cfg.model, cfg.knn
    loaded = load_encoder(e)
    for note in loaded.notes:
        print(f"knn: {note}", flush=True)
    data = classify_data(
        cfg.data, img_size=e.img_size, channels=e.in_chans, seed=cfg.run.seed,
        mean=loaded.mean, std=loaded.std, report=run_dir / SKIP_REPORT,
    )  # fmt: skip
    record_resolved(run_dir, {"data.mean": data.mean, "data.std": data.std})
    tf = EvalTransform(e.img_size, data.mean, data.std, cfg.data.eval_crop_pct)
    train, test = (AugmentedView(ds, tf) for ds in (data.train, data.eval))
    results = {
        "encoder": knn_evaluate(
            loaded.encoder.to(device),
            train,
            test,
            k=k.k,
            temperature=k.temperature,
            pool=k.pool,
            layer=k.layer,
            batch_size=k.batch_size,
            device=device,
            precision=k.precision,
        )
    }
    if k.raw_pixels:
        results["raw_pixels"] = knn_evaluate_pixels(train, test, k=k.k, temperature=k.temperature)
    record = {name: dataclasses.asdict(r) for name, r in results.items()}
    record["encoder"] |= {"init": e.init or "none", "layer": k.layer}
    (run_dir / "eval.json").write_text(json.dumps({"knn": record}, indent=2) + "\n")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "eval", "step": 0, "knn": record}) + "\n")
    return results
