"""The metadata of a safetensors file, read without PyTorch: the config layer checks a
``model.init`` before anything heavy is imported, so a bad override is answered at once.

Format (safetensors' specification): an unsigned little-endian 64-bit header length, then that
many bytes of JSON whose ``__metadata__`` maps strings to strings (mimkit stores JSON in them).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

__all__ = ["provenance_model_config", "read_header_metadata"]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_header_metadata(path: str | Path) -> dict[str, Any]:
    """``__metadata__`` of the safetensors file ``path``, JSON values decoded; ``ValueError`` with
    one line when the file is not safetensors."""
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
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def provenance_model_config(meta: dict[str, Any], file: str | Path) -> dict[str, Any]:
    """The architecture (``model_config``) of a mimkit weights file's metadata; ``ValueError``
    naming the file when it has no mimkit provenance."""
    if meta.get("format") != "mimkit" or "model_config" not in meta:
        raise ValueError(
            f"{file} has no mimkit provenance metadata (model_config): give a checkpoint written "
            "by mimkit"
        )
    return dict(meta["model_config"])
