"""Masks per second for the blockwise (BEiT Algorithm 1) and random generators, one CPU core.

Run: .venv/bin/python benchmarks/masking_speed.py
A data-loader worker that decodes and augments a 224x224 image spends about 2-5 ms on it, so a
generator far above 1,000 masks/s never bottlenecks loading.
"""

from __future__ import annotations

import random
import time

import torch

from mimkit.masking import MaskSampler, blockwise_mask, random_masking


def rate(fn, n: int = 2000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    sampler = MaskSampler("blockwise", (14, 14), 75, min_block=16)
    cases = {
        "blockwise 14x14, 75 masked (BEiT)": lambda: blockwise_mask(
            (14, 14), 75, min_block=16, rng=rng
        ),
        "blockwise 7x7, 20 masked (demo)": lambda: blockwise_mask((7, 7), 20, min_block=4, rng=rng),
        "MaskSampler blockwise 14x14 (pipeline)": lambda: sampler(g),
        "random_masking, 1 x 196 patches": lambda: random_masking(1, 196, 0.75, generator=g),
    }
    rows = [(name, rate(fn)) for name, fn in cases.items()]
    print("| generator | masks/s (1 thread) |\n|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} |")


if __name__ == "__main__":
    main()
