"""``mimkit finetune``: end-to-end fine-tuning of a pretrained (or random) ViT for classification.

The protocol of BEiT (Sec. 3.1, Table 6) and MAE (Appendix A.2): average-pooled patch tokens with
``fc_norm`` (or the cls token), layer-wise lr decay, AdamW with warm-up and cosine decay, label
smoothing, Mixup/CutMix, RandAugment, random erasing, drop path, optional weight EMA.

Model selection is honest by default: ``val_fraction`` of the labeled training images (seeded,
class-balanced) is held out; top-1/top-5 on it every ``eval_every_epochs`` choose ``model_best``;
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
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.distributed import is_main
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
        self.step_callback = None  # called after every optimizer step (periodic evaluation)

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
        if self.step_callback is not None:
            self.step_callback(step)

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


def _best_of(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """model_best's record from an evaluation history, chosen as the run chooses it (the first
    strictly higher top-1, the EMA's when it scored higher)."""
    best = None
    for h in history:
        cands = [("model", h["top1"], h["top5"])]
        if "ema_top1" in h:
            cands.append(("ema", h["ema_top1"], h.get("ema_top5")))
        which, top1, top5 = max(cands, key=lambda c: c[1])
        if best is None or top1 > best["top1"]:
            best = {"epoch": h["epoch"], "step": h["step"], "top1": top1, "which": which,
                    "top5": top5}  # fmt: skip
    return best


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

    eval_path = run_dir / "eval.json"
    if not resume:  # a fresh run in a directory without checkpoints: no earlier run's scores
        for name in ("eval.json", "test.json"):
            (run_dir / name).unlink(missing_ok=True)
    state = {"history": [], "best": None, "selection": selection}
    if resume and eval_path.is_file():
        saved = json.loads(eval_path.read_text())
        state["history"], state["best"] = saved.get("history", []), saved.get("best")
    best_path, last_path = run_dir / "model_best.safetensors", run_dir / "model_last.safetensors"

    trainer = None

    def evaluate(epoch: float, final: bool) -> None:
        if not (final or epoch % cfg.eval_every_epochs == 0):
            return
        step = trainer.step if trainer is not None else 0
        if state["history"] and state["history"][-1]["step"] == step:
            return  # already evaluated at this step
        with torch.random.fork_rng(devices=[]):  # leave the training RNG as checkpointed
            rec = {"epoch": epoch, **evaluate_classifier(model, eval_loader, device=device)}
            ema = None
            if task.ema is not None:
                ema = evaluate_classifier(task.ema.module, eval_loader, device=device)
        candidates = [("model", rec["top1"], model)]
        if ema is not None:
            rec |= {f"ema_{k}": v for k, v in ema.items() if k != "num_images"}
            candidates.append(("ema", ema["top1"], task.ema.module))
        which, top1, best_model = max(candidates, key=lambda c: c[1])
        trainer.logger.log(rec, step=step, prefix="eval")  # jsonl + TensorBoard
        state["history"].append({"step": step, **rec})
        step_meta = {**meta, "step": step, "epoch": epoch}
        ckpt.save_weights(last_path, model.timm_state_dict(), step_meta)
        if state["best"] is None or top1 > state["best"]["top1"]:
            state["best"] = {
                "epoch": epoch,
                "step": step,
                "top1": top1,
                "which": which,
                "top5": rec["ema_top5" if which == "ema" else "top5"],
            }
            ckpt.save_weights(
                best_path, best_model.timm_state_dict(), {**step_meta, "which": which}
            )
        eval_path.write_text(json.dumps(state, indent=2) + "\n")
        print(
            f"{selection} epoch {epoch:g} (step {step}): "
            f"top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}%"
            + (f" (EMA top-1 {rec['ema_top1']:.2f}%)" if task.ema is not None else "")
            + f"; best {state['best']['top1']:.2f}% (epoch {state['best']['epoch']})",
            flush=True,
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
        on_epoch_end=evaluate,
    )
    if cfg.eval_every_steps and is_main():

        def step_eval(step: int) -> None:
            if step % cfg.eval_every_steps == 0 and step < trainer.total_steps:
                evaluate(round(step / trainer.steps_per_epoch, 3), True)

        task.step_callback = step_eval
    if resume:
        trainer.resume()
        # evaluations logged after the checkpoint are redone (the replay is exact): keep the
        # history up to it, and the best among those, as metrics.jsonl does
        state["history"] = [h for h in state["history"] if h["step"] <= trainer.step]
        state["best"] = _best_of(state["history"])
    result = trainer.fit()
    test: dict[str, Any] = {}
    if is_main():
        if result.stopped_early:
            evaluate(result.epoch, True)
        if result.stopped_early is False or result.step >= trainer.total_steps:
            test = _score_test(cfg, model, best_path, loader(data.eval), state, device, run_dir)
        _curves(run_dir, selection)
    hist = state["history"]
    return FinetuneResult(
        run_dir=run_dir,
        train=result,
        best=state["best"] or {},
        last=hist[-1] if hist else {},
        test=test,
        best_path=best_path if best_path.exists() else None,
        last_path=last_path if last_path.exists() else None,
        notes=notes,
        history=hist,
    )


def _score_test(cfg, model, best_path: Path, test_loader, state, device, run_dir: Path) -> dict:
    """The evaluation split, scored once with ``model_best``'s weights -> ``test.json``."""
    test_path = run_dir / "test.json"
    if test_path.is_file():  # a finished run, resumed: scored already
        return json.loads(test_path.read_text())
    best = state["best"] or {}
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
        "selected_on": state["selection"],
        "selected": {k: best.get(k) for k in ("step", "epoch", "top1", "which")},
    }
    if state["selection"] == "eval":
        out["note"] = (
            "val_fraction=0: model_best was chosen on this same split (optimistic); "
            "set val_fraction > 0 for a held-out choice"
        )
    test_path.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"test ({split}, scored once with model_best from step {best.get('step')}, chosen on "
        f"{state['selection']}): top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}%",
        flush=True,
    )
    return out


def _curves(run_dir: Path, selection: str = "eval") -> None:
    """figures/finetune_curves.png: training loss and validation (or evaluation) top-1 against
    the optimizer step."""
    from mimkit.viz import save_curves

    train, evals = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            train.append((rec["step"], rec["loss"]))
        elif rec.get("kind") == "eval":
            evals.append((rec["step"], rec["top1"]))
    if not evals:
        return
    name = "validation" if selection == "val" else "evaluation"
    panels = {"training loss": {"train": train}, f"{name} top-1 (%)": {selection: evals}}
    save_curves(panels, run_dir / "figures" / "finetune_curves.png", xlabel="optimizer step")
