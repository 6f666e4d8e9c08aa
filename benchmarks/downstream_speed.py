"""Downstream paths against a bare timm loop of the same model, side by side in one run.

Fine-tuning: ``mimkit finetune`` (the real command: its data path, trainer, logging) against a
plain loop a user would write with timm and torchvision (RandomResizedCrop + flip + normalize in
a DataLoader with the same workers, timm's ViT, AdamW, bf16 autocast, cross-entropy), both from
scratch on Fashion-MNIST at the recipe's batch. The bare loop runs twice: with timm's fused
attention (as it ships) and with its explicit attention (what ``train.attention=auto`` picks in
bf16 on CPU). Each side runs in a process of its own, in interleaved rounds; the figure is the
median images/s over rounds of the steady-state steps.

Frozen features (linear probe, k-NN): mimkit's ``extract_features`` against a bare
``forward_features`` loop under ``inference_mode`` over the same 10,000 test images, fp32.

    python benchmarks/downstream_speed.py --rounds 3 --steps 60 \
        --out benchmarks/results/downstream_speed
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FT = ROOT / "configs" / "finetune" / "fmnist_vit_tiny.yaml"
FMNIST = os.environ.get("MIMKIT_FMNIST_ROOT", "/usr/share/datasets/fashion-mnist")
SCRATCH = ["model.init=null", "model.method=mae", "model.arch=vit_tiny", "model.img_size=28",
           "model.patch_size=4", "model.in_chans=1", "model.depth=6"]  # fmt: skip

BARE = r"""
import sys, time, json, torch, timm
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from mimkit.data import FashionMNIST
steps, batch, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
fused = sys.argv[4] == "1"
torch.manual_seed(0)
base = FashionMNIST(sys.argv[5], "train")
tf = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                 v2.RandomResizedCrop(28, scale=(0.8, 1.0), antialias=True),
                 v2.RandomHorizontalFlip(), v2.Normalize([0.286], [0.353])])
class View(Dataset):
    def __len__(self): return len(base)
    def __getitem__(self, i):
        img, y = base[i]
        return tf(img), y
loader = DataLoader(View(), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                    persistent_workers=workers > 0)
m = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, depth=6,
                      num_classes=10, global_pool="avg", drop_path_rate=0.1)
if not fused:
    for blk in m.blocks: blk.attn.fused_attn = False
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
times, it, t = [], iter(loader), time.perf_counter()
for step in range(steps):
    x, y = next(it)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(m(x).float(), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    now = time.perf_counter(); times.append(now - t); t = now
warm = times[steps // 4:]
print(json.dumps({"img_per_s": batch * len(warm) / sum(warm)}))
"""


def _mimkit_finetune(steps: int, batch: int, workers: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "mimkit.cli", "finetune", "-c", str(FT), f"run.dir={tmp}/r",
                *SCRATCH, f"data.root={FMNIST}", f"train.steps={steps}",
                f"train.batch_size={batch}", f"data.num_workers={workers}",
                "train.precision=bf16", "train.log_every_steps=1", "eval.every_epochs=1000",
                "val_fraction=0", "data.eval_max_samples=256"]  # fmt: skip
        subprocess.run(args, check=True, capture_output=True, env=_env(threads))
        rows = [json.loads(x) for x in Path(f"{tmp}/r/metrics.jsonl").read_text().splitlines()]
        # per-step wall times from the log's timestamps (steady state: the last 3/4)
        t = [r["time"] for r in rows if r.get("kind") == "train"]
        dts = [b - a for a, b in itertools.pairwise(t)][steps // 4 :]
        return batch * len(dts) / sum(dts)


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _bare(steps: int, batch: int, workers: int, threads: int, fused: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", BARE, str(steps), str(batch), str(workers), "1" if fused else "0",
         FMNIST],
        check=True, capture_output=True, text=True, env=_env(threads),
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"]


def _features(rounds: int) -> dict:
    import timm
    import torch

    from mimkit.config import ModelConfig
    from mimkit.data import AugmentedView, EvalTransform, FashionMNIST
    from mimkit.models import build_encoder
    from mimkit.tasks.knn import extract_features

    test = AugmentedView(FashionMNIST(FMNIST, "test"), EvalTransform(28, [0.286], [0.353]))
    cfg = ModelConfig(method="mae", arch="custom", img_size=28, patch_size=4, in_chans=1,
                      embed_dim=192, depth=6, num_heads=3)  # fmt: skip
    ours = build_encoder(cfg, fixed_pos_embed=False, mask_token=False).eval()
    ref = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1,
                            depth=6, num_classes=0).eval()  # fmt: skip
    loader = torch.utils.data.DataLoader(test, batch_size=256)

    def bare() -> None:
        with torch.inference_mode():
            for x, _ in loader:
                ref.forward_features(x).mean(1)

    sides = {"mimkit extract_features": lambda: extract_features(ours, test, batch_size=256),
             "bare timm loop": bare}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[name].append(len(test) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    sides = {
        "mimkit finetune": lambda: _mimkit_finetune(a.steps, a.batch, a.workers, a.threads),
        "bare timm (fused attention)": lambda: _bare(a.steps, a.batch, a.workers, a.threads, True),
        "bare timm (explicit attention)": lambda: _bare(
            a.steps, a.batch, a.workers, a.threads, False
        ),
    }
    runs: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(a.rounds):
        for name, fn in sides.items():
            runs[name].append(fn())
            print(f"round {r}: {name}: {runs[name][-1]:.1f} img/s", flush=True)
    ft = {k: statistics.median(v) for k, v in runs.items()}
    import torch

    torch.set_num_threads(a.threads)
    feats = _features(a.rounds)
    from mimkit.engine.perf import machine_facts

    report = {
        "finetune_img_per_s": ft,
        "finetune_rounds": runs,
        "features_img_per_s": feats,
        "settings": vars(a) | {"out": str(a.out)},
        "machine": machine_facts(torch.device("cpu")),
    }
    best_bare = max(v for k, v in ft.items() if k.startswith("bare"))
    lines = [
        "| path | images/s (median) | mimkit / bare |",
        "|---|---|---|",
        *(f"| fine-tuning: {k} | {v:.1f} | |" for k, v in ft.items()),
        f"| fine-tuning: mimkit vs the faster bare loop | | "
        f"**{ft['mimkit finetune'] / best_bare:.2f}×** |",
        *(f"| frozen features: {k} | {v:.0f} | |" for k, v in feats.items()),
        f"| frozen features: mimkit vs bare | | "
        f"**{feats['mimkit extract_features'] / feats['bare timm loop']:.2f}×** |",
    ]
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (a.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
