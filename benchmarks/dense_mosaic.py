"""Dense tasks on the Fashion-MNIST mosaic: does MAE / BEiT pretraining pay for segmentation and
detection?

For each seed (default 0, 1, 2) it trains the segmentation recipe
(``configs/segment/fmnist_mosaic_vit_tiny.yaml``, SETR-PUP) and the detection recipe
(``configs/detect/fmnist_mosaic_vit_tiny.yaml``, ViTDet pyramid + Mask R-CNN) on three backbones
with the same budget in optimizer steps: the ViT from scratch, MAE-pretrained and BEiT-pretrained.
The metric is the last evaluation's (the whole mosaic test set of ``data.eval_size`` canvases):
mIoU and pixel accuracy, box and mask mAP. Writes ``results.json``, ``table.md`` and
``curves.png`` (the metric against the step, mean over seeds, with ``--eval-every``) to ``--out``.
Finished runs are not repeated, so an interrupted benchmark continues where it stopped::

    python benchmarks/dense_mosaic.py --mae runs/mae_vit_tiny_fmnist_long \\
        --beit runs/beit_vit_tiny_fmnist_long --jobs 2 --threads 1 --out runs/dense_mosaic

The defaults are the README's budget: 350 optimizer steps per segmentation run (batch 16) and
1,000 per detection run (batch 8; the recipe's two epochs of 4,000 canvases), one evaluation at
the end on 300 test canvases. In bf16 on one core of a 2-core CPU with ``avx512_bf16`` (a second
run on the other) a segmentation run takes about 2.5 minutes and a detection run about 8. Fewer
detection steps starve the detector's heads, which start from scratch: at 350 steps the RoI head
classifies truth boxes worse than a linear probe on the frozen pretrained encoder, and pretraining
shows no gain (``benchmarks/detect_diagnose.py`` takes a run's mAP apart).
"""

from __future__ import annotations

import argparse
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
RECIPES = {
    "segment": ROOT / "configs" / "segment" / "fmnist_mosaic_vit_tiny.yaml",
    "detect": ROOT / "configs" / "detect" / "fmnist_mosaic_vit_tiny.yaml",
}
METHODS = ("scratch", "scratch_beit", "mae", "beit", "mae_mosaic")
METRICS = {"segment": ("mIoU", "pixel_acc"), "detect": ("box_map", "mask_map", "box_map_50")}
# the encoder of the Fashion-MNIST pretraining recipes, for the from-scratch baseline
SCRATCH = [
    "model.init=null",
    "model.method=mae",
    "model.arch=vit_tiny",
    "model.patch_size=4",
    "model.in_chans=1",
    "model.depth=6",
    "optim.layer_decay=1.0",
]
# the BEiT architecture from scratch (relative position bias per block, layer scale 0.1, no
# absolute positions): BEiT-pretrained's own baseline, separating architecture from pretraining
SCRATCH_BEIT = [*SCRATCH[:1], "model.method=beit", *SCRATCH[2:]]
SCRATCH_ARGS = {"scratch": SCRATCH, "scratch_beit": SCRATCH_BEIT}


def _run(task: str, method: str, init: str | None, seed: int, out: Path, args) -> dict:
    run = out / task / f"{method}_s{seed}"
    done = run / "eval.json"
    if done.is_file() and (run / "figures" / f"{task}_curves.png").is_file():
        return _record(task, method, seed, run)
    if run.exists():
        import shutil

        shutil.rmtree(run)  # an interrupted run starts again
    cmd = [
        sys.executable,
        "-m",
        "mimkit.cli",
        task,
        "-c",
        str(RECIPES[task]),
        f"run.dir={run}",
        f"run.seed={seed}",
        "data.num_workers=0",
        f"train.steps={args.steps[task]}",
        f"eval.every_steps={args.eval_every or args.steps[task]}",
        "eval.every_epochs=1000",
        *(SCRATCH_ARGS[method] if init is None else [f"model.init={init}"]),
        *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    run.parent.mkdir(parents=True, exist_ok=True)
    with (run.parent / f"{run.name}.log").open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{task} {method} seed {seed} failed: see {run.parent / run.name}.log")
    rec = _record(task, method, seed, run)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    (run / "benchmark.json").write_text(json.dumps(rec) + "\n")
    shown = ", ".join(f"{k} {rec[k]:.2f}" for k in METRICS[task] if rec.get(k) is not None)
    print(f"  {task:7s} {method:10s} seed {seed}: {shown} ({rec['seconds']:.0f} s)", flush=True)
    return rec


def _record(task: str, method: str, seed: int, run: Path) -> dict:
    saved = json.loads((run / "eval.json").read_text())
    last = saved["history"][-1]
    rec = {"task": task, "method": method, "seed": seed, "step": last["step"]}
    rec |= {k: last.get(k) for k in METRICS[task]}
    rec["curve"] = [(h["step"], h.get(METRICS[task][0])) for h in saved["history"]]
    extra = run / "benchmark.json"
    if extra.is_file():
        rec["seconds"] = json.loads(extra.read_text()).get("seconds")
    return rec


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})"


def _table(results: list[dict], args) -> str:
    names = {
        "scratch": "from scratch",
        "scratch_beit": "from scratch, BEiT architecture",
        "mae": "MAE-pretrained",
        "beit": "BEiT-pretrained",
        "mae_mosaic": "MAE-pretrained on mosaic canvases",
    }
    lines = [
        "Fashion-MNIST mosaic (56×56 canvases, 1–3 items; "
        f"{args.eval_size} test canvases), mean ± std over seeds; the last evaluation of runs of "
        f"{args.steps['segment']} (segmentation, batch 16) and {args.steps['detect']} (detection,"
        " batch 8) optimizer steps.",
        "",
        "| backbone | seg. mIoU (%) | seg. pixel acc. (%) | box mAP (%) | mask mAP (%) |"
        " box AP50 (%) | minutes per run (seg. / det.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        seg = [r for r in results if r["method"] == m and r["task"] == "segment"]
        det = [r for r in results if r["method"] == m and r["task"] == "detect"]
        if not seg and not det:
            continue

        def minutes(rs):
            secs = [r["seconds"] for r in rs if r.get("seconds")]
            return f"{statistics.mean(secs) / 60:.1f}" if secs else "—"

        lines.append(
            f"| {names[m]} | {_cell([r['mIoU'] for r in seg])} | "
            f"{_cell([r['pixel_acc'] for r in seg])} | {_cell([r['box_map'] for r in det])} | "
            f"{_cell([r.get('mask_map') for r in det])} | "
            f"{_cell([r['box_map_50'] for r in det])} | {minutes(seg)} / {minutes(det)} |"
        )
    head = "Pretrained − baseline (difference of the means; the spreads are over seeds):"
    lines += ["", head, ""]
    pairs = [(m, "scratch") for m in ("mae", "beit", "mae_mosaic")] + [("beit", "scratch_beit")]
    for m, ref in pairs:
        for task, key, label in (("segment", "mIoU", "mIoU"), ("detect", "box_map", "box mAP")):
            ours = [r[key] for r in results if r["method"] == m and r["task"] == task]
            base = [r[key] for r in results if r["method"] == ref and r["task"] == task]
            ours, base = [v for v in ours if v is not None], [v for v in base if v is not None]
            if not ours or not base:
                continue
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (ours, base)]
            diff = statistics.mean(ours) - statistics.mean(base)
            lines.append(
                f"- {names[m]} − {names[ref]}, {label}: {diff:+.2f} points "
                f"(± {sd[0]:.2f} vs ± {sd[1]:.2f}; n = {len(ours)} and {len(base)})"
            )
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], path: Path) -> None:
    """Each task's primary metric against the optimizer step, mean over seeds, one line per
    backbone (the points are the runs' evaluations: ``--eval-every``); tasks evaluated once per
    run are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in RECIPES if any(r["task"] == t and len(r["curve"]) > 1 for r in results)]
    if not tasks:  # evaluated once per run: nothing to draw
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m in METHODS:
            curves = [dict(r["curve"]) for r in results if r["task"] == task and r["method"] == m]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            means = [statistics.mean(c[s] for c in curves) for s in steps]
            ax.plot(steps, means, marker="o", label=f"{m} (n={len(curves)})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{METRICS[task][0]} (%), mean over seeds")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mae", help="an MAE pretraining run (1 channel, 4 px patches)")
    ap.add_argument("--beit", help="a BEiT pretraining run")
    ap.add_argument(
        "--mae-mosaic",
        help="an MAE pretraining run on unlabeled mosaic canvases "
        "(configs/pretrain/mae_vit_tiny_mosaic.yaml); adds the method mae_mosaic",
    )
    ap.add_argument("--tasks", nargs="+", default=["segment", "detect"])
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="default: scratch, mae, beit, and mae_mosaic when --mae-mosaic is given "
        "(scratch_beit, the BEiT architecture from scratch, only when named)",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seg-steps", type=int, default=350)
    ap.add_argument("--det-steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=0, help="steps (0: once, at the end)")
    ap.add_argument("--eval-size", type=int, default=300, help="mosaic test canvases")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    ap.add_argument("--out", type=Path, default=Path("runs/dense_mosaic"))
    ap.add_argument(
        "--report-only", action="store_true", help="table.md from the finished runs in --out"
    )
    args = ap.parse_args()
    args.steps = {"segment": args.seg_steps, "detect": args.det_steps}
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    args.extra = [f"data.eval_size={args.eval_size}", *args.extra]
    inits = {"scratch": None, "scratch_beit": None, "mae": args.mae, "beit": args.beit}
    inits["mae_mosaic"] = args.mae_mosaic
    if args.methods is None:
        args.methods = [m for m in METHODS if m != "mae_mosaic" or args.mae_mosaic]
    for m in args.methods:
        if not m.startswith("scratch") and not inits[m] and not args.report_only:
            ap.error(f"--{m.replace('_', '-')} is needed for method {m}")
    jobs = [(t, m, s) for s in args.seeds for t in args.tasks for m in args.methods]
    if args.report_only:
        done = [j for j in jobs if (args.out / j[0] / f"{j[1]}_s{j[2]}" / "eval.json").is_file()]
        results = [_record(t, m, s, args.out / t / f"{m}_s{s}") for t, m, s in done]
        table = _table(results, args)
        (args.out / "table.md").write_text(table)
        _plot(results, args.out / "curves.png")
        print(table)
        return 0
    print(f"{len(jobs)} runs, {args.jobs} at once x {args.threads} threads", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(_run, t, m, inits[m], s, args.out, args) for t, m, s in jobs]
        results = [f.result() for f in futs]
    args.out.mkdir(parents=True, exist_ok=True)
    table = _table(results, args)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.jobs} runs at once"
    meta = {"machine": machine, "minutes": round((time.perf_counter() - t0) / 60, 1)}
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "args": sys.argv[1:], "runs": results}, indent=1) + "\n"
    )
    (args.out / "table.md").write_text(table)
    _plot(results, args.out / "curves.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
