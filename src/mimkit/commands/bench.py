"""``mimkit bench``: its parser (light); the benchmark itself is :mod:`mimkit.bench`."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command, add_config_args

__all__ = ["COMMANDS", "HF_ATTENTION"]

HF_ATTENTION = ("sdpa", "eager")  # Hugging Face's attn_implementation, sdpa its default


def run(args: argparse.Namespace) -> int:
    """Benchmark the recipe's model and print (and optionally save) the tables."""
    from mimkit.bench import run_command

    return run_command(args)


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    compare = "also Hugging Face transformers (and, for MAE, its full-sequence encoder)"
    p.add_argument("--compare", action="store_true", help=compare)
    precision = "default: the recipe's train.precision"
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], help=precision)
    hf_attention = "with --compare: Hugging Face's attention, sdpa (its default), eager or both"
    p.add_argument("--hf-attention", choices=[*HF_ATTENTION, "both"], default="sdpa",
                   help=hf_attention)  # fmt: skip
    for flag, default, text in (
        ("--steps", 10, "training steps per timed round (default 10)"),
        ("--warmup", 3, "untimed steps before the rounds (default 3)"),
        ("--rounds", 5, "timed rounds (default 5)"),
        ("--batch-size", None, "default: the recipe's train.batch_size"),
        ("--data-batches", 20, "batches of the data-pipeline measurement; 0 skips it"),
        ("--matmul-size", None, "side of the peak's square matmuls (8192 CUDA, 1024 CPU)"),
    ):
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--json", metavar="OUT", help="write every figure and the machine's facts")


COMMANDS = (
    Command(
        "bench",
        help="training-step speed, FLOPs, MFU and memory of a pretraining recipe's model",
        description="Benchmark the model of a pretraining recipe on random inputs: images/s, "
        "step time, peak memory, FLOPs per step and MFU (against a matmul peak measured in the "
        "same run); --compare times Hugging Face's ViTMAE / BEiT of the same size interleaved "
        "with it (and, for MAE, its encoder on the full sequence); the training DataLoader "
        "alone is timed beside it.",
        arguments=_arguments,
        run=run,
    ),
)
