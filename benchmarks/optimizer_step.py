"""Time one AdamW step over a ViT's parameters: PyTorch's per-tensor loop (its CPU default),
foreach, and fused, interleaved (A B C A B C ...), and print the ratios.

    python benchmarks/optimizer_step.py [-c configs/pretrain/mae_vit_base_in1k.yaml] [--rounds 5]

The parameters are those of the recipe's MAE (encoder + decoder) with random gradients and the
trainer's weight-decay groups; the figures go into ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimkit.bench import load_bench_config
from mimkit.engine.optim import param_groups
from mimkit.models import build_mae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/pretrain/mae_vit_base_in1k.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    cfg = load_bench_config(args.config, ["data.name=synthetic"])
    torch.manual_seed(0)
    model = build_mae(cfg)
    n = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    opts = {
        k: torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, **kw) for k, kw in kinds.items()
    }
    for opt in opts.values():  # warm-up: the state is allocated at the first step
        opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[k].append((time.perf_counter() - t0) / args.steps)
    print(
        f"AdamW step over {n / 1e6:.1f} M parameters ({args.config}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds"
    )
    base = statistics.median(times["loop"])
    print("| implementation | ms per step | speed-up vs loop |")
    print("|---|---|---|")
    for k, t in times.items():
        m = statistics.median(t)
        print(f"| {k} | {m * 1e3:.1f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
