"""``mimkit config``: print a resolved recipe; which schema a recipe is for."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimkit.commands.base import Command, add_config_args, load_schema

__all__ = ["COMMANDS", "SCHEMAS", "schema_for"]

# the config schema of each recipe command, by the folder its recipes live in (configs/<kind>/)
SCHEMAS = {
    "pretrain": "mimkit.config.pretrain:PretrainConfig",
    "tokenizer": "mimkit.config.tokenizer:TokenizerConfig",
    "finetune": "mimkit.config.downstream:FinetuneConfig",
    "linprobe": "mimkit.config.downstream:LinprobeConfig",
    "knn": "mimkit.config.downstream:KnnCommandConfig",
    "segment": "mimkit.config.dense:SegmentConfig",
    "detect": "mimkit.config.dense:DetectConfig",
}


def schema_for(kind: str, path: str | Path) -> type:
    """The schema of ``kind``; ``auto``: the recipe's folder name under configs/, else
    pretraining."""
    if kind == "auto":
        kind = Path(path).parent.name if Path(path).parent.name in SCHEMAS else "pretrain"
    return load_schema(SCHEMAS[kind])


def run(args: argparse.Namespace) -> int:
    """Validate the recipe with its overrides and print it resolved."""
    import yaml

    from mimkit.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides, schema=schema_for(args.kind, args.config))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--kind", default="auto", choices=["auto", *SCHEMAS],
                   help="the command the recipe is for (auto: the recipe's folder name under "
                   "configs/, else pretrain)")  # fmt: skip


COMMANDS = (
    Command(
        "config",
        help="print a resolved recipe",
        description="Validate a recipe with its overrides and print the resolved config "
        "(presets, the absolute lr and, downstream, the architecture of model.init filled in).",
        arguments=_arguments,
        run=run,
    ),
)
