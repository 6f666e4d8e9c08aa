"""``mimkit linprobe`` and ``mimkit knn``: frozen-feature protocols
(:mod:`mimkit.tasks.linprobe`, :mod:`mimkit.tasks.knn`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimkit.commands.base import Command, print_skipped

__all__ = ["COMMANDS"]


def run_linprobe(args: argparse.Namespace, cfg) -> int:
    """Probe every asked block and print the chosen one's test top-1."""
    from mimkit.tasks.linprobe import run_linprobe as run

    r = run(cfg)
    print(f"\nrun directory: {r.run_dir}")
    print(
        f"  linear probe top-1 {r.top1:.2f}% / top-5 {r.top5:.2f}% (block {r.layer + 1}, "
        f"{cfg.probe.pool} pool, {cfg.probe.optimizer}, {r.num_train} train / {r.num_test} test)"
    )
    if len(r.per_layer_top1) > 1:
        print("  test top-1 by block: " + " ".join(f"{a:.1f}" for a in r.per_layer_top1))
    if r.raw_pixels:
        print(f"  raw pixels, same probe: top-1 {r.raw_pixels['top1']:.2f}%")
    print(f"  results: {r.run_dir / 'eval.json'}, probe: {r.run_dir / 'probe.safetensors'}")
    print_skipped(r.run_dir)
    return 0


def run_knn(args: argparse.Namespace, cfg) -> int:
    """Weighted k-NN on frozen features; print each feature's top-1."""
    from mimkit.tasks.knn import run_knn as run

    for name, r in run(cfg).items():
        print(
            f"k-NN top-1 ({name}): {r.top1:.2f}%  (k={r.k}, T={r.temperature}, {r.pool}, "
            f"{r.num_train} train / {r.num_test} test)"
        )
    print(f"results: {cfg.run.dir}/eval.json")
    print_skipped(Path(cfg.run.dir))
    return 0


COMMANDS = (
    Command(
        "linprobe",
        help="linear probe on frozen features",
        description="Linear probing (MAE: BatchNorm without affine + linear, LARS; BEiT: the "
        "best block with probe.layers=all) on cached frozen features. Writes eval.json, "
        "probe.safetensors and metrics.jsonl to run.dir.",
        schema="mimkit.config.downstream:LinprobeConfig",
        run=run_linprobe,
    ),
    Command(
        "knn",
        help="weighted k-NN on frozen features",
        description="Weighted k-NN (cosine similarity, temperature) on the frozen features of "
        "any block. Writes eval.json to run.dir.",
        schema="mimkit.config.downstream:KnnCommandConfig",
        run=run_knn,
    ),
)
