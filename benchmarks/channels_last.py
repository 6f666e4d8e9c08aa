"""Time mimkit's convolutional pieces in NCHW and in channels-last, interleaved, and print ratios.

    python benchmarks/channels_last.py [--rounds 5] [--steps 3]

Channels-last (NHWC) lets oneDNN and cuDNN pick their fastest convolution kernels. Its effect
depends on the layer and the device, so each candidate is measured before anything adopts it:

- ``patch embed``: a ViT-B/16 patch embedding (16x16 conv, stride 16), forward + backward, batch 8
  at 224 px: the only convolution in the ViT itself;
- ``dVAE encode``: mimkit's own tokenizer (``DiscreteVAE``: hidden 64, vocabulary 8192, 8x down)
  encoding a batch of 8 images at 112 px without gradients, as in every BEiT step;
- ``DALL-E encode``: the DALL-E encoder layout BEiT uses (n_hid 256, 2 blocks per group,
  vocabulary 8192), random weights, batch 4 at 112 px, no gradients;
- ``UperNet head``: BEiT's segmentation head over four ViT-B maps of a 256 px image (16x16
  tokens), forward + backward, batch 2.

The two layouts of one case alternate (A B A B ...) so the machine's drift affects both alike;
the ratio is the median over rounds of NCHW time / channels-last time (above 1: channels-last
is faster). The figures go into ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mimkit.models.dalle import DalleEncoder
from mimkit.models.segmentation import UperNetHead
from mimkit.models.tokenizer import DiscreteVAE

CL = torch.channels_last


def _case_patch_embed(cl: bool) -> Callable[[], None]:
    conv = nn.Conv2d(3, 768, 16, stride=16)
    x = torch.randn(8, 3, 224, 224)
    if cl:  # the input only, as the encoder does (the weight stays NCHW in checkpoints)
        x = x.contiguous(memory_format=CL)

    def run() -> None:
        conv.zero_grad(set_to_none=True)
        conv(x).flatten(2).sum().backward()

    return run


def _case_encode(model: nn.Module, x: torch.Tensor, cl: bool) -> Callable[[], None]:
    model = model.eval()
    if cl:
        model, x = model.to(memory_format=CL), x.contiguous(memory_format=CL)

    def run() -> None:
        with torch.no_grad():
            model(x).argmax(1)

    return run


def _case_upernet(cl: bool) -> Callable[[], None]:
    head = UperNetHead(768, 150, channels=512).train()
    maps = [torch.randn(2, 768, 16, 16) for _ in range(4)]
    if cl:
        head = head.to(memory_format=CL)
        maps = [m.contiguous(memory_format=CL) for m in maps]

    def run() -> None:
        head.zero_grad(set_to_none=True)
        head(maps).float().mean().backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    dvae = DiscreteVAE(in_chans=3, vocab_size=8192, hidden_dim=64, codebook_dim=64, downsample=8)
    dalle = DalleEncoder(n_hid=256, n_blk_per_group=2, vocab_size=8192)
    cases: dict[str, Callable[[bool], Callable[[], None]]] = {
        "patch embed (ViT-B/16, fwd+bwd, batch 8, 224 px)": _case_patch_embed,
        "dVAE encode (mimkit tokenizer, batch 8, 112 px)": lambda cl: _case_encode(
            dvae.encoder, torch.rand(8, 3, 112, 112), cl
        ),
        "DALL-E encode (BEiT's tokenizer layout, batch 4, 112 px)": lambda cl: _case_encode(
            dalle, torch.rand(4, 3, 112, 112), cl
        ),
        "UperNet head (ViT-B maps, fwd+bwd, batch 2, 256 px)": _case_upernet,
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} "
        f"interleaved rounds of {args.steps} steps"
    )
    print("| case | NCHW ms | channels-last ms | NCHW / channels-last |")
    print("|---|---|---|---|")
    for name, make in cases.items():
        runs = {"nchw": make(False), "cl": make(True)}
        for run in runs.values():
            run()  # warm-up: oneDNN picks and caches its kernels
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    run()
                times[k].append((time.perf_counter() - t0) / args.steps)
        ratio = statistics.median(a / b for a, b in zip(times["nchw"], times["cl"], strict=True))
        a, b = statistics.median(times["nchw"]), statistics.median(times["cl"])
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
