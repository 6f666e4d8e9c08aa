"""What a ``mimkit`` subcommand is (:class:`Command`) and the pieces the recipe commands share.

A recipe command (``-c RECIPE KEY=VALUE ...``) declares its config schema by import path, so
that ``--help`` and config errors never import PyTorch; its ``run`` receives the loaded,
validated config. The other commands add their own arguments and receive the parsed ones.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OVERRIDES_HELP",
    "Command",
    "add_config_args",
    "load_schema",
    "print_skipped",
    "print_stopped_early",
    "resume_requested",
]

OVERRIDES_HELP = "config overrides as key.sub=value (dotlist), applied after the recipe"
RESUME_HELP = "continue the run in run.dir from its latest complete checkpoint"
DRY_RUN_HELP = (
    "print the resolved config, parameters, batch and accumulation, steps and FLOPs per step "
    "(the model on the meta device), and stop"
)


@dataclass(frozen=True)
class Command:
    """One subcommand: its parser and what it runs.

    ``schema``: ``"module:Class"`` of the config a recipe command loads (None: not a recipe
    command). ``run(args, cfg)`` for a recipe command, ``run(args)`` otherwise. ``resume`` adds
    ``--resume``; ``dry_run``: the :mod:`mimkit.tasks.dryrun` plan behind ``--dry-run``.
    ``arguments`` adds the command's own arguments; ``actions``: sub-subcommands
    (``mimkit tokenizer train``), in which case the command itself runs nothing.
    """

    name: str
    help: str
    description: str = ""
    schema: str | None = None
    run: Callable[..., int] | None = None
    resume: bool = False
    dry_run: str | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    actions: Sequence[Command] = field(default_factory=tuple)
    metavar: str = "ACTION"

    def register(self, subparsers: Any, dest: str = "command") -> argparse.ArgumentParser:
        """Add this command (and its actions) to ``subparsers`` (from ``add_subparsers``)."""
        p = subparsers.add_parser(self.name, help=self.help, description=self.description or None)
        if self.actions:
            sub = p.add_subparsers(dest=f"{dest}_{self.name}", metavar=self.metavar, required=True)
            for action in self.actions:
                action.register(sub, dest=f"{dest}_{self.name}")
            return p
        if self.schema is not None:
            add_config_args(p)
        if self.resume:
            p.add_argument("--resume", action="store_true", help=RESUME_HELP)
        if self.dry_run:
            p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
        if self.arguments is not None:
            self.arguments(p)
        p.set_defaults(func=self.main)
        return p

    def main(self, args: argparse.Namespace) -> int:
        """Run the command on parsed ``args``: load the recipe first where there is one."""
        assert self.run is not None, f"mimkit {self.name} has no run"
        if self.schema is None:
            return self.run(args)
        from mimkit.config import load_config

        cfg = load_config(args.config, args.overrides, schema=load_schema(self.schema))
        if self.dry_run and args.dry_run:
            return _print_dry_run(cfg, self.dry_run)
        return self.run(args, cfg)


def load_schema(path: str) -> type:
    """The config class named ``"module:Class"``."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``-c RECIPE`` and the ``KEY=VALUE`` overrides of a recipe command."""
    p.add_argument("-c", "--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def resume_requested(args: argparse.Namespace, cfg: Any) -> bool:
    """``--resume``, or a worker that torchrun restarted (``--max-restarts``) after a failure and
    whose run already has a complete checkpoint."""
    from mimkit.engine.rundir import restarted_with_checkpoint

    return bool(getattr(args, "resume", False)) or restarted_with_checkpoint(cfg)


def _print_dry_run(cfg: Any, plan: str) -> int:
    """``--dry-run``: the resolved config and :mod:`mimkit.tasks.dryrun`'s plan; nothing runs."""
    import yaml

    from mimkit.config import to_dict
    from mimkit.tasks import dryrun

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(dryrun.format_plan(getattr(dryrun, plan)(cfg)))
    return 0


def print_skipped(run_dir: str | Path) -> None:
    """The closing summary's line on images that could not be decoded (``data.bad_images``)."""
    report = Path(run_dir) / "skipped_images.jsonl"
    if not report.is_file():
        return
    paths = set()
    for line in report.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut by a crash
            paths.add(json.loads(line)["path"])
    if paths:
        print(f"  skipped images: {len(paths)} could not be decoded, each replaced by the next "
              f"(listed in {report})")  # fmt: skip


def print_stopped_early(train: Any, run_dir: Path) -> None:
    """The closing line of a run that ``train.max_steps`` stopped before its schedule ended."""
    if train.stopped_early:
        print(f"  stopped by train.max_steps; continue with --resume (run.dir={run_dir})")
