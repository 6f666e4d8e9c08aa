"""``mimkit convert`` and ``mimkit inspect``: checkpoints in and out of mimkit's format."""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

from mimkit.commands.base import Command
from mimkit.config import ConfigError

__all__ = ["COMMANDS"]


def run_convert(args: argparse.Namespace) -> int:
    """Convert IN to OUT between the formats and print what was done."""
    from mimkit.interop.convert import convert
    from mimkit.interop.dalle import UnsafePickleError
    from mimkit.interop.official import UnsafeCheckpointError

    paths, src_format = list(args.paths), args.src_format
    if len(paths) == 3 and paths[0] == "dalle":  # the older spelling: convert dalle SRC DST
        if src_format not in ("auto", "dalle"):
            raise ConfigError(
                f"`convert dalle SRC DST` reads DALL-E pickles, not --from {src_format}"
            )
        paths, src_format = paths[1:], "dalle"
    if len(paths) != 2:
        raise ConfigError(f"convert takes IN and OUT, got {len(paths)} path(s): {paths}")
    src, dst = (Path(x) for x in paths)
    opts = {
        "strict": not args.no_strict,
        "num_heads": args.num_heads,
        "decoder_num_heads": args.decoder_num_heads,
        "img_size": args.img_size,
        "rel_pos_bias": args.rel_pos_bias,
        "probe": args.probe,
        "architecture": args.architecture,
        "kind": args.kind,
        "include_args": args.include_args,
        "trust_pickle": args.trust_pickle,
    }
    try:
        report = convert(src, dst, src_format=src_format, dst_format=args.dst_format, **opts)
    except (UnsafeCheckpointError, UnsafePickleError) as err:
        raise ConfigError(f"{src}: refused: {err}") from None
    except PermissionError as err:
        raise ConfigError(str(err)) from None
    except (ValueError, KeyError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        msg = re.sub(r"\bpass (\w+)=", lambda m: f"pass --{m[1].replace('_', '-')}", msg)
        raise ConfigError(msg if str(src) in msg else f"{src}: {msg}") from None
    print(f"wrote {report.dst} ({report.src_format} -> {report.dst_format})")
    for note in report.notes:
        print(f"  note: {note}")
    if "create_model" in report.details:
        print(f"  load it with: import timm; timm.create_model('local-dir:{report.dst}', "
              "pretrained=True)")  # fmt: skip
        print(f"  or: {report.details['create_model']}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print what a checkpoint is (or all of it as JSON)."""
    from mimkit.interop.convert import describe
    from mimkit.interop.official import UnsafeCheckpointError

    try:
        info = describe(args.checkpoint, fmt=args.format)
    except UnsafeCheckpointError as err:
        raise ConfigError(f"{args.checkpoint}: refused: {err}") from None
    except (ValueError, KeyError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{args.checkpoint}: {msg}") from None
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for k, v in info.items():
        if k in ("metadata", "args"):
            continue
        if isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        print(f"{k + ':':<18} {v}")
    if "metadata" in info or "args" in info:
        print("(--json prints everything, the whole provenance metadata included)")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    from mimkit.interop.convert import FORMATS

    p.add_argument("paths", nargs="+", metavar="IN OUT", help="input and output paths")
    p.add_argument(
        "--from",
        dest="src_format",
        default="auto",
        choices=["auto", *FORMATS],
        help="input format (default: detected from the path)",
    )
    p.add_argument(
        "--to",
        dest="dst_format",
        default="mimkit",
        choices=["mimkit", "official", "hf", "timm"],
        help="output format (default mimkit: a .safetensors)",
    )
    p.add_argument(
        "--no-strict",
        action="store_true",
        help="official/timm in: drop unexpected keys and report them",
    )
    p.add_argument("--num-heads", type=int, help="a plain ViT's heads (no shape holds them)")
    p.add_argument("--decoder-num-heads", type=int, help="the MAE decoder's heads")
    p.add_argument("--img-size", type=int, help="image size when the weights cannot tell")
    p.add_argument(
        "--rel-pos-bias",
        default="keep",
        choices=["keep", "per_layer"],
        help="BEiT: copy a shared relative position table into every block",
    )
    p.add_argument(
        "--probe",
        default="keep",
        choices=["keep", "fold"],
        help="MAE linear probe: keep it, or fold its BatchNorm into the linear head",
    )
    p.add_argument(
        "--architecture",
        help="Hugging Face class to write (or read), e.g. ViTMAEForPreTraining, BeitModel",
    )
    p.add_argument("--kind", help="official layout to write, e.g. mae-encoder, beit-pretrain")
    p.add_argument(
        "--include-args",
        action="store_true",
        help="official out: add the argparse.Namespace of the recorded args",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="DALL-E in: I trust this pickle's source; unpickle it (allow-listed)",
    )


def _inspect_args(p: argparse.ArgumentParser) -> None:
    from mimkit.interop.convert import FORMATS

    p.add_argument("checkpoint", help="a file, a run or checkpoint directory, or a model folder")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="the checkpoint's format (default: detected)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON, all metadata included")


COMMANDS = (
    Command(
        "convert",
        help="convert checkpoints between mimkit, official MAE/BEiT, timm and Hugging Face",
        description="Convert a checkpoint: official MAE / BEiT .pth, timm folders or "
        ".safetensors, Hugging Face folders and OpenAI's DALL-E dVAE pickles in; official "
        ".pth, timm folders (timm.create_model('local-dir:OUT', pretrained=True)) and Hugging "
        "Face folders (from_pretrained) out; everything through mimkit's .safetensors with "
        "provenance. Official files are read weights-only with an allow-list; key mismatches "
        "are one error listing them all (--no-strict drops and reports them).",
        arguments=_convert_args,
        run=run_convert,
    ),
    Command(
        "inspect",
        help="describe a checkpoint",
        description="Say what a checkpoint is: format (mimkit, official, timm, hf, dalle), "
        "method, kind, target, whether it has a decoder / MIM head or a classifier head, "
        "sizes and provenance. Nothing is unpickled beyond the official allow-list.",
        arguments=_inspect_args,
        run=run_inspect,
    ),
)
