"""The weights layer: mimkit's safetensors files, their provenance, and finding them.

Every weights file mimkit writes is safetensors with provenance metadata (all values JSON
strings): what the file is (:class:`Provenance`), written and read here and nowhere else. A
``model.init`` may name a file, a run directory or a ``checkpoints/ckpt-*`` directory;
:func:`find_checkpoint` turns it into the file, :func:`open_weights` into a :class:`WeightsFile`
handle (the file and its provenance, read once from the header).

This module sits at the bottom of the package: it imports no other mimkit layer but the config
errors, and reads headers and provenance without PyTorch (the config layer checks a
``model.init`` before anything heavy is imported); tensors are read and written through
``safetensors.torch``, imported when first needed.

Header format (safetensors' specification): an unsigned little-endian 64-bit header length, then
that many bytes of JSON whose ``__metadata__`` maps strings to strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mimkit.config.core import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKSUMS",
    "PROVENANCE_VERSION",
    "CorruptCheckpointError",
    "NotSafetensorsError",
    "Provenance",
    "WeightsFile",
    "checkpoint_model_config",
    "checkpoints_newest_first",
    "created_now",
    "find_checkpoint",
    "latest_checkpoint",
    "load_weights",
    "open_weights",
    "provenance_model_config",
    "read_header_metadata",
    "read_metadata",
    "save_weights",
    "sha256_file",
    "upstream_provenance",
    "verify_checkpoint",
]

# 1: files written before the version was recorded (read the same way); 2: ``provenance_version``
PROVENANCE_VERSION = 2
CHECKSUMS = "checksums.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_WEIGHTS_NAMES = ("encoder.safetensors", "model_best.safetensors", "model.safetensors")

# what a downstream checkpoint repeats of the pretraining it started from (under "pretrain")
_UPSTREAM_KEYS = (
    "method", "target", "tokenizer", "vocab_size", "mask_strategy", "mask_ratio", "num_masked",
    "dataset", "epochs", "step", "img_size", "patch_size", "source", "created", "mimkit_version",
)  # fmt: skip


class NotSafetensorsError(ConfigError):
    """A weights file that is not safetensors (a pickle, a truncated download): one line."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing, truncated or changed since they were written."""


# ---- provenance ----


@dataclasses.dataclass
class Provenance:
    """What a mimkit weights file is, as stored in its safetensors metadata.

    The fields every reader relies on are typed; what only some kinds record (a classifier's
    ``classes``, a pretraining's ``mask_ratio``, a probe's ``block``, ...) is in ``extra`` and
    stored beside them, flat, as it always was. ``kind`` is ``encoder``, ``pretrain``,
    ``classifier``, ``linear_probe``, ``segmenter``, ``detector`` or ``dvae``.
    """

    kind: str
    method: str | None = None
    source: str | None = None  # where weights mimkit did not train came from
    layout: str | None = None  # the key layout (timm-vit, official-mae, ...)
    model_config: dict[str, Any] | None = None  # the pretraining ``model`` section
    mean: list[float] | None = None
    std: list[float] | None = None
    created: str | None = None
    mimkit_version: str | None = None
    version: int = PROVENANCE_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    _TYPED = ("kind", "method", "source", "layout", "model_config", "mean", "std", "created",
              "mimkit_version")  # fmt: skip

    def to_metadata(self) -> dict[str, Any]:
        """The flat metadata dict a weights file stores (``format: mimkit`` first)."""
        self.validate()
        out: dict[str, Any] = {"format": "mimkit", "provenance_version": self.version}
        for name in self._TYPED:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        clash = sorted(set(self.extra) & {"format", "provenance_version", *self._TYPED})
        if clash:
            raise ValueError(f"provenance extra fields shadow typed ones: {clash}")
        return out | self.extra

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], file: str | Path = "<metadata>") -> Provenance:
        """Read and validate a weights file's decoded metadata; ``ValueError`` naming ``file``
        when it is not mimkit's or is from a newer mimkit."""
        if meta.get("format") != "mimkit":
            raise ValueError(f"{file} has no mimkit provenance metadata (format is not mimkit)")
        version = meta.get("provenance_version", 1)
        if not isinstance(version, int) or not 1 <= version <= PROVENANCE_VERSION:
            raise ValueError(
                f"{file}: provenance_version={version!r} is newer than this mimkit reads "
                f"(<= {PROVENANCE_VERSION}): upgrade mimkit"
            )
        if not isinstance(meta.get("kind"), str):
            raise ValueError(f"{file}: provenance has no kind")
        typed = {k: meta[k] for k in cls._TYPED if k in meta}
        extra = {k: v for k, v in meta.items()
                 if k not in ("format", "provenance_version", *cls._TYPED)}  # fmt: skip
        prov = cls(**typed, version=version, extra=extra)
        try:
            prov.validate()
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
        return prov

    def validate(self) -> None:
        """Check the typed fields' shapes; ``ValueError`` with one line."""
        if not self.kind:
            raise ValueError("provenance kind is empty")
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError("provenance model_config is not a mapping")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
            ):
                raise ValueError(f"provenance {name}={value!r} is not a list of numbers")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"provenance mean and std differ in length: {self.mean}, {self.std}")

    def get(self, key: str, default: Any = None) -> Any:
        """A typed field or an extra one by its metadata name (``default`` when absent)."""
        if key in self._TYPED:
            value = getattr(self, key)
            return default if value is None else value
        return self.extra.get(key, default)


def created_now() -> str:
    """The ``created`` field of provenance metadata: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def upstream_provenance(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The provenance of the checkpoint a downstream model was initialized from (or {})."""
    return {k: metadata[k] for k in _UPSTREAM_KEYS if metadata and k in metadata}


def provenance_model_config(meta: dict[str, Any], file: str | Path) -> dict[str, Any]:
    """The architecture (``model_config``) of a mimkit weights file's metadata; ``ValueError``
    naming the file when it has no mimkit provenance."""
    if meta.get("format") != "mimkit" or "model_config" not in meta:
        raise ValueError(
            f"{file} has no mimkit provenance metadata (model_config): give a checkpoint written "
            "by mimkit"
        )
    return dict(meta["model_config"])


# ---- reading and writing safetensors ----


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def read_header_metadata(path: str | Path) -> dict[str, Any]:
    """``__metadata__`` of the safetensors file ``path``, JSON values decoded, read without
    PyTorch; ``ValueError`` with one line when the file is not safetensors."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a readable safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"{path} is not a readable safetensors file (header too large)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a readable safetensors file (bad header)") from None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    return _decode(meta)


@contextlib.contextmanager
def _said_if_not_safetensors(path: str | Path) -> Iterator[None]:
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise NotSafetensorsError(
            f"{path} is not a readable safetensors file ({err}); mimkit never unpickles weights: "
            "convert a PyTorch checkpoint with `mimkit convert`"
        ) from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Provenance metadata of a safetensors file, JSON values decoded."""
    from safetensors.torch import safe_open

    with _said_if_not_safetensors(path), safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return _decode(raw)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a safetensors file. Never unpickles anything."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with _said_if_not_safetensors(path):
        return load_file(str(path)), read_metadata(path)


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk (before it is renamed into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_weights(
    path: str | Path,
    state: dict[str, torch.Tensor],
    metadata: dict[str, Any] | Provenance,
) -> None:
    """Write a safetensors file atomically (temporary file, fsync, rename); ``metadata``: a
    :class:`Provenance` or an already flat dict."""
    from safetensors.torch import save_file

    if isinstance(metadata, Provenance):
        metadata = metadata.to_metadata()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file(tensors, str(tmp), metadata=strings)
    fsync_file(tmp)
    os.replace(tmp, path)


# ---- checkpoint directories (read side; engine/checkpoint.py writes them) ----


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
        if sha256_file(path) != want["sha256"]:
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


# ---- from a model.init to a file ----


def find_checkpoint(path: str | Path) -> Path:
    """The safetensors file that ``path`` stands for: the file itself; a run directory's
    ``encoder.safetensors`` (pretraining), ``model_best.safetensors`` (fine-tuning) or
    ``model.safetensors``, else its newest complete checkpoint; a ``ckpt-*`` directory's
    ``model.safetensors``."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise NotSafetensorsError(
                f"{p} is not a .safetensors file: mimkit reads weights only as safetensors "
                "(never unpickles); convert an official or timm checkpoint with `mimkit convert`"
            )
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    for name in _WEIGHTS_NAMES:
        if (p / name).is_file():
            return p / name
    latest = latest_checkpoint(p / "checkpoints")
    if latest is not None:
        verify_checkpoint(latest, files=("model.safetensors",))
        return latest / "model.safetensors"
    raise FileNotFoundError(
        f"{p}: no encoder.safetensors, model_best.safetensors, model.safetensors or complete "
        "checkpoints/ inside"
    )


def checkpoint_model_config(path: str | Path) -> dict[str, Any]:
    """The architecture (the pretraining ``model`` section) recorded in a checkpoint's metadata."""
    file = find_checkpoint(path)
    return provenance_model_config(read_header_metadata(file), file)


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """A resolved ``model.init``: the safetensors file and its metadata, read once."""

    path: Path
    metadata: dict[str, Any]

    @property
    def provenance(self) -> Provenance:
        """The metadata as a validated :class:`Provenance` (``ValueError`` if not mimkit's)."""
        return Provenance.from_metadata(self.metadata, self.path)

    def load(self) -> dict[str, torch.Tensor]:
        """The tensors (read now; nothing is unpickled)."""
        from safetensors.torch import load_file

        with _said_if_not_safetensors(self.path):
            return load_file(str(self.path))


_OPENED: dict[tuple[str, int, int], WeightsFile] = {}


def open_weights(path: str | Path) -> WeightsFile:
    """The :class:`WeightsFile` of a ``model.init`` (a file, run or checkpoint directory).

    Resolved once per file and version: the config layer, the task and the provenance writer of
    one run share the same handle, so the header is read once.
    """
    file = find_checkpoint(path)
    st = file.stat()
    key = (str(file.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _OPENED:
        try:
            meta = read_header_metadata(file)
        except ValueError as err:
            raise NotSafetensorsError(
                f"{err}; mimkit never unpickles weights: convert a PyTorch checkpoint with "
                "`mimkit convert`"
            ) from None
        _OPENED[key] = WeightsFile(file, meta)
    return _OPENED[key]
