"""``mimkit finetune``: end-to-end fine-tuning of a pretrained (or random) ViT for classification.

The protocol of BEiT (Sec. 3.1, Table 6) and MAE (Appendix A.2): average-pooled patch tokens with
``fc_norm`` (or the cls token), layer-wise lr decay, AdamW with warm-up and cosine decay, label
smoothing, Mixup/CutMix, RandAugment, random erasing, drop path, optional weight EMA.

Model selection is honest by default: ``val_fraction`` of the labeled training images (seeded,
class-balanced) is held out; top-1/top-5 on it every ``eval.every_epochs`` choose ``model_best``;
the evaluation (test) split is scored once, at the end, with ``model_best``'s weights
(``test.json``). With ``val_fraction=0`` the periodic evaluations and the choice run on the
evaluation split itself, as in the official repositories (an optimistic figure, said so).
Starting from a fine-tuned checkpoint is intermediate fine-tuning (BEiT Sec. 3.1): the encoder is
kept, and the head too when the class count and pooling agree.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mimkit.config import ConfigError, to_dict
from mimkit.config.downstream import FinetuneConfig
from mimkit.data import SKIP_REPORT, AugmentedView, EvalTransform, FinetuneTransform, sample_seed
from mimkit.data.transforms import seeded_globals
from mimkit.engine.distributed import is_main
from mimkit.engine.evaluation import BEST_FILE, LAST_FILE, Evaluation
from mimkit.engine.rundir import prepare_run, record_resolved
from mimkit.engine.task import StepOutput, TaskHooks
from mimkit.engine.trainer import Trainer, TrainResult
from mimkit.models.heads import Classifier
from mimkit.tasks.downstream import (
    classify_data,
    downstream_provenance,
    evaluate_classifier,
    load_encoder,
    pretraining_normalization,
)

__all__ = ["FinetuneResult", "FinetuneTask", "build_classifier", "run_finetune"]


class FinetuneTask(TaskHooks):
    """The trainer's task: (images, labels) -> (soft-target) cross-entropy."""

    name = "finetune"

    def __init__(self, model: Classifier, cfg: FinetuneConfig, *, metadata: dict[str, Any]) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.model, self.cfg, self._meta = model, cfg, metadata
        self.device = next(model.parameters()).device
        a = cfg.aug
        self.mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=a.mixup,
                cutmix_alpha=a.cutmix,
                prob=a.mixup_prob,
                switch_prob=a.mixup_switch_prob,
                label_smoothing=a.smoothing,
                num_classes=model.num_classes,
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif a.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(a.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema.decay)
        self._seed, self._last_step, self._micro = 0, -1, 0

    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        # Mixup draws from NumPy's global generator: seed it from (seed, step, micro-step)
        self._micro = self._micro + 1 if step == self._last_step else 0
        self._last_step = step
        self._seed = sample_seed(self.cfg.run.seed + 7919, step, self._micro)

    def step(self, batch: Any) -> StepOutput:
        imgs, y = batch
        imgs, y = imgs.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        target = y
        if self.mixup is not None:
            with seeded_globals(self._seed):
                imgs, target = self.mixup(imgs, y)  # (B, C, H, W), (B, classes) soft labels
        logits = self.model(imgs)  # (B, classes)
        return StepOutput(self.criterion(logits.float(), target), {})

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def weights(self) -> dict[str, torch.Tensor]:
        state = self.model.timm_state_dict()
        if self.ema is not None:
            state |= {f"ema.{k}": v for k, v in self.ema.module.timm_state_dict().items()}
        return state

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_timm_state_dict(
            {k: v for k, v in state.items() if not k.startswith("ema.")}
        )
        if self.ema is not None:
            self.ema.module.load_timm_state_dict(
                {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
            )

    def metadata(self) -> dict[str, Any]:
        return self._meta


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    train: TrainResult
    best: dict[str, Any]  # the best evaluation (epoch, top1, top5, loss, which)
    last: dict[str, Any]
    test: dict[str, Any]  # the evaluation split scored once with model_best (test.json)
    best_path: Path | None
    last_path: Path | None
    notes: list[str]
    history: list[dict[str, Any]]


def build_classifier(cfg: FinetuneConfig, *, num_classes: int) -> tuple[Classifier, Any, list]:
    """(classifier, loaded encoder, notes): ``model.init`` loaded, the head kept or replaced."""
    e = cfg.model
    loaded = load_encoder(e, drop_norm=e.pool == "avg")
    model = Classifier(
        loaded.encoder, num_classes=num_classes, pool=e.pool, head_init_std=e.head_init_std
    )
    notes = list(loaded.notes)
    head = loaded.weights.head if loaded.weights is not None else {}
    if head:
        w = head.get("head.weight")
        same_pool = ("fc_norm.weight" in head) == (e.pool == "avg")
        if same_pool and e.pool == "avg":
            model.fc_norm.load_state_dict(
                {"weight": head["fc_norm.weight"], "bias": head["fc_norm.bias"]}
            )
        if w is not None and same_pool and tuple(w.shape) == tuple(model.head.weight.shape):
            model.head.load_state_dict({"weight": w, "bias": head["head.bias"]})
            notes.append(f"head kept ({num_classes} classes)")
        else:
            old = "?" if w is None else w.shape[0]
            notes.append(f"head replaced ({old} -> {num_classes} classes, pool {e.pool})")
    return model, loaded, notes


def freeze_all_but_last_blocks(model: Classifier, k: int) -> int:
    """MAE's partial fine-tuning: every encoder parameter frozen except those of its last ``k``
    blocks and its final norm; the classifier's ``fc_norm`` and head train. Returns the number
    of parameters frozen."""
    enc = model.encoder
    keep = {id(p) for blk in list(enc.blocks)[len(enc.blocks) - k :] for p in blk.parameters()}
    keep |= {id(p) for p in enc.norm.parameters()}
    frozen = 0
    for p in enc.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def _classifier_metadata(cfg, loaded, data, num_classes: int) -> dict[str, Any]:
    e = cfg.model
    pre = loaded.weights.metadata if loaded.weights is not None else {}
    meta = downstream_provenance(
        "classifier", e, loaded, classes=data.classes, mean=data.mean, std=data.std,
        dataset=cfg.data.name, epochs=cfg.train.epochs,
    )  # fmt: skip
    meta.update(
        layout="timm-classifier",
        pretrain_target=pre.get("target", "none"),
        num_classes=num_classes,
        pool=e.pool,
        label_fraction=cfg.data.label_fraction,
        # the encoder's architecture (no decoder: a classifier has none)
        model_config={k: v for k, v in to_dict(e.model_config()).items() if k != "decoder"},
    )
    return meta


def run_finetune(cfg: FinetuneConfig, *, resume: bool = False) -> FinetuneResult:
    """Fine-tune as ``cfg`` says; write everything to ``cfg.run.dir``."""
    e, a = cfg.model, cfg.aug
    if (a.mixup > 0 or a.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be even with Mixup/CutMix "
            "(or set aug.mixup=0 aug.cutmix=0)"
        )
    # under torchrun: DDP, every rank on its share of the batches; rank 0 evaluates and writes
    run_dir, device = prepare_run(cfg, resume=resume, ddp_only="mimkit finetune")
    # normalization: the pretraining's, so the encoder sees what it was trained on
    mean, std = pretraining_normalization(e.init)  # read from the header only
    data = classify_data(
        cfg.data,
        img_size=e.img_size,
        channels=e.in_chans,
        seed=cfg.run.seed,
        mean=mean,
        std=std,
        report=run_dir / SKIP_REPORT,
        val_fraction=cfg.val_fraction,
    )
    record_resolved(run_dir, {"data.mean": data.mean, "data.std": data.std})
    num_classes = e.num_classes or data.num_classes
    model, loaded, notes = build_classifier(cfg, num_classes=num_classes)
    if e.trainable_blocks is not None:
        frozen = freeze_all_but_last_blocks(model, e.trainable_blocks)
        notes.append(f"partial fine-tuning: the last {e.trainable_blocks} blocks, the final norm "
                     f"and the head train; {frozen:,} parameters frozen")  # fmt: skip
    model.to(device)
    meta = _classifier_metadata(cfg, loaded, data, num_classes)
    task = FinetuneTask(model, cfg, metadata=meta)
    d = cfg.data
    train_view = AugmentedView(
        data.train,
        FinetuneTransform(
            e.img_size,
            data.mean,
            data.std,
            scale=d.crop_scale,
            hflip=d.hflip,
            rand_augment=a.rand_augment,
            reprob=a.reprob,
            remode=a.remode,
        ),
        seed=cfg.run.seed,
    )

    def loader(split) -> DataLoader:
        return DataLoader(
            AugmentedView(
                split, EvalTransform(e.img_size, data.mean, data.std, cfg.data.eval_crop_pct)
            ),
            batch_size=max(cfg.train.batch_size, 256),
            shuffle=False,
            num_workers=d.num_workers,
        )

    # the periodic evaluations: the validation split, or the evaluation split without one
    selection = "val" if data.val is not None else "eval"
    eval_loader = loader(data.val if data.val is not None else data.eval)
    if is_main():
        for note in notes:
            print(f"finetune: {note}", flush=True)
        held = (
            f"{len(data.val)} held out for validation (val_fraction={cfg.val_fraction}), "
            if data.val is not None
            else "no validation split (val_fraction=0: model_best is chosen on the evaluation "
            "split), "
        )
        print(
            f"finetune: {len(data.train)} labeled training images "
            f"(label_fraction={d.label_fraction}), {held}{len(data.eval)} evaluation images, "
            f"{num_classes} classes",
            flush=True,
        )

    if not resume and is_main():  # a fresh run in a directory without checkpoints
        (run_dir / "test.json").unlink(missing_ok=True)
    evaluation = Evaluation(
        evaluate=lambda m: _scores(m, task.ema, eval_loader, device),
        metric="top1",
        every_epochs=cfg.eval.every_epochs,
        every_steps=cfg.eval.every_steps,
        weights=Classifier.timm_state_dict,
        rivals={"ema": task.ema.module} if task.ema is not None else {},
        best_keys=("top5",),
        split=selection,
        report=_report,
        info={"selection": selection},
    )
    trainer = Trainer(
        task,
        train_view,
        optim=cfg.optim,
        train=cfg.train,
        run_dir=run_dir,
        device=device,
        seed=cfg.run.seed,
        num_workers=d.num_workers,
        evaluation=evaluation,
    )
    if resume:
        trainer.resume()
    result = trainer.fit()
    best_path, last_path = run_dir / BEST_FILE, run_dir / LAST_FILE
    test: dict[str, Any] = {}
    if is_main():
        if not result.stopped_early:
            best, test_loader = result.best or {}, loader(data.eval)
            test = _score_test(cfg, model, test_loader, best_path=best_path, best=best,
                               selection=selection, device=device)  # fmt: skip
        from mimkit.viz import save_eval_curves

        name = "validation" if selection == "val" else "evaluation"
        save_eval_curves(
            run_dir, "finetune", metric="top1", title=f"{name} top-1 (%)", label=selection
        )
    hist = result.evaluations
    return FinetuneResult(
        run_dir=run_dir,
        train=result,
        best=result.best or {},
        last=hist[-1] if hist else {},
        test=test,
        best_path=best_path if best_path.exists() else None,
        last_path=last_path if last_path.exists() else None,
        notes=notes,
        history=hist,
    )


def _scores(model: Classifier, ema: Any, loader: DataLoader, device: torch.device) -> dict:
    """Top-1, top-5 and loss of ``model`` and, with a weight EMA, of the EMA (``ema_`` keys)."""
    rec = evaluate_classifier(model, loader, device=device)
    if ema is not None:
        scores = evaluate_classifier(ema.module, loader, device=device)
        rec |= {f"ema_{k}": v for k, v in scores.items() if k != "num_images"}
    return rec


def _report(rec: dict[str, Any], best: dict[str, Any]) -> str:
    """An evaluation's line: top-1 and top-5 (the EMA's top-1), then the best top-1."""
    ema = f" (EMA top-1 {rec['ema_top1']:.2f}%)" if "ema_top1" in rec else ""
    return (
        f"top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}%{ema}; "
        f"best {best['top1']:.2f}% (epoch {best['epoch']})"
    )


def _score_test(
    cfg: FinetuneConfig,
    model: Classifier,
    test_loader: DataLoader,
    *,
    best_path: Path,
    best: dict[str, Any],
    selection: str,
    device: torch.device,
) -> dict[str, Any]:
    """The evaluation split, scored once with ``model_best``'s weights -> ``test.json``."""
    test_path = best_path.parent / "test.json"
    if test_path.is_file():  # a finished run, resumed: scored already
        return json.loads(test_path.read_text())
    if not best_path.is_file():
        return {}
    from safetensors.torch import load_file

    # the trained module itself, its weights swapped for model_best's and back
    trained = {k: v.clone() for k, v in model.timm_state_dict().items()}
    model.load_timm_state_dict(load_file(str(best_path)))
    with torch.random.fork_rng(devices=[]):
        rec = evaluate_classifier(model, test_loader, device=device)
    model.load_timm_state_dict(trained)
    split = cfg.data.eval_root if cfg.data.name == "folder" else cfg.data.eval_split
    out = {
        "split": split,
        **rec,
        "weights": "model_best",
        "selected_on": selection,
        "selected": {k: best.get(k) for k in ("step", "epoch", "top1", "which")},
    }
    if selection == "eval":
        out["note"] = (
            "val_fraction=0: model_best was chosen on this same split (optimistic); "
            "set val_fraction > 0 for a held-out choice"
        )
    test_path.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"test ({split}, scored once with model_best from step {best.get('step')}, chosen on "
        f"{selection}): top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}%",
        flush=True,
    )
    return out
