"""Label efficiency on Fashion-MNIST: does MAE / BEiT pretraining pay when labels are scarce?

For label fractions (default 1%, 10%, 100%; seeded, class-balanced subsets) and seeds (default
0, 1, 2) it fine-tunes three encoders with the same recipe and the same budget in optimizer steps:
a ViT from scratch (DeiT-style: no layer decay), the MAE-pretrained and the BEiT-pretrained ViT.
Each run's last weights are evaluated on the full test split. It also runs the linear probe
(every block, the best chosen on held-out training data) and k-NN of each encoder, and both
probes on raw pixels. Writes ``results.json``, ``table.md`` and two plots to ``--out``:
``accuracy_vs_labels.png`` and ``convergence.png`` (BEiT Figure 2's analogue).

Runs are ``mimkit`` commands in their own run directories; a finished run is not repeated, so an
interrupted benchmark continues where it stopped. Usage::

    python benchmarks/label_efficiency.py --mae runs/mae_vit_tiny_fmnist_long \\
        --beit runs/beit_vit_tiny_fmnist_long --out benchmarks/results/label_efficiency
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FT = ROOT / "configs" / "finetune" / "fmnist_vit_tiny.yaml"
LP = ROOT / "configs" / "linprobe" / "fmnist_vit_tiny.yaml"
KNN = ROOT / "configs" / "knn" / "fmnist_vit_tiny.yaml"
# the encoder of the demo recipes, for the from-scratch baseline
SCRATCH = [
    "model.init=null",
    "model.method=mae",
    "model.arch=vit_tiny",
    "model.img_size=28",
    "model.patch_size=4",
    "model.in_chans=1",
    "model.depth=6",
]
BATCH = 64
# optimizer steps per label fraction (the same for every method)
STEPS = {0.01: 100, 0.1: 150, 1.0: 200}


def _mimkit(args: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "mimkit.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        raise RuntimeError(f"mimkit {' '.join(args[:3])} failed; see {log}")
    return time.perf_counter() - t0


EXTRA: list[str] = []  # --extra overrides, passed to every command (smoke runs)


def _finetune(out: Path, method: str, init: str | None, frac: float, seed: int, threads: int):
    run = out / "finetune" / f"{method}_f{frac:g}_s{seed}"
    done = run / "test.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run.exists():
        import shutil

        shutil.rmtree(run)  # an interrupted run starts again
    steps = STEPS.get(frac, 250)
    labeled = round(60000 * frac)
    spe = max(1, labeled // BATCH)
    args = [
        "finetune",
        "-c",
        str(FT),
        f"run.dir={run}",
        f"run.seed={seed}",
        f"data.label_fraction={frac}",
        "data.eval_max_samples=1000",
        "data.num_workers=0",
        f"train.steps={steps}",
        f"train.batch_size={BATCH}",
        "train.log_every_steps=10",
        f"optim.warmup_epochs={0.1 * steps / spe:.4f}",
        "eval.every_steps=50",
        "eval.every_epochs=100000",
    ]
    args += [*SCRATCH, "optim.layer_decay=1.0"] if init is None else [f"model.init={init}"]
    args += EXTRA
    seconds = _mimkit(args, run.parent / f"{run.name}.log", threads)
    top1, top5 = _full_test(run)
    curve = [(r["step"], r["top1"]) for r in json.loads((run / "eval.json").read_text())["history"]]
    rec = {
        "method": method,
        "fraction": frac,
        "seed": seed,
        "steps": steps,
        "top1": top1,
        "top5": top5,
        "curve": curve,
        "seconds": round(seconds, 1),
    }
    done.write_text(json.dumps(rec) + "\n")
    print(
        f"  {method:8s} {frac:>5g} seed {seed}: test top-1 {top1:.2f}%  ({seconds:.0f} s)",
        flush=True,
    )
    return rec


def _full_test(run: Path) -> tuple[float, float]:
    """Top-1/top-5 of the run's last weights on the whole test split (10,000 images)."""
    import torch
    from torch.utils.data import DataLoader

    from mimkit.config import load_config
    from mimkit.config.downstream import FinetuneConfig
    from mimkit.data import AugmentedView, EvalTransform, FashionMNIST
    from mimkit.engine.checkpoint import read_metadata
    from mimkit.tasks.downstream import evaluate_classifier
    from mimkit.tasks.finetune import build_classifier

    torch.set_num_threads(1)
    last = run / "model_last.safetensors"
    meta = read_metadata(last)
    cfg = load_config(FT, [f"model.init={last}", "model.drop_path=0"], schema=FinetuneConfig)
    model, _, _ = build_classifier(cfg, num_classes=10)
    test = FashionMNIST(cfg.data.root, "test")
    loader = DataLoader(
        AugmentedView(test, EvalTransform(28, meta["mean"], meta["std"])), batch_size=500
    )
    r = evaluate_classifier(model, loader, device=torch.device("cpu"))
    return r["top1"], r["top5"]


def _probes(
    out: Path, method: str, init: str | None, threads: int, read_only: bool = False
) -> dict:
    res = {}
    if read_only and not (out / "linprobe" / method / "eval.json").is_file():
        raise FileNotFoundError(method)
    model = SCRATCH if init is None else [f"model.init={init}"]
    pixels = ["probe.raw_pixels=true"] if method == "scratch" else ["probe.raw_pixels=false"]
    lp = out / "linprobe" / method
    if not (lp / "eval.json").is_file():
        import shutil

        shutil.rmtree(lp, ignore_errors=True)
        _mimkit(
            [
                "linprobe",
                "-c",
                str(LP),
                f"run.dir={lp}",
                "data.num_workers=0",
                *model,
                *pixels,
                *EXTRA,
            ],
            out / "linprobe" / f"{method}.log",
            threads,
        )
    rec = json.loads((lp / "eval.json").read_text())["linprobe"]
    res["linprobe"] = {
        "top1": rec["top1"],
        "block": rec["layer"] + 1,
        "per_block": rec["per_layer_top1"],
    }
    if rec.get("raw_pixels"):
        res["linprobe_pixels"] = rec["raw_pixels"]["top1"]
    # DINO's linear evaluation (ViT-B setting): cls token and average-pooled patch tokens of the
    # last block, concatenated; same probe recipe otherwise
    dino = out / "linprobe_dino" / method
    if not read_only and not (dino / "eval.json").is_file():
        import shutil

        shutil.rmtree(dino, ignore_errors=True)
        _mimkit(
            ["linprobe", "-c", str(LP), f"run.dir={dino}", "data.num_workers=0", *model,
             "probe.raw_pixels=false", "probe.layers=last", "probe.pool=cls_avg", *EXTRA],
            out / "linprobe_dino" / f"{method}.log",
            threads,
        )  # fmt: skip
    if (dino / "eval.json").is_file():
        res["linprobe_dino"] = json.loads((dino / "eval.json").read_text())["linprobe"]["top1"]
    kn = out / "knn" / method
    if read_only and not (kn / "eval.json").is_file():
        return res
    if not (kn / "eval.json").is_file():
        import shutil

        shutil.rmtree(kn, ignore_errors=True)
        raw = f"knn.raw_pixels={'true' if method == 'scratch' else 'false'}"
        _mimkit(
            ["knn", "-c", str(KNN), f"run.dir={kn}", "data.num_workers=0", *model, raw, *EXTRA],
            out / "knn" / f"{method}.log",
            threads,
        )
    rec = json.loads((kn / "eval.json").read_text())["knn"]
    res["knn"] = rec["encoder"]["top1"]
    if "raw_pixels" in rec:
        res["knn_pixels"] = rec["raw_pixels"]["top1"]
    return res


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(out: Path, runs: list[dict], probes: dict[str, dict], args) -> str:
    methods = [
        m for m in ("scratch", "mae", "beit") if m in probes or any(r["method"] == m for r in runs)
    ]
    names = {
        "scratch": "from scratch (DeiT-style)",
        "mae": "MAE-pretrained",
        "beit": "BEiT-pretrained",
    }
    fracs = sorted({r["fraction"] for r in runs})
    head = [
        "encoder",
        *[f"fine-tune, {f:.0%} labels" for f in fracs],
        "linear probe (best block)",
        "linear probe (DINO: cls + avg)",
        "k-NN",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary: dict[str, dict] = {}
    for m in methods:
        cells = [names[m]]
        for f in fracs:
            xs = [r["top1"] for r in runs if r["method"] == m and r["fraction"] == f]
            if not xs:
                cells.append("—")
                continue
            mu, sd = _mean_std(xs)
            summary.setdefault(m, {})[f] = (mu, sd, len(xs))
            cells.append(f"{mu:.2f} ± {sd:.2f} (n={len(xs)})")
        p = probes.get(m, {})
        lp = p.get("linprobe")
        label = "random init" if m == "scratch" else ""
        cells.append(
            f"{lp['top1']:.2f} (block {lp['block']}{', ' + label if label else ''})" if lp else "—"
        )
        dino = p.get("linprobe_dino")
        cells.append(f"{dino:.2f}" if dino is not None else "—")
        cells.append(
            f"{p['knn']:.2f}" + (" (random init)" if m == "scratch" else "") if "knn" in p else "—"
        )
        lines.append("| " + " | ".join(cells) + " |")
    px = probes.get("scratch", {})
    if "linprobe_pixels" in px:
        lines.append(
            "| raw pixels | "
            + " | ".join("" for _ in fracs)
            + f" | {px['linprobe_pixels']:.2f} | | {px.get('knn_pixels', 0):.2f} |"
        )
    margins = []
    for m in ("mae", "beit"):
        for f in fracs:
            if f in summary.get(m, {}) and f in summary.get("scratch", {}):
                (a, sa, _), (b, sb, _) = summary[m][f], summary["scratch"][f]
                margins.append(
                    f"{names[m]} − scratch at {f:.0%} labels: {a - b:+.2f} points "
                    f"(± {sa:.2f} vs ± {sb:.2f} over seeds)"
                )
    seeds = sorted({r["seed"] for r in runs})
    steps = ", ".join(f"{f:.0%}: {STEPS.get(f, 250)}" for f in fracs)
    text = "\n".join(
        [
            "Fashion-MNIST test top-1 (%), mean ± std over the n seeds done of "
            + ", ".join(map(str, seeds))
            + f"; fine-tuning budget in optimizer steps of batch {BATCH} ({steps}); last weights, "
            "whole 10,000-image test split.",
            "",
            *lines,
            "",
            *[f"- {m}" for m in margins],
        ]
    )
    (out / "table.md").write_text(text + "\n")
    _plots(out, runs, summary, fracs, names)
    return text


def _plots(out, runs, summary, fracs, names) -> None:
    from mimkit.viz import save_curves

    panel = "fine-tuning top-1 (%) vs labeled fraction"
    lines = {
        names[m]: [(f * 100, summary[m][f][0]) for f in fracs if f in summary[m]] for m in summary
    }
    errs = {
        panel: {names[m]: [summary[m][f][1] for f in fracs if f in summary[m]] for m in summary}
    }
    save_curves(
        {panel: lines},
        out / "accuracy_vs_labels.png",
        xlabel="% of training labels",
        errors=errs,
        logx=True,
    )
    conv = {}
    for f in fracs:
        lines = {}
        for m in summary:
            curves = [r["curve"] for r in runs if r["method"] == m and r["fraction"] == f]
            steps = sorted({s for c in curves for s, _ in c})
            pts = []
            for s in steps:
                ys = [y for c in curves for x, y in c if x == s]
                pts.append((s, statistics.mean(ys)))
            lines[names[m]] = pts
        conv[f"{f:.0%} labels: top-1 on 1,000 test images"] = lines
    save_curves(
        conv,
        out / "convergence.png",
        xlabel="fine-tuning step",
        title="convergence (mean over seeds)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mae", help="MAE pretraining run (or encoder) on Fashion-MNIST")
    ap.add_argument("--beit", help="BEiT pretraining run (or encoder) on Fashion-MNIST")
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=["scratch", "mae", "beit"],
        help="only these encoders (default: scratch and every one given)",
    )
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: CPU cores / jobs)",
    )
    ap.add_argument("--out", default="benchmarks/results/label_efficiency")
    ap.add_argument("--steps", type=int, default=None, help="one step budget for every fraction")
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every command (e.g. data.max_samples=2000 for a smoke run)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="write the table and plots from the finished runs in --out",
    )
    args = ap.parse_args()
    EXTRA.extend(args.extra)
    if args.report_only:
        out = Path(args.out)
        runs = [json.loads(p.read_text()) for p in sorted(out.glob("finetune/*/test.json"))]
        probes = {}
        for m in ("scratch", "mae", "beit"):
            with contextlib.suppress(FileNotFoundError):
                probes[m] = _probes(out, m, None, 1, read_only=True)
        print(report(out, runs, probes, args))
        return 0
    if args.steps:
        STEPS.update({f: args.steps for f in args.fractions})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    inits = {"scratch": None, "mae": args.mae, "beit": args.beit}
    inits = {m: i for m, i in inits.items() if m == "scratch" or i is not None}
    if args.methods:
        inits = {m: i for m, i in inits.items() if m in args.methods}
    t0 = time.perf_counter()
    print(
        f"label efficiency: {len(args.fractions)} fractions x {len(args.seeds)} seeds x "
        f"{len(inits)} encoders, {args.jobs} at once",
        flush=True,
    )
    jobs = [(m, i, f, s) for f in args.fractions for s in args.seeds for m, i in inits.items()]
    with ThreadPoolExecutor(args.jobs) as pool:
        probe_futs = {m: pool.submit(_probes, out, m, i, threads) for m, i in inits.items()}
        futs = [pool.submit(_finetune, out, m, i, f, s, threads) for m, i, f, s in jobs]
        runs = [f.result() for f in futs]
        probes = {m: f.result() for m, f in probe_futs.items()}
    (out / "results.json").write_text(
        json.dumps(
            {
                "runs": runs,
                "probes": probes,
                "mae": args.mae,
                "beit": args.beit,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                f"{args.jobs} jobs x {threads} torch threads",
                "wall_seconds": round(time.perf_counter() - t0, 1),
            },
            indent=1,
        )
        + "\n"
    )
    print(report(out, runs, probes, args))
    print(
        f"\nwall time {time.perf_counter() - t0:.0f} s; {out / 'table.md'}, "
        f"{out / 'accuracy_vs_labels.png'}, {out / 'convergence.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
