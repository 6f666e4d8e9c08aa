"""The ``mimkit`` subcommands, one module each, registered from one table (:data:`TABLE`).

Every module exports ``COMMANDS``: the :class:`~mimkit.commands.base.Command` entries it adds
(its parser, its config schema by import path, and its ``run``). The modules are light to import
(no PyTorch), so that ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import importlib

from mimkit.commands.base import Command

__all__ = ["TABLE", "Command", "all_commands"]

# the modules of mimkit.commands, in the order ``mimkit --help`` lists their commands
TABLE = (
    "pretrain", "tokenizer", "finetune", "probes", "dense", "evaluate", "visualize", "study",
    "interop", "recipe", "data", "bench",
)  # fmt: skip


def all_commands() -> list[Command]:
    """Every subcommand, in :data:`TABLE` order."""
    return [
        c for name in TABLE for c in importlib.import_module(f"mimkit.commands.{name}").COMMANDS
    ]
