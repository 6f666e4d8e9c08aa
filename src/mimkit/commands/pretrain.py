"""``mimkit pretrain``: MAE or BEiT pretraining (:func:`mimkit.tasks.pretrain.run_pretrain`)."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command, print_skipped, print_stopped_early, resume_requested

__all__ = ["COMMANDS"]


def run(args: argparse.Namespace, cfg) -> int:
    """Pretrain as the recipe says and print where everything went."""
    from mimkit.tasks.pretrain import run_pretrain  # PyTorch: only once the config is valid

    result = run_pretrain(cfg, resume=resume_requested(args, cfg))
    run_dir = result.run_dir
    print(f"\nrun directory: {run_dir}")
    print(
        f"  steps {result.train.step}, epochs {result.train.epoch}, "
        f"last loss {result.train.loss:.4f}"
    )
    print(f"  config:         {run_dir / 'config.yaml'}")
    print(
        f"  metrics:        {run_dir / 'metrics.jsonl'}  (TensorBoard: {run_dir / 'tensorboard'})"
    )
    print(f"  checkpoints:    {run_dir / 'checkpoints'}")
    if result.encoder_path:
        print(f"  encoder (timm): {result.encoder_path}")
    if result.figure_path and result.figure_path.exists():
        print(f"  figure:         {result.figure_path}")
    for name, r in result.knn.items():
        print(
            f"  k-NN top-1 ({name}): {r.top1:.2f}%  (k={r.k}, T={r.temperature}, {r.pool} pool, "
            f"{r.num_train} train / {r.num_test} test)"
        )
    print_skipped(run_dir)
    print_stopped_early(result.train, run_dir)
    return 0


COMMANDS = (
    Command(
        "pretrain",
        help="pretrain a ViT with MAE or BEiT (masked image modeling)",
        description="Pretrain a ViT with MAE or BEiT (model.method). Writes config.yaml, "
        "metrics.jsonl, TensorBoard events, checkpoints/, figures/ and encoder.safetensors to "
        "run.dir.",
        schema="mimkit.config.pretrain:PretrainConfig",
        run=run,
        resume=True,
        dry_run="pretrain_plan",
    ),
)
