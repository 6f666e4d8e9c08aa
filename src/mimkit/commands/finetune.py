"""``mimkit finetune``: end-to-end fine-tuning for classification
(:func:`mimkit.tasks.finetune.run_finetune`)."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command, print_skipped, print_stopped_early, resume_requested

__all__ = ["COMMANDS"]


def run(args: argparse.Namespace, cfg) -> int:
    """Fine-tune, then print the chosen weights' validation and test scores."""
    from mimkit.tasks.finetune import run_finetune

    r = run_finetune(cfg, resume=resume_requested(args, cfg))
    print(f"\nrun directory: {r.run_dir}")
    print(f"  steps {r.train.step}, epochs {r.train.epoch}, last loss {r.train.loss:.4f}")
    split = "validation" if cfg.val_fraction > 0 else "evaluation"
    if r.best:
        print(
            f"  best {split} top-1 {r.best['top1']:.2f}% / top-5 {r.best['top5']:.2f}% at epoch "
            f"{r.best['epoch']} ({r.best['which']} weights): {r.best_path}"
        )
    if r.last:
        print(
            f"  last {split} top-1 {r.last['top1']:.2f}% / top-5 {r.last['top5']:.2f}%: "
            f"{r.last_path}"
        )
    if r.test:
        print(
            f"  test top-1 {r.test['top1']:.2f}% / top-5 {r.test['top5']:.2f}% "
            f"({r.test['num_images']} images, scored once with model_best"
            + (", chosen on this same split: optimistic)" if r.test.get("note") else ")")
        )
    print(f"  metrics: {r.run_dir / 'metrics.jsonl'}, {r.run_dir / 'eval.json'}, test.json")
    print(f"  figure:  {r.run_dir / 'figures' / 'finetune_curves.png'}")
    print_skipped(r.run_dir)
    print_stopped_early(r.train, r.run_dir)
    return 0


COMMANDS = (
    Command(
        "finetune",
        help="fine-tune a pretrained (or random) ViT for classification",
        description="Fine-tune end to end (BEiT / MAE protocol: layer-wise lr decay, "
        "Mixup/CutMix, RandAugment, label smoothing, drop path). model.init: a pretraining or "
        "fine-tuning run, checkpoint or .safetensors file; null trains from scratch. Writes "
        "config.yaml, metrics.jsonl, eval.json, checkpoints/, model_best.safetensors, "
        "model_last.safetensors and figures/finetune_curves.png to run.dir.",
        schema="mimkit.config.downstream:FinetuneConfig",
        run=run,
        resume=True,
        dry_run="finetune_plan",
    ),
)
