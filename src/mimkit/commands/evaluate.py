"""``mimkit eval``: score a classifier, segmenter or detector checkpoint; train nothing
(:mod:`mimkit.tasks.evaluate`)."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command, add_config_args, print_skipped
from mimkit.commands.recipe import schema_for

__all__ = ["COMMANDS"]


def run(args: argparse.Namespace) -> int:
    """Score the checkpoint the recipe's ``model.init`` names on its evaluation split."""
    from mimkit.config import load_config

    schema = schema_for("auto", args.config)
    if schema.__name__ in ("SegmentConfig", "DetectConfig"):  # a segment or detect recipe
        cfg = load_config(args.config, args.overrides, schema=schema)
        from mimkit.tasks.evaluate import run_dense_eval

        r = run_dense_eval(cfg)
        shown = {k: v for k, v in r.metrics.items() if isinstance(v, float)}
        print(f"eval ({r.split}, {r.metrics['num_images']} images): "
              + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))  # fmt: skip
        print(f"results: {r.run_dir / 'eval.json'}")
        return 0
    cfg = load_config(args.config, args.overrides, schema=schema_for("finetune", args.config))
    from mimkit.tasks.evaluate import run_eval

    r = run_eval(cfg)
    m = r.metrics
    print(
        f"eval ({r.split}, {m['num_images']} images, {cfg.train.precision}): top-1 "
        f"{m['top1']:.2f}% / top-5 {m['top5']:.2f}%, loss {m['loss']:.4f}"
    )
    print(f"results: {r.run_dir / 'eval.json'}")
    print_skipped(r.run_dir)
    return 0


COMMANDS = (
    Command(
        "eval",
        help="score a classifier, segmenter or detector checkpoint on a split; trains nothing",
        description="Score a checkpoint on the evaluation split of a recipe, training nothing "
        "(the official repos' --eval): with a fine-tuning recipe, a classifier (a mimkit "
        "fine-tuning, or an official MAE/BEiT, timm or Hugging Face classifier converted with "
        "`mimkit convert`): top-1, top-5, loss; with a configs/segment or configs/detect "
        "recipe, the model_best.safetensors of a segment / detect run: mIoU or box/mask mAP. "
        "Results in run.dir/eval.json.",
        arguments=add_config_args,
        run=run,
    ),
)
