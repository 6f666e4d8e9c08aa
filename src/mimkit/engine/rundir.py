"""Starting a run in its directory: refuse to overwrite, check a resume, seed, save the config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from mimkit.config import ConfigError, resolve_precision, save_config, to_dict
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.distributed import barrier, init_distributed, is_main, rank, world_size

__all__ = ["RESUMABLE_CHANGES", "prepare_run", "restarted_with_checkpoint"]

# keys that may differ when a run is resumed (how long to go on, what to evaluate after,
# and whether the model is compiled: the same maths and weights; a global batch given instead of
# the accumulation it resolves to: optim.accum_steps and optim.lr are still compared)
RESUMABLE_CHANGES = ("train.max_steps", "eval.", "train.compile", "train.global_batch_size")
# keys added after runs were saved whose *behaviour* before they existed differs from their
# default now: a saved config without the key resumes with this value, not the default
LEGACY_VALUES = {"val_fraction": 0.0}  # fine-tuning chose model_best on the evaluation split
# keys whose null means "resolved when the run starts" (the data set's or the pretraining's
# normalization): config.yaml records the value used, and a resume with null still matches it
RESOLVED_AT_START = ("data.mean", "data.std")


def restarted_with_checkpoint(cfg: Any) -> bool:
    """Whether torchrun restarted this worker (``TORCHELASTIC_RESTART_COUNT`` > 0, after a failed
    rank with ``--max-restarts``) and ``run.dir`` holds a complete checkpoint to continue from."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) <= 0:
        return False
    return ckpt.latest_checkpoint(Path(cfg.run.dir) / "checkpoints") is not None


def prepare_run(
    cfg: Any, *, resume: bool, single_process: str | None = None, ddp_only: str | None = None
) -> tuple[Path, torch.device]:
    """Validate the run directory for a fresh run or a resume, seed, and write ``config.yaml``.

    Under torchrun, joins the process group first; rank 0 writes, the others wait for it.
    ``single_process`` (a command's name) refuses torchrun; ``ddp_only`` refuses
    ``train.parallel=fsdp`` under it.

    A fresh run refuses a ``run.dir`` that already holds checkpoints; a resume needs a complete
    checkpoint and the saved config, except :data:`RESUMABLE_CHANGES`. Returns (run dir, device).
    """
    if single_process and world_size() > 1:
        raise ConfigError(
            f"{single_process} runs in one process (it reads a frozen encoder's features; "
            "the training commands are the data-parallel ones): start it without torchrun"
        )
    if ddp_only and world_size() > 1 and cfg.train.parallel == "fsdp":
        raise ConfigError(
            f"train.parallel=fsdp: {ddp_only} is data-parallel with DDP under torchrun "
            "(train.parallel=ddp); FSDP is for pretraining"
        )
    resolve_precision(cfg)  # a config built in Python, not loaded: train.precision=auto here
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    if resume:
        if ckpt.latest_checkpoint(ckpt_root) is None:
            raise ConfigError(f"--resume: no complete checkpoint in {ckpt_root}")
        _keep_saved_precision(cfg, run_dir)
        _check_resume_config(cfg, run_dir)
    elif ckpt_root.exists() and any(not p.name.startswith(".") for p in ckpt_root.iterdir()):
        raise ConfigError(
            f"run.dir={str(run_dir)!r} already holds checkpoints: pass --resume to continue that "
            "run, or choose another run.dir"
        )
    device = init_distributed(cfg.run.device)  # joins torchrun's process group, if any
    if cfg.run.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls (else torch raises at the
        # first one on CUDA); read when cuBLAS starts, so set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # one stream per rank (masks, dropout); DDP broadcasts rank 0's initial weights
    torch.manual_seed(cfg.run.seed + rank())
    if is_main():
        (run_dir / "figures").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if hasattr(cfg, "train"):
            why = getattr(cfg.train, "_precision_why", "train.precision")
            print(f"mimkit: precision {cfg.train.precision} ({why})", flush=True)
    barrier()
    return run_dir, device


def record_resolved(run_dir: Path, values: dict[str, Any]) -> None:
    """Write into ``config.yaml`` the values of keys resolved after it was saved (dotted keys,
    e.g. the data set's own ``data.mean``), so that it is the config the run really used."""
    path = Path(run_dir) / "config.yaml"
    if not is_main() or not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    for dotted, value in values.items():
        node = saved
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = [float(v) for v in value] if isinstance(value, list | tuple) else value
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(saved, sort_keys=False))
    os.replace(tmp, path)


def _keep_saved_precision(cfg: Any, run_dir: Path) -> None:
    """A resumed run keeps the precision it was saved with when ``train.precision=auto`` chose
    another here (a run from before ``auto``, or a job requeued on other hardware)."""
    train = getattr(cfg, "train", None)
    saved_path = run_dir / "config.yaml"
    if train is None or not hasattr(train, "_precision_why") or not saved_path.is_file():
        return
    saved = (yaml.safe_load(saved_path.read_text()).get("train") or {}).get("precision")
    if saved and saved != train.precision:
        train._precision_why = f"auto would pick {train.precision}; the resumed run's own"
        train.precision = saved


def _check_resume_config(cfg: Any, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved, now = _flatten(yaml.safe_load(saved_path.read_text())), _flatten(to_dict(cfg))
    # a key added to mimkit after the run was saved: the run had its default
    defaults = _flatten(to_dict(type(cfg)()))
    saved = defaults | {k: v for k, v in LEGACY_VALUES.items() if k in defaults} | saved
    for key in sorted(set(saved) | set(now)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if key in RESOLVED_AT_START and now.get(key) is None:
            continue
        if saved.get(key) != now.get(key):
            hint = ""
            if key.endswith((".lr", ".accum_steps")):  # they follow the number of processes
                hint = "; it follows the effective batch: resume with the same number of processes"
            raise ConfigError(
                f"--resume: {key}={now.get(key)!r} differs from the run's saved value "
                f"{saved.get(key)!r} in {saved_path} (only train.max_steps, train.compile*, "
                f"train.global_batch_size and eval.* may change{hint})"
            )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
