"""``mimkit tokenizer train``: a discrete VAE for BEiT (:mod:`mimkit.tasks.tokenizer`)."""

from __future__ import annotations

import argparse

from mimkit.commands.base import Command, resume_requested

__all__ = ["COMMANDS"]


def run_train(args: argparse.Namespace, cfg) -> int:
    """Train the tokenizer and print its held-out reconstruction and codebook usage."""
    from mimkit.tasks.tokenizer import run_tokenizer

    result = run_tokenizer(cfg, resume=resume_requested(args, cfg))
    run_dir, m = result.run_dir, result.metrics
    print(f"\nrun directory: {run_dir}")
    print(f"  steps {result.train.step}, epochs {result.train.epoch}")
    print(f"  tokenizer:  {result.tokenizer_path}")
    print(f"  figure:     {run_dir / 'figures' / 'tokenizer_reconstruction.png'}")
    print(f"  metrics:    {run_dir / 'metrics.jsonl'}, {run_dir / 'eval.json'}")
    if m:
        print(
            f"  through hard tokens on {m['num_images']} held-out images: PSNR {m['psnr']:.2f} dB "
            f"(constant-image floor {m['psnr_floor']:.2f} dB), MSE {m['recon_mse']:.4f}; "
            f"codebook perplexity {m['perplexity']:.1f}, codes used {100 * m['codes_used']:.1f}% "
            f"of {cfg.tokenizer.vocab_size}"
        )
    return 0


COMMANDS = (
    Command(
        "tokenizer",
        help="visual tokenizers for BEiT",
        description="Train a discrete VAE tokenizer whose token grid matches a ViT patch grid.",
        actions=(
            Command(
                "train",
                help="train a dVAE tokenizer",
                description="Train a discrete VAE (Gumbel-softmax, KL to a uniform prior). "
                "Writes tokenizer.safetensors, metrics.jsonl, "
                "figures/tokenizer_reconstruction.png to run.dir.",
                schema="mimkit.config.tokenizer:TokenizerConfig",
                run=run_train,
                resume=True,
                dry_run="tokenizer_plan",
            ),
        ),
    ),
)
