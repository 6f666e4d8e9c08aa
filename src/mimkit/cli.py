"""The ``mimkit`` command: the parser from the command table (:mod:`mimkit.commands`), and
the one place user errors become exit statuses.

User errors (bad recipes, overrides, paths) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from mimkit.config import ConfigError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``mimkit`` parser: every subcommand of :data:`mimkit.commands.TABLE`."""
    from mimkit import __version__
    from mimkit.commands import all_commands

    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked image modeling (MAE, BEiT) for Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in all_commands():
        command.register(sub)
    return parser


@contextlib.contextmanager
def _stdout_on_rank0() -> Iterator[None]:
    """Under torchrun, only rank 0 prints its reports (as the official MAE/BEiT code); the
    other ranks' errors and warnings still reach stderr."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's; read before PyTorch is imported
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
        # overrides after a flag (`--resume train.max_steps=500`): argparse closed the
        # positional list at the flag; the order of flags and overrides does not matter
        args.overrides = [*(args.overrides or []), *extra]
    elif extra and args.command == "convert" and not any(x.startswith("-") for x in extra):
        args.paths += extra  # IN/OUT after an option: `convert dalle --trust-pickle IN OUT`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    succeeded = False
    try:
        with _stdout_on_rank0():
            code = args.func(args)
        succeeded = True
        return code
    except ConfigError as err:
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # images that cannot be decoded (strict mode, over the limit)
        from mimkit.data.datasets import BadImageError

        if not isinstance(err, BadImageError):
            raise
        # from a loader worker the message carries the worker's traceback: its last line
        print(f"mimkit: error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a corrupt checkpoint or a non-finite loss: said, not traced
        from mimkit.engine.checkpoint import CorruptCheckpointError
        from mimkit.engine.trainer import NonFiniteLossError

        if not isinstance(err, CorruptCheckpointError | NonFiniteLossError):
            raise
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 3 if isinstance(err, CorruptCheckpointError) else 4
    except KeyboardInterrupt:
        print("mimkit: interrupted", file=sys.stderr)
        return 130
    finally:
        # leave torchrun's process group, if this command joined one: after a success, every
        # rank leaves together (a failed rank is ended by torchrun, which stops the others)
        if "mimkit.engine.distributed" in sys.modules:  # nothing to leave before torch
            from mimkit.engine.distributed import shutdown

            shutdown(wait=succeeded)


if __name__ == "__main__":
    sys.exit(main())
