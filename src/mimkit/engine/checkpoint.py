"""Checkpoints: weights in safetensors with provenance, training state saved atomically.

Layout of ``<run.dir>/checkpoints``::

    ckpt-00001200/model.safetensors   weights + provenance metadata (all string values)
    ckpt-00001200/state.pt            optimizer, step, epoch, sampler position, RNG states
    ckpt-00001200/optimizer/          train.parallel=fsdp: the optimizer's shards, one file per
                                      rank (torch.distributed.checkpoint), instead of state.pt's
    ckpt-00001200/checksums.json      SHA-256 and size of every file above
    latest                            the name of the newest complete checkpoint

A checkpoint directory is written under a temporary name (files fsynced, checksums last) and
renamed into place, then ``latest`` is replaced atomically, so a crash never leaves a half-written
checkpoint as the latest. Resuming verifies the checksums and falls back to the previous complete
checkpoint when the newest is corrupt or truncated (:func:`checkpoints_newest_first`,
:func:`verify_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from safetensors import SafetensorError

# the file-level pieces live in the weights layer; the engine's callers read them here too
from mimkit.weights import (
    CHECKSUMS,
    CorruptCheckpointError,
    NotSafetensorsError,
    checkpoints_newest_first,
    created_now,
    fsync_file,
    latest_checkpoint,
    load_weights,
    read_metadata,
    save_weights,
    sha256_file,
    upstream_provenance,
    verify_checkpoint,
)

__all__ = [
    "CorruptCheckpointError",
    "NotSafetensorsError",
    "checkpoints_newest_first",
    "created_now",
    "latest_checkpoint",
    "load_newest_usable",
    "load_train_state",
    "load_weights",
    "read_metadata",
    "save_checkpoint",
    "save_weights",
    "staging_dir",
    "upstream_provenance",
    "verify_checkpoint",
]


def staging_dir(ckpt_root: str | Path, step: int, *, create: bool = True) -> Path:
    """The temporary directory ``ckpt-{step:08d}/`` is written in (emptied when created)."""
    root = Path(ckpt_root)
    tmp = root / f".ckpt-{step:08d}.tmp"
    if create:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    train_state: dict[str, Any],
    keep_last: int = 2,
    staged: bool = False,
) -> Path:
    """Write ``ckpt-{step:08d}/`` atomically, point ``latest`` at it, keep ``keep_last``.

    ``staged``: :func:`staging_dir` was created, and partly written (the optimizer's shards by
    every rank), before this call; it is completed rather than emptied.
    """
    root = Path(ckpt_root)
    name = f"ckpt-{step:08d}"
    tmp = staging_dir(root, step, create=not staged)
    save_weights(tmp / "model.safetensors", weights, metadata)
    torch.save(train_state, tmp / "state.pt")
    fsync_file(tmp / "state.pt")
    _write_checksums(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    done = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checksums(ckpt_dir: Path) -> None:
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {
        p.relative_to(ckpt_dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in files
    }
    out = ckpt_dir / CHECKSUMS
    out.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
    fsync_file(out)


# what reading a damaged state.pt (torch.load) or model.safetensors raises
_UNREADABLE = (OSError, RuntimeError, EOFError, ValueError, SafetensorError, UnpicklingError)


def load_newest_usable(
    found: list[Path],
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], list[tuple[Path, Exception]]]:
    """(path, train state, weights, problems) of the first of ``found`` (newest first) that
    verifies and reads; ``problems``: (path, error) of each newer one passed over. Raises
    :class:`CorruptCheckpointError` when none is usable."""
    problems: list[tuple[Path, Exception]] = []
    for path in found:
        try:
            verify_checkpoint(path)
            state = load_train_state(path)
            weights, _ = load_weights(path / "model.safetensors")
        except (CorruptCheckpointError, *_UNREADABLE) as err:
            problems.append((path, err))
            continue
        return path, state, weights, problems
    raise CorruptCheckpointError(
        f"no usable checkpoint in {found[0].parent}: "
        + "; ".join(f"{p.name}: {err}" for p, err in problems)
    )


def load_train_state(ckpt_dir: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    # weights_only=True: tensors and plain containers only, never arbitrary objects
    return torch.load(Path(ckpt_dir) / "state.pt", map_location=map_location, weights_only=True)
