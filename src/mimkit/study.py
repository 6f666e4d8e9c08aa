"""``mimkit study``: a grid of pretraining variants × seeds × protocols, resumable, one table.

A study file (:class:`~mimkit.config.study.StudyConfig`) expands into *cells*: the tokenizer
(BEiT, once), one pretraining per (variant, seed), and for every pretrained encoder its
fine-tuning at each label fraction, linear probe and k-NN; the from-scratch baseline adds its
learning-rate search (first seed, on the validation split) and its own cells. Every cell is an
ordinary ``mimkit`` run directory under ``out/``; its result, metrics only, is a small JSON file
under ``results/cells/``. A cell whose JSON exists is read back, never recomputed, so a killed
study continues where it stopped and a study can be finished on several machines by committing
``results/``. Cells run as local processes (``jobs`` at a time, ``threads`` each) or as SLURM jobs
through submitit; a cell starts when the cells it needs have finished.

After the cells, :func:`write_report` writes ``table.md`` / ``table.json`` (mean ± std and n over
seeds for every row and protocol, and the pretrained − scratch differences paired by seed) and
the plots: the metrics against the variants' ``x`` (or bars), and the fine-tuning validation
curves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimkit.config import ConfigError, load_config
from mimkit.config.study import StudyConfig

__all__ = ["Cell", "StudyResult", "load_study", "plan", "run_study", "write_report"]

_ARCH = ("method", "arch", "img_size", "patch_size", "in_chans", "embed_dim", "depth",
         "num_heads", "mlp_ratio")  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One run of the study. ``row``: the variant (or scratch) it belongs to."""

    id: str  # e.g. "finetune/blockwise_f0.1_s0": the run directory under out/, the result name
    kind: str  # tokenizer | pretrain | finetune | lr_search | linprobe | knn
    row: str
    seed: int
    fraction: float | None = None
    lr: float | None = None  # lr_search: the learning rate tried
    deps: tuple[str, ...] = ()

    @property
    def result_name(self) -> str:
        return self.id.replace("/", "__") + ".json"


@dataclass
class StudyResult:
    cfg: StudyConfig
    cells: list[Cell]
    results: dict[str, dict]  # cell id -> its result JSON
    failed: dict[str, str]  # cell id -> why
    table_md: Path | None = None
    table_json: Path | None = None
    plots: list[Path] = field(default_factory=list)


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read and validate a study file (one-line :class:`ConfigError` naming the key)."""
    cfg = load_config(path, list(overrides), schema=StudyConfig)
    cfg._source = str(path)  # not a field: the report names the file
    return cfg


def _pretrain_seed(cfg: StudyConfig, seed: int) -> int:
    return cfg.seeds[0] if cfg.shared_pretraining else seed


def _frac(f: float) -> str:
    return f"{f:g}"


def plan(cfg: StudyConfig) -> list[Cell]:
    """Every cell of the study, in an order that respects dependencies."""
    cells: list[Cell] = []
    seeds = list(cfg.seeds)
    tok = ()
    if cfg.tokenizer.config:
        cells.append(Cell("tokenizer/tokenizer", "tokenizer", "tokenizer", seeds[0]))
        tok = ("tokenizer/tokenizer",)
    ft = cfg.finetune
    for v in cfg.variants:
        for s in seeds:
            pre = f"pretrain/{v.name}_s{_pretrain_seed(cfg, s)}"
            if not cfg.shared_pretraining or s == seeds[0]:
                cells.append(Cell(pre, "pretrain", v.name, s, deps=tok))
            if ft.enabled:
                for f in ft.label_fractions:
                    cells.append(Cell(f"finetune/{v.name}_f{_frac(f)}_s{s}", "finetune", v.name,
                                      s, fraction=f, deps=(pre,)))  # fmt: skip
            for kind in ("linprobe", "knn"):
                if getattr(cfg, kind).enabled:
                    cells.append(Cell(f"{kind}/{v.name}_s{s}", kind, v.name, s, deps=(pre,)))
    sc = cfg.scratch
    if sc.enabled:
        name = sc.name
        if ft.enabled:
            for f in ft.label_fractions:
                search = tuple(
                    f"lr_search/{name}_lr{lr:g}_f{_frac(f)}_s{seeds[0]}" for lr in sc.lr_grid
                )
                for cid, lr in zip(search, sc.lr_grid, strict=True):
                    cells.append(Cell(cid, "lr_search", name, seeds[0], fraction=f, lr=lr))
                for s in seeds:
                    cells.append(Cell(f"finetune/{name}_f{_frac(f)}_s{s}", "finetune", name, s,
                                      fraction=f, deps=search))  # fmt: skip
        for kind in ("linprobe", "knn"):
            if getattr(cfg, kind).enabled:
                for s in seeds:
                    cells.append(Cell(f"{kind}/{name}_s{s}", kind, name, s))
    return cells


# ---- the command of a cell ----


def _variant(cfg: StudyConfig, name: str):
    return next(v for v in cfg.variants if v.name == name)


def _per_fraction(cfg: StudyConfig, fraction: float) -> list[str]:
    for key, items in cfg.finetune.per_fraction.items():
        if float(key) == fraction:
            return list(items)
    return []


def _check_common(cfg: StudyConfig) -> None:
    commands = ("pretrain", "tokenizer", "finetune", "linprobe", "knn")
    for item in cfg.common:
        key = item.split("=", 1)[0]
        if not any(_has_key(c, key) for c in commands):
            raise ConfigError(f"common: {key!r} is a key of no command (pretrain, tokenizer "
                              "train, finetune, linprobe, knn)")  # fmt: skip


def _common(cfg: StudyConfig, command: str) -> list[str]:
    """The study's ``common`` overrides whose key the command's schema has (``common`` serves
    every command: a key one of them lacks is left out of that one)."""
    return [i for i in cfg.common if _has_key(command, i.split("=", 1)[0])]


def _schema(command: str) -> type:
    from mimkit.config import PretrainConfig, TokenizerConfig
    from mimkit.config.downstream import FinetuneConfig, KnnCommandConfig, LinprobeConfig

    return {"pretrain": PretrainConfig, "tokenizer": TokenizerConfig,
            "tokenizer train": TokenizerConfig, "finetune": FinetuneConfig,
            "linprobe": LinprobeConfig, "knn": KnnCommandConfig}[command]  # fmt: skip


def _has_key(command: str, dotted: str) -> bool:
    node: Any = _schema(command)()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def _command(cfg: StudyConfig, cell: Cell, results: dict[str, dict]) -> tuple[str, str, list[str]]:
    """(mimkit subcommand, recipe, overrides) of ``cell``; ``results``: the finished cells."""
    out = Path(cfg.out)
    run = [f"run.dir={out / cell.id}", f"run.seed={cell.seed}"]
    sc = cfg.scratch
    if cell.kind == "tokenizer":
        r = cfg.tokenizer.config
        return "tokenizer train", r, [*_common(cfg, "tokenizer"), *cfg.tokenizer.overrides, *run]
    if cell.kind == "pretrain":
        v = _variant(cfg, cell.row)
        r = v.config or cfg.pretrain.config
        extra = []
        if cfg.tokenizer.config:
            extra.append(
                f"tokenizer.checkpoint={out / 'tokenizer/tokenizer/tokenizer.safetensors'}"
            )
        return "pretrain", r, [*_common(cfg, "pretrain"), *cfg.pretrain.overrides, *extra,
                               *v.overrides, *run]  # fmt: skip
    kind = "finetune" if cell.kind in ("finetune", "lr_search") else cell.kind
    proto = getattr(cfg, kind)
    r = proto.config
    args = _common(cfg, kind)
    if kind in ("linprobe", "knn"):
        # raw pixels, the protocols' baseline, once: in the scratch row (else the first row)
        first = sc.name if sc.enabled else cfg.variants[0].name
        pixels = cell.row == first and cell.seed == cfg.seeds[0]
        args.append(f"{'probe' if kind == 'linprobe' else 'knn'}.raw_pixels={str(pixels).lower()}")
    args += proto.overrides
    if kind == "finetune":
        args += [*_per_fraction(cfg, cell.fraction), f"data.label_fraction={cell.fraction}"]
    if cell.row == sc.name and sc.enabled:
        args += ["model.init=null", *sc.overrides]
        if kind == "finetune":
            args += sc.finetune_overrides
            lr = cell.lr if cell.kind == "lr_search" else _chosen_lr(cfg, cell, results)
            if lr is not None:
                args.append(f"optim.lr={lr}")
    else:
        pre = f"pretrain/{cell.row}_s{_pretrain_seed(cfg, cell.seed)}"
        args.append(f"model.init={out / pre}")
    return kind, r, [*args, *run]


def _chosen_lr(cfg: StudyConfig, cell: Cell, results: dict[str, dict]) -> float | None:
    """The scratch lr with the best validation top-1 on the first seed at this fraction."""
    if not cfg.scratch.lr_grid:
        return None
    tried = [(results[d]["metrics"]["val_top1"], results[d]["lr"]) for d in cell.deps]
    best = max(v for v, _ in tried)
    return next(lr for v, lr in tried if v == best)  # a tie: the first of the grid


# ---- running a cell ----


def _read_metrics(kind: str, run: Path) -> dict[str, Any]:
    if kind == "tokenizer":
        ev = json.loads((run / "eval.json").read_text())
        return {k: ev[k] for k in ("psnr", "perplexity", "recon_mse") if k in ev}
    if kind == "pretrain":
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("kind") == "train"]
        m: dict[str, Any] = {"loss": train[-1]["loss"], "steps": train[-1]["step"]} if train else {}
        for r in rows:
            if r.get("kind") == "eval" and "knn" in r:
                m["knn_top1"] = r["knn"].get("top1", r["knn"])
        return m
    if kind in ("finetune", "lr_search"):
        ev = json.loads((run / "eval.json").read_text())
        test = json.loads((run / "test.json").read_text())
        hist = ev.get("history", [])
        return {
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "val_top1": (ev.get("best") or {}).get("top1"),
            "selected_on": test.get("selected_on"),
            "selected_step": test.get("selected", {}).get("step"),
            "last_val_top1": hist[-1]["top1"] if hist else None,
            "steps": hist[-1]["step"] if hist else None,
            "curve": [[h["step"], h["top1"]] for h in hist],
        }
    if kind == "linprobe":
        lp = json.loads((run / "eval.json").read_text())["linprobe"]
        m = {"top1": lp["top1"], "top5": lp.get("top5"), "block": lp["layer"] + 1,
             "per_block": lp.get("per_layer_top1")}  # fmt: skip
        if lp.get("raw_pixels"):
            m["raw_pixels_top1"] = lp["raw_pixels"]["top1"]
        return m
    if kind == "knn":
        kn = json.loads((run / "eval.json").read_text())["knn"]
        m = {"top1": kn["encoder"]["top1"]}
        if "raw_pixels" in kn:
            m["raw_pixels_top1"] = kn["raw_pixels"]["top1"]
        return m
    raise AssertionError(kind)


def _resumable(run: Path) -> bool:
    ckpts = run / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith("ckpt-") for p in ckpts.iterdir())


def execute_cell(command: str, recipe: str, overrides: list[str], run_dir: str, log: str,
                 threads: int | None) -> float:  # fmt: skip
    """Run one ``mimkit`` command in a process of its own (the body of a local or SLURM job);
    continue the run with ``--resume`` when it left a checkpoint. Returns the wall time (s)."""
    run = Path(run_dir)
    args = [sys.executable, "-m", "mimkit.cli", *command.split(), "-c", recipe, *overrides]
    if command in ("pretrain", "finetune", "tokenizer train") and _resumable(run):
        args.append("--resume")
    elif run.exists():
        shutil.rmtree(run)  # an interrupted run without a checkpoint starts again
    env = dict(os.environ)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(args[1:])}\n")
        f.flush()
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = Path(log).read_text().strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"exit status {proc.returncode}: {tail[0]} (log: {log})")
    return time.perf_counter() - t0


def _machine() -> str:
    import torch

    from mimkit.engine.perf import device_name

    return f"{device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs"


def _run_cell(cfg: StudyConfig, cell: Cell, results: dict[str, dict], *, threads: int | None,
              submit) -> dict:  # fmt: skip
    res_dir = Path(cfg.results) / "cells"
    out = Path(cfg.out)
    run = out / cell.id
    if cell.kind == "finetune" and cell.row == cfg.scratch.name and cfg.scratch.lr_grid \
            and cell.seed == cfg.seeds[0]:  # fmt: skip
        # the search already ran this seed with the chosen lr: its result is this cell's
        lr = _chosen_lr(cfg, cell, results)
        src = next(results[d] for d in cell.deps if results[d]["lr"] == lr)
        rec = {**src, "cell": cell.id, "kind": "finetune", "from_search": src["cell"],
               "seconds": 0.0}  # fmt: skip  # its compute is counted once, in the search cell
    else:
        command, recipe, overrides = _command(cfg, cell, results)
        log = str(out / "logs" / (cell.id.replace("/", "__") + ".log"))
        seconds = submit(command, recipe, overrides, str(run), log, threads)
        rec = {
            "cell": cell.id,
            "kind": cell.kind,
            "row": cell.row,
            "seed": cell.seed,
            "fraction": cell.fraction,
            "lr": cell.lr if cell.kind == "lr_search" else _lr_of(run),
            "metrics": _read_metrics(cell.kind, run),
            "command": " ".join(["mimkit", command, "-c", recipe, *overrides]),
            "seconds": round(seconds, 1),
            "threads": threads,
            "machine": _machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    rec |= {"row": cell.row, "seed": cell.seed, "fraction": cell.fraction}
    res_dir.mkdir(parents=True, exist_ok=True)
    tmp = res_dir / (cell.result_name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(res_dir / cell.result_name)  # atomic: a result is whole or absent
    return rec


def _lr_of(run: Path) -> float | None:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    saved = yaml.safe_load(path.read_text())
    return (saved.get("optim") or {}).get("lr")


def read_results(cfg: StudyConfig, cells: list[Cell]) -> dict[str, dict]:
    """The finished cells' results (their JSON files)."""
    res_dir = Path(cfg.results) / "cells"
    done = {}
    for cell in cells:
        path = res_dir / cell.result_name
        if path.is_file():
            done[cell.id] = json.loads(path.read_text())
    return done


def _validate_cells(cfg: StudyConfig, cells: list[Cell]) -> None:
    """Load every distinct recipe + overrides before any work starts: a bad override stops the
    study with the cell named. Paths that earlier cells will write are stood in for."""
    seen: dict[tuple, str] = {}  # a command checked already -> the row it was checked for
    arch: dict[str, list[str]] = {}
    fake = {c.deps[0]: 0.1 for c in cells if c.deps}  # the lr search's result is not known
    results = {d: {"metrics": {"val_top1": 0.0}, "lr": lr} for d, lr in fake.items()}
    results |= {c.id: {"metrics": {"val_top1": 0.0}, "lr": c.lr} for c in cells if c.lr}
    for cell in cells:
        if cell.kind == "finetune" and cell.row == cfg.scratch.name and cfg.scratch.lr_grid:
            continue  # the search cells have the same command but for the lr
        command, recipe, overrides = _command(cfg, cell, results)
        schema = _schema(command)
        if cell.kind == "pretrain":
            overrides = [o for o in overrides if not o.startswith("tokenizer.checkpoint=")]
        elif command in ("finetune", "linprobe", "knn") and cell.row != cfg.scratch.name:
            # model.init does not exist yet: the architecture of the variant's pretraining
            overrides = [o for o in overrides if not o.startswith("model.init=")]
            overrides = ["model.init=null", *arch[cell.row], *overrides]
        key = (command, recipe, tuple(o for o in overrides if not o.startswith("run.")))
        if key in seen:
            if cell.kind == "pretrain":
                arch[cell.row] = arch[seen[key]]
            continue
        seen[key] = cell.row
        try:
            loaded = load_config(recipe, overrides, schema=schema)
        except ConfigError as err:
            msg = str(err)
            if not (cell.kind == "pretrain" and msg.startswith("tokenizer.checkpoint=")):
                raise ConfigError(f"study cell {cell.id}: {msg}") from None
            # the study's tokenizer cell writes it: the rest checked with pixel targets
            loaded = load_config(recipe, [*overrides, "target.kind=pixels"], schema=schema)
        if cell.kind == "pretrain":
            m = loaded.model
            arch[cell.row] = [f"model.{k}={getattr(m, k)}" for k in _ARCH]
        if cell.kind == "lr_search" and loaded.val_fraction <= 0:
            raise ConfigError(
                f"study cell {cell.id}: scratch.lr_grid needs a validation split to choose on "
                "(the fine-tuning recipe has val_fraction=0): the lr would be chosen on the test "
                "split"
            )


def run_study(
    cfg: StudyConfig,
    *,
    jobs: int = 1,
    threads: int | None = None,
    dry_run: bool = False,
    executor: str = "local",
    slurm: dict[str, Any] | None = None,
    only: list[str] | None = None,
) -> StudyResult:
    """Run the cells not yet finished (``jobs`` at a time), then write the report.

    ``executor``: ``local`` (processes here) or ``slurm`` (one SLURM job per cell through
    submitit; ``slurm``: its parameters, e.g. ``{"slurm_partition": "gpu", "timeout_min": 600,
    "gpus_per_node": 1}``). ``only``: run just the cells whose id starts with one of these.
    ``dry_run``: print the cells, which are done, and the command of each; run nothing.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs={jobs} is not allowed: must be >= 1")
    cells = plan(cfg)
    _check_common(cfg)
    _validate_cells(cfg, cells)
    results = read_results(cfg, cells)
    _warn_changed(cfg, cells, results)
    failed: dict[str, str] = {}
    if dry_run:
        _print_plan(cfg, cells, results)
        return StudyResult(cfg, cells, results, failed)
    submit = _submitter(executor, cfg, slurm or {})
    todo = [c for c in cells if c.id not in results]
    if only:
        wanted = {c.id for c in todo if c.id.startswith(tuple(only))}
        todo = [c for c in todo if c.id in wanted]
    for c in _rebuild(cfg, cells, todo, results):
        print(f"  {c.id}: its result is kept, but its weights are gone from {cfg.out} and a cell "
              "to run needs them: it runs again", flush=True)  # fmt: skip
        results.pop(c.id)
        todo.insert(0, c)
    todo.sort(key=cells.index)
    left = len(cells) - len(results) - len(todo)
    print(f"study {cfg.name}: {len(cells)} cells, {len(results)} done, {len(todo)} to run"
          + (f", {left} left out by --only" if left else "")
          + f" ({jobs} at a time, executor {executor})", flush=True)  # fmt: skip
    lock = threading.Lock()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future, Cell] = {}
        pending = list(todo)
        while pending or running:
            while blocked := [c for c in pending if any(d in failed for d in c.deps)]:
                for c in blocked:  # and, on the next pass, the cells that need those
                    failed[c.id] = "skipped: a cell it needs failed"
                    pending.remove(c)
            ready = [c for c in pending if all(d in results for d in c.deps)]
            # what others wait on first, then the cheap cells (small label fractions): complete
            # columns of the table arrive early in a study that takes days
            ready.sort(key=lambda c: (c.kind not in ("tokenizer", "pretrain", "lr_search"),
                                      c.fraction or 0.0, cells.index(c)))  # fmt: skip
            for c in ready[: jobs - len(running)]:
                pending.remove(c)
                print(f"  start  {c.id}", flush=True)
                with lock:
                    snapshot = dict(results)
                running[pool.submit(_run_cell, cfg, c, snapshot, threads=threads,
                                    submit=submit)] = c  # fmt: skip
            if not running:
                print(f"  {len(pending)} cells wait on cells left out by --only: "
                      + ", ".join(c.id for c in pending[:6])
                      + (" ..." if len(pending) > 6 else ""), flush=True)  # fmt: skip
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                c = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception as err:  # a failed cell: said, its dependents skipped
                    failed[c.id] = str(err)
                    print(f"  FAILED {c.id}: {err}", flush=True)
                    continue
                with lock:
                    results[c.id] = rec
                print(f"  done   {c.id} ({rec.get('seconds', 0):.0f} s){_brief(rec)}", flush=True)
    wall = time.perf_counter() - t0
    res = StudyResult(cfg, cells, results, failed)
    write_report(res, wall_seconds=wall)
    return res


def _warn_changed(cfg: StudyConfig, cells: list[Cell], results: dict[str, dict]) -> None:
    """A finished cell whose command the study file would now write differently is still read
    back (results are never recomputed): say so, so that an edited study is not mistaken."""
    changed = []
    for c in cells:
        rec = results.get(c.id)
        if not rec or "command" not in rec or not all(d in results for d in c.deps):
            continue
        command, recipe, overrides = _command(cfg, c, results)
        if rec["command"] != " ".join(["mimkit", command, "-c", recipe, *overrides]):
            changed.append(c.id)
    if changed:
        print(f"study {cfg.name}: warning: {len(changed)} finished cells were run with a command "
              f"the study file no longer gives (e.g. {changed[0]}); their results are kept: "
              "delete their JSON under results/cells/ to run them again", flush=True)  # fmt: skip


_ARTIFACT = {"pretrain": "encoder.safetensors", "tokenizer": "tokenizer.safetensors"}


def _rebuild(cfg: StudyConfig, cells: list[Cell], todo: list[Cell], results: dict) -> list[Cell]:
    """Finished cells whose weights a cell to run needs but which are gone (run directories are
    not committed: a study finished on another machine, or a cleaned ``out/``)."""
    by_id = {c.id: c for c in cells}
    again: list[Cell] = []
    stack = list(todo)
    while stack:
        for d in stack.pop().deps:
            dep = by_id[d]
            art = _ARTIFACT.get(dep.kind)
            if (
                d in results
                and art
                and not (Path(cfg.out) / d / art).is_file()
                and dep not in again
            ):
                again.append(dep)
                stack.append(dep)
    return again


def _brief(rec: dict) -> str:
    m = rec.get("metrics", {})
    for key in ("test_top1", "top1", "val_top1", "loss", "psnr"):
        if m.get(key) is not None:
            return f": {key} {m[key]:.2f}"
    return ""


def _submitter(executor: str, cfg: StudyConfig, slurm: dict[str, Any]):
    if executor == "local":
        return execute_cell
    if executor not in ("slurm", "debug"):
        raise ConfigError(f"--executor={executor!r} is not allowed: local, slurm or debug")
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "--executor=slurm needs submitit: pip install 'mimkit[cluster]'"
        ) from None
    folder = Path(cfg.out) / "submitit"
    ex = submitit.AutoExecutor(folder=folder, cluster=None if executor == "slurm" else "debug")
    params = {"timeout_min": 24 * 60, "name": f"mimkit-{cfg.name}", **slurm}
    try:
        ex.update_parameters(**params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--slurm: {err}") from None

    def submit(*args):
        job = ex.submit(execute_cell, *args)
        return job.result()  # this thread waits; the scheduler keeps ``jobs`` jobs in flight

    return submit


def _print_plan(cfg: StudyConfig, cells: list[Cell], results: dict[str, dict]) -> None:
    print(f"study {cfg.name}: {len(cells)} cells, {len(results)} done "
          f"(results: {cfg.results}, runs: {cfg.out})")  # fmt: skip
    for c in cells:
        if c.id in results:
            state = f"done{_brief(results[c.id])}"
        elif _resumable(Path(cfg.out) / c.id):
            state = "partial (resumes from its checkpoint)"
        else:
            state = "to run"
        print(f"  {c.id:48s} {state}")
        if c.id not in results and all(d in results for d in c.deps):
            command, recipe, overrides = _command(cfg, c, results)
            print(f"      mimkit {command} -c {recipe} {' '.join(overrides)}")


# ---- the report: table and plots ----


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,  # n = 1: no spread known
        "n": len(values),
        "values": values,
    }


def _pm(s: dict) -> str:
    return "" if s["std"] is None else f" ± {s['std']:.2f}"


def _fmt(s: dict | None) -> str:
    if not s:
        return "–"
    return f"{s['mean']:.2f}{_pm(s)} ({s['n']})"


def _columns(cfg: StudyConfig) -> list[tuple[str, str, float | None]]:
    """(column key, header, fraction) in table order."""
    cols = []
    if cfg.finetune.enabled:
        for f in cfg.finetune.label_fractions:
            cols.append((f"finetune_f{_frac(f)}", f"fine-tune {f:.0%} labels", f))
    if cfg.linprobe.enabled:
        cols.append(("linprobe", "linear probe", None))
    if cfg.knn.enabled:
        cols.append(("knn", "k-NN", None))
    return cols


def _values(results: dict[str, dict], row: str, col: str) -> dict[int, float]:
    """seed -> the cell's headline metric."""
    out = {}
    for rec in results.values():
        if rec.get("row") != row:
            continue
        kind, frac = rec["kind"], rec.get("fraction")
        m = rec["metrics"]
        if (
            col.startswith("finetune_f")
            and kind == "finetune"
            and f"finetune_f{_frac(frac)}" == col
        ):
            out[rec["seed"]] = m["test_top1"]
        elif col in ("linprobe", "knn") and kind == col:
            out[rec["seed"]] = m["top1"]
    return out


def write_report(res: StudyResult, *, wall_seconds: float | None = None) -> StudyResult:
    """``table.md``, ``table.json`` and the plots from the finished cells' results."""
    cfg, results = res.cfg, res.results
    out = Path(cfg.results)
    out.mkdir(parents=True, exist_ok=True)
    cols = _columns(cfg)
    rows = [(v.name, v.label or v.name, v.x) for v in cfg.variants]
    if cfg.scratch.enabled:
        rows.append((cfg.scratch.name, f"{cfg.scratch.name} (random init)", None))
    table: dict[str, Any] = {"study": cfg.name, "rows": {}, "columns": [c[0] for c in cols]}
    for name, label, x in rows:
        table["rows"][name] = {"label": label, "x": x}
        for key, _, _ in cols:
            vals = _values(results, name, key)
            if vals:
                table["rows"][name][key] = _stats([vals[s] for s in sorted(vals)]) | {
                    "seeds": sorted(vals)
                }
    pixels = {}
    for kind in ("linprobe", "knn"):
        vals = [r["metrics"]["raw_pixels_top1"] for r in results.values()
                if r["kind"] == kind and "raw_pixels_top1" in r["metrics"]]  # fmt: skip
        if vals:
            pixels[kind] = _stats(vals)
    table["raw_pixels"] = pixels
    # pretrained − scratch, paired by seed
    diffs: dict[str, dict] = {}
    if cfg.scratch.enabled:
        for name, _, _ in rows[:-1]:
            for key, _, _ in cols:
                a, b = _values(results, name, key), _values(results, cfg.scratch.name, key)
                seeds = sorted(set(a) & set(b))
                if seeds:
                    d = [a[s] - b[s] for s in seeds]
                    diffs.setdefault(name, {})[key] = _stats(d) | {
                        "wins": sum(x > 0 for x in d),
                        "seeds": seeds,
                    }
    table["minus_scratch"] = diffs
    lr_search: dict[str, dict] = {}
    for c in res.cells:
        if c.kind == "lr_search" and c.id in results:
            tried = lr_search.setdefault(_frac(c.fraction), {"tried": {}, "chosen": None})
            tried["tried"][f"{c.lr:g}"] = results[c.id]["metrics"]["val_top1"]
    for c in res.cells:
        if c.kind == "finetune" and c.row == cfg.scratch.name and c.deps and c.fraction \
                is not None and all(d in results for d in c.deps):  # fmt: skip
            lr_search[_frac(c.fraction)]["chosen"] = _chosen_lr(cfg, c, results)
    table["scratch_lr_search"] = lr_search
    seconds = [r.get("seconds", 0) or 0 for r in results.values()]
    table["cells"] = {"total": len(res.cells), "done": len(results), "failed": res.failed}
    table["cell_seconds"] = round(sum(seconds), 1)
    if wall_seconds is not None:
        table["last_invocation_wall_seconds"] = round(wall_seconds, 1)
    machines = sorted({r["machine"] for r in results.values() if r.get("machine")})
    table["machines"] = machines
    res.table_json = out / "table.json"
    res.table_json.write_text(json.dumps(table, indent=1) + "\n")
    res.table_md = out / "table.md"
    res.table_md.write_text(_markdown(cfg, table, cols, rows))
    res.plots = _plots(cfg, table, cols, rows, results, out)
    return res


def _markdown(cfg, table, cols, rows) -> str:
    lines = [f"# Study `{cfg.name}`", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    src = getattr(cfg, "_source", None)
    lines += [
        "Test top-1 (%), mean ± std (n seeds). Fine-tuning: the weights chosen on a validation "
        "split held out of the training labels, scored once on the test split. "
        + (
            "One pretraining per variant (seed "
            f"{cfg.seeds[0]}), shared by every seed's protocols: the spread covers the downstream "
            "runs only. "
            if cfg.shared_pretraining
            else "Every seed pretrains its own encoder. "
        )
        + f"Cells finished: {table['cells']['done']}/{table['cells']['total']}; "
        f"compute {table['cell_seconds'] / 3600:.2f} h summed over cells"
        + (f" on {'; '.join(table['machines'])}" if table["machines"] else "")
        + (f". Made by `mimkit study -c {src}`." if src else "."),
        "",
        "| row | " + " | ".join(h for _, h, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, label, _ in rows:
        r = table["rows"][name]
        lines.append(f"| {label} | " + " | ".join(_fmt(r.get(k)) for k, _, _ in cols) + " |")
    px = table["raw_pixels"]
    if px:
        cells = [_fmt(px.get(k)) if k in px else "–" for k, _, _ in cols]
        lines.append("| raw pixels | " + " | ".join(cells) + " |")
    if table["minus_scratch"]:
        lines += ["", f"Pretrained − {cfg.scratch.name}, paired by seed (mean ± std, wins/n):", "",
                  "| row | " + " | ".join(h for _, h, _ in cols) + " |",
                  "|---|" + "---|" * len(cols)]  # fmt: skip
        for name, label, _ in rows[:-1]:
            d = table["minus_scratch"].get(name, {})
            vals = [f"{d[k]['mean']:+.2f}{_pm(d[k])} ({d[k]['wins']}/{d[k]['n']})"
                    if k in d else "–" for k, _, _ in cols]  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if table["scratch_lr_search"]:
        head = f"{cfg.scratch.name}: fine-tuning lr chosen on validation top-1 (first seed):"
        lines += ["", head, ""]
        for frac, search in table["scratch_lr_search"].items():
            shown = ", ".join(f"{lr}: {v:.2f}" for lr, v in search["tried"].items())
            chosen = "" if search["chosen"] is None else f" → **{search['chosen']:g}**"
            lines.append(f"- {float(frac):.0%} labels, validation top-1 by lr: {shown}{chosen}")
    if table["cells"]["failed"]:
        lines += ["", "Failed or skipped cells:", ""]
        lines += [f"- `{c}`: {why}" for c, why in table["cells"]["failed"].items()]
    return "\n".join(lines) + "\n"


def _plots(cfg, table, cols, rows, results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    present = [(k, h) for k, h, _ in cols if any(k in table["rows"][n] for n, _, _ in rows)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
        numeric = [r for r in rows if r[2] is not None]
        for ax, (key, header) in zip(axes[0], present, strict=True):
            if numeric:
                pts = [(x, table["rows"][n][key]) for n, _, x in numeric if key in table["rows"][n]]
                pts.sort(key=lambda p: p[0])
                if pts:
                    err = [p[1]["std"] or 0 for p in pts]
                    ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=err,
                                marker="o", capsize=3)  # fmt: skip
                ax.set_xlabel(cfg.x_label or "x")
                for n, label, x in rows:
                    s = table["rows"][n].get(key)
                    if x is None and s:
                        ax.axhline(s["mean"], ls="--", color="gray", lw=1)
                        ax.annotate(label, (ax.get_xlim()[0], s["mean"]), fontsize=7,
                                    va="bottom", color="gray")  # fmt: skip
            else:
                names = [(label, table["rows"][n].get(key)) for n, label, _ in rows]
                names = [(lab, s) for lab, s in names if s]
                err = [s["std"] or 0 for _, s in names]
                ax.bar(range(len(names)), [s["mean"] for _, s in names], yerr=err, capsize=3,
                       color="#4a6fa5")  # fmt: skip
                ax.set_xticks(range(len(names)), [lab for lab, _ in names], rotation=30,
                              ha="right", fontsize=8)  # fmt: skip
                lo = min((s["mean"] - (s["std"] or 0) for _, s in names), default=0)
                ax.set_ylim(max(0, lo - 5), None)
            ax.set_title(header, fontsize=9)
            ax.set_ylabel("test top-1 (%)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"study {cfg.name}", fontsize=10)
        fig.tight_layout()
        paths.append(out / "accuracy.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    curves = [r for r in results.values() if r["kind"] == "finetune" and r["metrics"].get("curve")]
    if curves:
        fracs = sorted({r["fraction"] for r in curves})
        fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 3.4), squeeze=False)
        for ax, f in zip(axes[0], fracs, strict=True):
            for n, label, _ in rows:
                mine = [r["metrics"]["curve"] for r in curves
                        if r["row"] == n and r["fraction"] == f]  # fmt: skip
                if not mine:
                    continue
                steps = [p[0] for p in mine[0]]
                mean = [statistics.fmean(c[i][1] for c in mine if i < len(c))
                        for i in range(len(steps))]  # fmt: skip
                ax.plot(steps, mean, label=f"{label} (n={len(mine)})", lw=1.2)
            ax.set_title(f"fine-tuning, {f:.0%} labels", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("validation top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "curves.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
