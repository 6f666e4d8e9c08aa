"""Fused or explicit attention: time both, interleaved (A B A B ...), and print the ratios.

    python benchmarks/attention_paths.py [-c configs/pretrain/mae_vit_base_in1k.yaml] \
        [--precision bf16] [--batch-size 8] [--rounds 5] [--steps 2]

Two parts, both on random inputs:

1. **kernels**: attention alone (forward + backward of ``softmax(q k^T / sqrt(d)) v``) at the
   recipe's shapes (the encoder's sequence, and for MAE the decoder's), through torch's fused
   ``scaled_dot_product_attention`` and through explicit matmuls and a softmax;
2. **training step**: ``mimkit bench``'s step of the recipe's model (forward, loss, backward,
   AdamW) with ``train.attention=fused`` and with ``train.attention=explicit``.

This is the measurement behind ``train.attention=auto`` (explicit in bf16 on CPU); the figures go
into ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mimkit import bench
from mimkit.engine import perf
from mimkit.models import build_beit, build_mae
from mimkit.models.attention import set_attention


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def kernels(shapes: dict[str, tuple[int, ...]], dtype, *, rounds: int, steps: int) -> None:
    print(f"| attention alone, fwd+bwd, {dtype} | fused ms | explicit ms | fused / explicit |")
    print("|---|---|---|---|")
    for label, shape in shapes.items():
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        paths = {"fused": F.scaled_dot_product_attention, "explicit": _explicit}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(rounds + 1):  # round 0 warms up
            for name, fn in paths.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn(q, k, v).sum().backward()
                if r:
                    times[name].append((time.perf_counter() - t0) / steps)
        f, e = (statistics.median(times[n]) for n in ("fused", "explicit"))
        print(f"| {label} {tuple(shape)} | {1e3 * f:.2f} | {1e3 * e:.2f} | {f / e:.2f}x |")


def step(cfg, precision: str, *, batch: int, rounds: int, steps: int) -> None:
    method = cfg.model.method
    vocab = bench.DEFAULT_VOCAB_SIZE if method == "beit" else None
    x = bench._inputs(cfg, batch, vocab, torch.device("cpu"))
    workloads = []
    for mode in ("fused", "explicit"):
        torch.manual_seed(cfg.run.seed)
        model = build_mae(cfg) if method == "mae" else build_beit(cfg, vocab_size=vocab)
        set_attention(model.train(), mode, device_type="cpu", precision=precision)
        opt = bench._optimizer(model, cfg)[0]
        w = perf.Workload(mode, mode, bench._mimkit_loss(cfg, model, x), opt,
                          bf16=precision == "bf16", clip_grad=cfg.optim.clip_grad)  # fmt: skip
        w.warm_up(1)
        workloads.append(w)
    t = perf.time_rounds(workloads, steps=steps, rounds=rounds, device=torch.device("cpu"))
    f, e = (statistics.median(t[n]) for n in ("fused", "explicit"))
    print(f"\n| training step, {method.upper()} {cfg.model.arch}, batch {batch}, {precision} "
          "| fused ms | explicit ms | fused / explicit |")  # fmt: skip
    print("|---|---|---|---|")
    print(f"| {rounds} interleaved rounds of {steps} steps | {1e3 * f:.0f} | {1e3 * e:.0f} "
          f"| {f / e:.2f}x |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/pretrain/mae_vit_base_in1k.yaml")
    ap.add_argument("--precision", choices=bench.PRECISIONS, default="bf16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    cfg = bench.load_bench_config(args.config, ["data.name=synthetic"])
    m, b = cfg.model, args.batch_size
    n = (m.img_size // m.patch_size) ** 2
    shapes = {}
    if m.method == "mae":
        kept = int(n * (1 - cfg.mask.ratio))
        shapes["encoder"] = (b, m.num_heads, 1 + kept, m.embed_dim // m.num_heads)
        d = m.decoder
        shapes["decoder"] = (b, d.num_heads, 1 + n, d.embed_dim // d.num_heads)
    else:
        shapes["encoder"] = (b, m.num_heads, 1 + n, m.embed_dim // m.num_heads)
    print(f"{args.config}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    kernels(shapes, bench.DTYPES[args.precision], rounds=args.rounds, steps=5)
    step(cfg, args.precision, batch=b, rounds=args.rounds, steps=args.steps)


if __name__ == "__main__":
    main()
