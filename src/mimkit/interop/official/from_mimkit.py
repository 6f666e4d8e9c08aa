"""mimkit -> official MAE / BEiT state dicts and ``.pth`` files.

The kinds and their layouts: :mod:`mimkit.interop.official`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models.beit import gen_relative_position_index

from mimkit.interop.official.read import json_value
from mimkit.interop.official.spec import (
    OFFICIAL_KINDS,
    PROBE_COUNT,
    PROBE_KEYS,
    REL_POS_INDEX,
    REL_POS_TABLE,
    OfficialKind,
    family_of,
    grid_from_table,
)
from mimkit.interop.official.to_mimkit import convert_official
from mimkit.interop.spec import Tensors, flat_state

__all__ = ["export_official", "save_official", "to_official"]


def _kind_from_mimkit(method: str | None, keys: set[str]) -> str:
    family = method if method in ("mae", "beit") else family_of(keys)
    if family == "beit":
        if "lm_head.weight" in keys:
            return "beit-pretrain"
        return "beit-classifier" if "head.weight" in keys else "beit-encoder"
    if any(k.startswith("decoder_") for k in keys):
        return "mae-pretrain"
    if any(k.startswith("probe.") for k in keys):
        return "mae-linprobe"
    return "mae-classifier" if "head.weight" in keys else "mae-encoder"


def to_official(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    kind: OfficialKind | None = None,
) -> Tensors:
    """A mimkit state dict (flat, or ``encoder.``-prefixed module keys) -> official key names.

    ``kind``: the official layout to write; by default the metadata's ``official_kind`` (files
    imported by :func:`load_official`), else detected from the keys and ``method``. BEiT's
    ``relative_position_index`` buffers are regenerated (int64) beside each table and a linear
    probe's keys renamed back (``head.0.*`` BatchNorm, ``head.1.*`` linear). The result is checked
    by converting it back (strictly): it must give exactly the keys it came from.
    """
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
    flat = flat_state(state)
    mc = metadata.get("model_config") or {}
    method = metadata.get("method") or mc.get("method")
    kind = kind or metadata.get("official_kind") or _kind_from_mimkit(method, set(flat))
    if kind not in OFFICIAL_KINDS:
        raise ValueError(f"kind must be one of {OFFICIAL_KINDS}, got {kind!r}")
    family = kind.split("-")[0]
    if method in ("mae", "beit") and method != family:
        raise ValueError(f"kind {kind!r} does not fit the checkpoint's method {method!r}")
    inverse = {v: k for k, v in PROBE_KEYS.items()}
    out: Tensors = {}
    indices: dict[int, torch.Tensor] = {}  # one per grid: blocks share it (one storage saved)
    for k, v in flat.items():
        out[inverse.get(k, k) if kind == "mae-linprobe" else k] = v
        if family == "beit" and k.endswith(REL_POS_TABLE) and v.ndim == 2:
            g = grid_from_table(v.shape[0], k)
            if g not in indices:
                indices[g] = gen_relative_position_index((g, g))
            out[k[: -len(REL_POS_TABLE)] + REL_POS_INDEX] = indices[g]
    if kind == "mae-linprobe":
        count = metadata.get("probe_num_batches_tracked", 0)
        if count is not None:
            out[PROBE_COUNT] = torch.tensor(int(count), dtype=torch.long)
    dec = mc.get("decoder") if isinstance(mc.get("decoder"), Mapping) else {}
    # heads fix no key or shape except a relative position table's columns: the check below
    # works without them
    tables = [v for k, v in flat.items() if k.endswith(REL_POS_TABLE) and v.ndim == 2]
    heads = mc.get("num_heads") or metadata.get("num_heads")
    heads = heads or (int(tables[0].shape[1]) if tables else 1)
    try:
        back, back_meta = convert_official(
            out,
            strict=True,
            num_heads=heads,
            decoder_num_heads=(dec.get("num_heads") or 1) if kind == "mae-pretrain" else None,
            img_size=mc.get("img_size") or metadata.get("img_size"),
            source=f"the {kind} export",
        )
    except ValueError as err:
        raise ValueError(f"the state does not fit the official {kind} layout: {err}") from None
    if back_meta["official_kind"] != kind:
        raise ValueError(
            f"the state holds an official {back_meta['official_kind']} model, not {kind!r} "
            f"(keys: {sorted(flat)[:6]} ...)"
        )
    if set(back) != set(flat):
        raise ValueError(
            f"the {kind} export would not load back to the same keys: "
            f"{sorted(set(back) ^ set(flat))[:8]}"
        )
    return out


def save_official(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    path: str | Path,
    *,
    kind: OfficialKind | None = None,
    entry: str = "model",
    include_args: bool = False,
) -> Path:
    """Write ``{entry: official state dict}`` with ``torch.save`` (atomically); returns ``path``.

    ``include_args`` adds ``'args'``: an ``argparse.Namespace`` of the metadata's ``args``
    fields (plain values only). Off by default: a Namespace needs an allow-list to be read with
    ``torch.load(weights_only=True)`` (:func:`read_official` has it, a plain load does not).
    """
    official = to_official(state, metadata, kind=kind)
    tensors = {k: v.detach().cpu() for k, v in official.items()}
    obj: dict[str, Any] = {entry: tensors}
    if include_args:
        fields = metadata.get("args") or {}
        plain = {k: json_value(v) for k, v in fields.items()}
        obj["args"] = argparse.Namespace(**{k: v for k, v in plain.items() if v is not ...})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def export_official(
    checkpoint: str | Path,
    dst: str | Path,
    *,
    kind: OfficialKind | None = None,
    include_args: bool = False,
) -> Path:
    """A mimkit checkpoint (file or run directory) -> an official ``.pth``; returns ``dst``."""
    from mimkit.engine.checkpoint import load_weights
    from mimkit.models.loading import find_checkpoint

    path = find_checkpoint(checkpoint)
    state, meta = load_weights(path)
    if meta.get("format") != "mimkit":
        raise ValueError(f"{path} has no mimkit metadata: not a mimkit checkpoint")
    return save_official(state, meta, dst, kind=kind, include_args=include_args)
