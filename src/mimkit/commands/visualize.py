"""``mimkit visualize``: attention maps and MAE reconstructions as PNG
(:mod:`mimkit.tasks.visualize`)."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command

__all__ = ["COMMANDS"]


def patch_arg(text: str) -> tuple[int, int] | str:
    """``ROW,COL`` on the patch grid, or ``cls``."""
    if text == "cls":
        return "cls"
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROW,COL (e.g. 3,4) or cls") from None
    return row, col


def _image_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("checkpoint")
    q.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    q.add_argument("--fashion-mnist", type=int, nargs="+", default=[], metavar="INDEX",
                   help="Fashion-MNIST test images by index (data from MIMKIT_FMNIST_ROOT or "
                   "/usr/share/datasets/fashion-mnist)")  # fmt: skip


def _attention_args(q: argparse.ArgumentParser) -> None:
    _image_args(q)
    q.add_argument("--patch", type=patch_arg, action="append", metavar="ROW,COL|cls",
                   help="reference patch on the patch grid, repeatable (default: the centre "
                   "and cls)")  # fmt: skip
    q.add_argument("--block", type=int, default=-1, help="block index (default -1, the last)")
    q.add_argument("--out", default="attention.png", help="PNG path (one per image: _0, _1 ...)")


def _reconstruction_args(q: argparse.ArgumentParser) -> None:
    _image_args(q)
    q.add_argument("--mask-ratio", type=float, default=None, help="default: the pretraining's")
    q.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    q.add_argument("--out", default="reconstruction.png", help="PNG path")


def _predictions_args(q: argparse.ArgumentParser) -> None:
    _image_args(q)
    q.add_argument("--tokenizer", help="the tokenizer .safetensors (default: the run's own)")
    decoder = ("with the DALL-E tokenizer: its decoder, converted with `mimkit convert dalle "
               "--trust-pickle decoder.pkl decoder.safetensors`")  # fmt: skip
    q.add_argument("--decoder", help=decoder)
    q.add_argument("--seed", type=int, default=0, help="seed of the blockwise masks")
    q.add_argument("--out", default="predictions.png", help="PNG path")


def run_predictions(args: argparse.Namespace) -> int:
    """Draw image | mask | true tokens decoded | predicted tokens decoded."""
    from mimkit.tasks.visualize import visualize_predictions

    path = visualize_predictions(
        args.checkpoint,
        paths=args.images,
        fashion_mnist=args.fashion_mnist,
        tokenizer=args.tokenizer,
        decoder=args.decoder,
        seed=args.seed,
        out=args.out,
    )
    print(f"wrote {path}")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    """Draw the attention of the reference patches, one PNG per image."""
    from mimkit.tasks.visualize import visualize_attention

    paths = visualize_attention(
        args.checkpoint,
        paths=args.images,
        fashion_mnist=args.fashion_mnist,
        patches=args.patch,
        block=args.block,
        out=args.out,
    )
    for p in paths:
        print(f"wrote {p}")
    return 0


def run_reconstruction(args: argparse.Namespace) -> int:
    """Draw original | masked | reconstruction | reconstruction + visible."""
    from mimkit.tasks.visualize import visualize_reconstruction

    path = visualize_reconstruction(
        args.checkpoint,
        paths=args.images,
        fashion_mnist=args.fashion_mnist,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        out=args.out,
    )
    print(f"wrote {path}")
    return 0


COMMANDS = (
    Command(
        "visualize",
        help="attention maps, MAE reconstructions and BEiT predictions as PNG",
        description="Figures from checkpoints.",
        metavar="FIGURE",
        actions=(
            Command(
                "attention",
                help="self-attention of reference patches (BEiT Figure 3)",
                description="For chosen reference patches, the self-attention of a block "
                "(default: the last) over the image, for each head and their mean. CHECKPOINT: "
                "any mimkit encoder, pretraining or fine-tuning checkpoint or run directory.",
                arguments=_attention_args,
                run=run_attention,
            ),
            Command(
                "reconstruction",
                help="MAE reconstructions of images",
                description="Original | masked | reconstruction | reconstruction + visible for "
                "an MAE checkpoint with its decoder (a pretraining run directory or "
                "checkpoints/ckpt-*).",
                arguments=_reconstruction_args,
                run=run_reconstruction,
            ),
            Command(
                "predictions",
                help="BEiT's visual-token predictions, decoded",
                description="Image | blockwise mask | the tokenizer's tokens decoded | the "
                "tokens a BEiT checkpoint predicts at the masked positions, decoded (visible "
                "positions keep their true tokens), with the run's own tokenizer or --tokenizer; "
                "a DALL-E tokenizer needs its converted decoder (--decoder). CHECKPOINT: a BEiT "
                "pretraining run directory or its checkpoints/ckpt-*.",
                arguments=_predictions_args,
                run=run_predictions,
            ),
        ),
    ),
)
