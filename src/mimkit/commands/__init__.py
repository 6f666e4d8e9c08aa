"""Argument parsers of the ``mimkit`` subcommands that live beside their own code; light to
import (no PyTorch), so that ``--help`` and config errors answer at once."""
