"""The official MAE / BEiT ``.pth`` as a :class:`~mimkit.interop.format.Format`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mimkit.interop.format import (
    SHOWN_KEYS,
    Exported,
    Format,
    model_parts,
    tensor_counts,
    written_notes,
)
from mimkit.interop.official.from_mimkit import export_official
from mimkit.interop.official.read import read_official
from mimkit.interop.official.to_mimkit import OfficialOptions, import_official, preview_official

__all__ = ["FORMAT", "PICKLE_SUFFIXES", "OfficialFormat"]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # what torch.save files are called
_NOT_OFFICIAL = ("num_heads", "mimkit_version", "created")  # a guess / mimkit's, not the file's


class OfficialFormat(Format):
    """An official MAE / BEiT ``.pth``, read with the weights-only allow-list."""

    name = "official"

    def recognise(self, path: Path) -> bool:
        """A file named like a ``torch.save`` checkpoint."""
        return path.is_file() and path.suffix in PICKLE_SUFFIXES

    def describe(self, path: Path) -> dict[str, Any]:
        """Sizes, parts and what an import would record (heads not in any shape left out), the
        file's entries and its ``args``."""
        ck = read_official(path)
        info = {**tensor_counts(ck.state), **model_parts(ck.state)}
        meta, guessed = preview_official(ck.state, ck.args)
        skip = _NOT_OFFICIAL if guessed else _NOT_OFFICIAL[1:]
        info.update({k: meta[k] for k in SHOWN_KEYS if k in meta and k not in skip})
        info["entry"], info["other_entries"] = ck.entry, ck.extras
        if ck.args:
            info["args"] = ck.args
        return info

    def check_output(self, dst: Path) -> None:
        """An official checkpoint is a ``.pth`` (or another ``torch.save`` name)."""
        if dst.suffix not in PICKLE_SUFFIXES:
            raise ValueError(f"{dst}: an official checkpoint is a .pth file")

    def to_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> list[str]:
        """:func:`~mimkit.interop.official.import_official` with the options it takes."""
        taken = {k: v for k, v in options.items() if k in OfficialOptions.__optional_keys__}
        import_official(src, dst, **taken)
        return written_notes(dst)

    def from_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> Exported:
        """:func:`~mimkit.interop.official.export_official` (``kind``, ``include_args``)."""
        export_official(
            src, dst, kind=options.get("kind"), include_args=options.get("include_args", False)
        )
        return [], {}


FORMAT = OfficialFormat()
