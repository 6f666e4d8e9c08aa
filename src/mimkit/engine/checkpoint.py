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

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mimkit.config.core import ConfigError

__all__ = [
    "CorruptCheckpointError",
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

CHECKSUMS = "checksums.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing, truncated or changed since they were written."""


# what a downstream checkpoint repeats of the pretraining it started from (under "pretrain")
_UPSTREAM_KEYS = (
    "method", "target", "tokenizer", "vocab_size", "mask_strategy", "mask_ratio", "num_masked",
    "dataset", "epochs", "step", "img_size", "patch_size", "source", "created", "mimkit_version",
)  # fmt: skip


def created_now() -> str:
    """The ``created`` field of provenance metadata: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def upstream_provenance(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The provenance of the checkpoint a downstream model was initialized from (or {})."""
    return {k: metadata[k] for k in _UPSTREAM_KEYS if metadata and k in metadata}


def _stringify(metadata: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def save_weights(
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """Write a safetensors file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata=_stringify(metadata))
    _fsync(tmp)
    os.replace(tmp, path)


class NotSafetensorsError(ConfigError):
    """A weights file that is not safetensors (a pickle, a truncated download): one line."""


@contextlib.contextmanager
def _said_if_not_safetensors(path: str | Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as err:
        raise NotSafetensorsError(
            f"{path} is not a readable safetensors file ({err}); mimkit never unpickles weights: "
            "convert a PyTorch checkpoint with `mimkit convert`"
        ) from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Provenance metadata of a safetensors file, JSON values decoded."""
    with _said_if_not_safetensors(path), safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a safetensors file. Never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with _said_if_not_safetensors(path):
        return load_file(str(path)), read_metadata(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    _fsync(tmp / "state.pt")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(ckpt_dir: Path) -> None:
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {
        p.relative_to(ckpt_dir).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in files
    }
    out = ckpt_dir / CHECKSUMS
    out.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
    _fsync(out)


def verify_checkpoint(ckpt_dir: str | Path, files: tuple[str, ...] | None = None) -> None:
    """Check a checkpoint's files (all, or ``files``) against its ``checksums.json``; raise
    :class:`CorruptCheckpointError` naming the file at fault. A checkpoint written before mimkit
    recorded checksums is accepted as it is."""
    ckpt_dir = Path(ckpt_dir)
    listing = ckpt_dir / CHECKSUMS
    if not listing.is_file():
        return
    try:
        sums = json.loads(listing.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{listing}: unreadable ({err})") from err
    for name, want in sums.items():
        if files is not None and name not in files:
            continue
        path = ckpt_dir / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes, {want['bytes']} were written (truncated or changed)"
            )
        if _sha256(path) != want["sha256"]:
            raise CorruptCheckpointError(f"{path}: SHA-256 differs from the one recorded")


def _complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "state.pt").is_file()


def checkpoints_newest_first(ckpt_root: str | Path) -> list[Path]:
    """The complete checkpoint directories (both files in place; staging directories never
    count), newest step first: what a resume tries, in order."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("ckpt-*") if p.is_dir() and _complete(p)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint directory (``latest`` names it), or None."""
    found = checkpoints_newest_first(ckpt_root)
    return found[0] if found else None


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
