"""``mimkit study``: a grid of pretraining variants x seeds x protocols (:mod:`mimkit.study`)."""

from __future__ import annotations

import argparse
import sys

from mimkit.commands.base import Command, add_config_args

__all__ = ["COMMANDS"]


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per cell (OMP_NUM_THREADS; default: torch's)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, which are done and the commands; run nothing")  # fmt: skip
    p.add_argument("--report", action="store_true",
                   help="only write the table and plots from the results there are")  # fmt: skip
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"],
                   help="local processes, or one SLURM job per cell through submitit "
                   "(pip install 'mimkit[cluster]'); debug: submitit in this process")  # fmt: skip
    p.add_argument("--slurm", nargs="*", metavar="KEY=VALUE",
                   help="submitit parameters for --executor slurm, e.g. slurm_partition=gpu "
                   "timeout_min=600 gpus_per_node=1 cpus_per_task=8")  # fmt: skip
    p.add_argument("--only", nargs="*", metavar="PREFIX",
                   help="run only the cells whose id starts with one of these "
                   "(e.g. pretrain/ or finetune/blockwise_)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run (or report, or list) the study and print its table; 1 when cells failed."""
    import yaml

    from mimkit.config import ConfigError
    from mimkit.study import StudyResult, load_study, plan, read_results, run_study, write_report

    cfg = load_study(args.config, args.overrides)
    slurm = {}
    for item in args.slurm or []:
        if "=" not in item:
            raise ConfigError(f"--slurm {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        slurm[key] = yaml.safe_load(value)
    if args.report:
        cells = plan(cfg)
        res = write_report(StudyResult(cfg, cells, read_results(cfg, cells), {}))
    else:
        res = run_study(cfg, jobs=args.jobs, threads=args.threads, dry_run=args.dry_run,
                        executor=args.executor, slurm=slurm, only=args.only)  # fmt: skip
    if args.dry_run:
        return 0
    print(f"\nstudy {cfg.name}: {len(res.results)}/{len(res.cells)} cells done")
    print(f"  table: {res.table_md} ({res.table_json.name})")
    for path in res.plots:
        print(f"  plot:  {path}")
    print()
    print(res.table_md.read_text())
    if res.failed:
        print(f"mimkit: error: {len(res.failed)} cells failed or were skipped:", file=sys.stderr)
        for cid, why in res.failed.items():
            print(f"  {cid}: {why}", file=sys.stderr)
        return 1
    return 0


COMMANDS = (
    Command(
        "study",
        help="run a grid of pretraining variants x seeds x protocols and print its table",
        description="Run a study file (configs/studies/): every pretraining variant and seed, "
        "scored by fine-tuning (label fractions), linear probe and k-NN, with the from-scratch "
        "baseline (its lr chosen on validation). Every cell is an ordinary run directory under "
        "out/ and a small JSON result under results/cells/; finished cells are read back, "
        "never recomputed, so a killed study continues where it stopped. Writes table.md, "
        "table.json, accuracy.png and curves.png to results/.",
        arguments=_arguments,
        run=run,
    ),
)
