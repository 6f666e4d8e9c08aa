"""The protocol every checkpoint format implements, and mimkit's own format, the hub.

:mod:`mimkit.interop.convert` knows the formats only through :class:`Format`: each says whether
it recognises a path, describes a checkpoint, and converts to and from mimkit's own format
(``X -> Y`` is ``X.to_mimkit`` then ``Y.from_mimkit``). Each format's module holds one instance,
``FORMAT``. What ``describe`` shows of a checkpoint's tensors and provenance is shared here.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "FORMAT",
    "SHOWN_KEYS",
    "Exported",
    "Format",
    "MimkitFormat",
    "folder_config",
    "model_parts",
    "tensor_counts",
    "written_notes",
]

Exported = tuple[list[str], dict[str, Any]]  # notes, and details such as timm's create_model call

# the provenance keys `mimkit inspect` shows (all are in --json)
SHOWN_KEYS = (
    "kind", "method", "layout", "target", "vocab_size", "tokenizer", "mask_strategy",
    "mask_ratio", "num_masked", "loss_on", "arch", "img_size", "patch_size", "in_chans",
    "embed_dim", "depth", "num_heads", "mlp_ratio", "includes_decoder", "num_classes", "pool",
    "classes", "mean", "std", "dataset", "epochs", "step", "epoch", "label_fraction", "init",
    "pretrain", "source", "official_kind", "created", "mimkit_version",
)  # fmt: skip


class Format(abc.ABC):
    """One checkpoint format: recognised on disk, described, converted to and from mimkit's."""

    name: ClassVar[str]
    one_way: ClassVar[str | None] = None  # why it converts to mimkit only (None: both ways)

    @abc.abstractmethod
    def recognise(self, path: Path) -> bool:
        """Whether ``path`` (an existing file or folder) is in this format: its name and a safe
        peek, nothing unpickled."""

    @abc.abstractmethod
    def describe(self, path: Path) -> dict[str, Any]:
        """What the checkpoint at ``path`` holds (sizes, method, kind, provenance), for
        ``mimkit inspect``."""

    def check_output(self, dst: Path) -> None:
        """Raise ValueError when ``dst`` cannot hold this format (before anything is converted);
        by default any path does (folders)."""
        return None

    def to_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> list[str]:
        """``src`` in this format -> a mimkit ``.safetensors`` at ``dst``; returns the notes.
        ``options``: those of :func:`~mimkit.interop.convert.convert`, each format takes its own."""
        raise ValueError(f"cannot import from {self.name!r}")

    def from_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> Exported:
        """A mimkit checkpoint ``src`` (file or run directory) -> ``dst`` in this format."""
        raise ValueError(f"cannot export to {self.name!r}")


def folder_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a model folder, or None (not a folder, no such file, not a JSON
    object); ValueError when it is not valid JSON."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else None


def written_notes(dst: Path) -> list[str]:
    """The notes a conversion recorded in the metadata of the mimkit file it wrote."""
    from mimkit.engine.checkpoint import read_metadata

    notes = read_metadata(dst).get("notes") or []
    return [str(n) for n in notes]


def tensor_counts(state: Mapping[str, Any]) -> dict[str, int]:
    """``tensors`` and ``parameters`` of a state dict."""
    return {"tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))}


def model_parts(state: Mapping[str, Any]) -> dict[str, bool]:
    """Whether a (mimkit or official) state dict has a decoder / MIM head and a classifier head."""
    return {
        "has_decoder": any(k.startswith(("decoder_", "lm_head.")) for k in state),
        "has_head": "head.weight" in state
        or any(k.startswith(("head.1.", "probe.head.")) for k in state),
    }


class MimkitFormat(Format):
    """mimkit's own: a ``.safetensors`` with provenance metadata, or a run / checkpoint folder.

    Every conversion goes through it, so it converts to and from nothing itself.
    """

    name = "mimkit"

    def recognise(self, path: Path) -> bool:
        """A ``.safetensors`` with mimkit metadata; a folder no other format claims is a run or
        checkpoint directory (else the error says what one should hold)."""
        from mimkit.engine.checkpoint import read_metadata
        from mimkit.models.loading import find_checkpoint

        if path.is_dir():
            find_checkpoint(path)
            return True
        return path.suffix == ".safetensors" and read_metadata(path).get("format") == "mimkit"

    def describe(self, path: Path) -> dict[str, Any]:
        """The file, its sizes, its parts and its provenance metadata (all of it under
        ``metadata``)."""
        from mimkit.engine.checkpoint import load_weights
        from mimkit.models.loading import find_checkpoint

        file = find_checkpoint(path)
        state, meta = load_weights(file)
        return {
            "file": str(file),
            **tensor_counts(state),
            **model_parts(state),
            **{k: meta[k] for k in SHOWN_KEYS if k in meta},
            "metadata": meta,
        }

    def check_output(self, dst: Path) -> None:
        """A mimkit checkpoint is a ``.safetensors`` file."""
        if dst.suffix != ".safetensors":
            raise ValueError(f"{dst}: a mimkit checkpoint is a .safetensors file")

    def from_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> Exported:
        """Nothing to convert: refused."""
        raise ValueError(f"{src} is a mimkit checkpoint already: choose --to official, hf or timm")


FORMAT = MimkitFormat()
