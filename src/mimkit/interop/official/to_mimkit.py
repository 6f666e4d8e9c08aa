"""Official MAE / BEiT state dicts and ``.pth`` files -> mimkit.

The kinds and their layouts: :mod:`mimkit.interop.official`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from timm.models.beit import gen_relative_position_index

from mimkit.interop.official.provenance import official_provenance
from mimkit.interop.official.read import official_args, read_official
from mimkit.interop.official.spec import (
    PROBE_BN_EPS,
    PROBE_COUNT,
    PROBE_KEYS,
    REL_POS_INDEX,
    REL_POS_TABLE,
    compare_shapes,
    detect_kind,
    expected_shapes,
    infer_spec,
    key_listing,
    mimkit_layout,
)
from mimkit.interop.spec import Tensors, tensor_dict

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "OfficialOptions",
    "convert_official",
    "import_official",
    "load_official",
    "preview_official",
]


class OfficialOptions(TypedDict, total=False):
    """The conversion options that :func:`load_official` and :func:`import_official` pass on to
    :func:`convert_official` (see there; each has its default when not given)."""

    strict: bool
    num_heads: int | None
    decoder_num_heads: int | None
    img_size: int | None
    rel_pos_bias: Literal["keep", "per_layer"]
    probe: Literal["keep", "fold"]


def convert_official(
    state: Mapping[str, torch.Tensor],
    *,
    args: Mapping[str, Any] | argparse.Namespace | None = None,
    strict: bool = True,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    rel_pos_bias: Literal["keep", "per_layer"] = "keep",
    probe: Literal["keep", "fold"] = "keep",
    source: str = "state",
) -> tuple[Tensors, dict[str, Any]]:
    """An official MAE / BEiT model state dict -> (mimkit state dict, provenance metadata).

    The kind (see :mod:`mimkit.interop.official`) is detected from the keys and the architecture
    from the shapes; ``args`` (the checkpoint's Namespace or its fields) adds the training
    settings to the metadata. ``strict``: any unexpected, missing or mis-shaped key after the
    conversion raises one ValueError listing them all; with ``strict=False`` the unexpected and
    mis-shaped ones are dropped and all three lists are returned in the metadata
    (``unexpected_keys``, ``missing_keys``, ``mismatched_keys``). ``rel_pos_bias="per_layer"``
    copies BEiT's shared table into every block; ``probe="fold"`` folds an MAE linear probe's
    BatchNorm into its linear layer (a plain classifier). Tensors are not copied.
    """
    if rel_pos_bias not in ("keep", "per_layer"):
        raise ValueError(f"rel_pos_bias must be 'keep' or 'per_layer', got {rel_pos_bias!r}")
    if probe not in ("keep", "fold"):
        raise ValueError(f"probe must be 'keep' or 'fold', got {probe!r}")
    out = tensor_dict(state, f"{source}: key")
    notes: list[str] = []
    if out and all(k.startswith("module.") for k in out):
        out = {k.removeprefix("module."): v for k, v in out.items()}
        notes.append("'module.' key prefix (DistributedDataParallel) removed")
    a = official_args(args)
    kind = detect_kind(set(out))
    official_kind = kind  # what the converted weights are (a folded probe: a classifier)
    spec = infer_spec(
        out, kind, a, num_heads=num_heads, decoder_num_heads=decoder_num_heads, img_size=img_size
    )
    problems: list[str] = []

    # relative position indices: checked against the standard one, then dropped (recomputed)
    if spec.method == "beit":
        standard = gen_relative_position_index((spec.grid, spec.grid))
        for k in [k for k in out if k.endswith(REL_POS_INDEX)]:
            table = k[: -len(REL_POS_INDEX)] + REL_POS_TABLE
            if table not in out:
                continue  # left in place: an unexpected key
            v = out.pop(k)
            if tuple(v.shape) != tuple(standard.shape):
                problems.append(f"{k} {tuple(v.shape)} != {tuple(standard.shape)}")
            elif v.is_floating_point() or not torch.equal(v.long(), standard):
                problems.append(f"{k} differs from the standard relative position index")
            elif v.dtype != torch.long:
                notes.append(f"{k} was {v.dtype} (exported as int64)")
        if any(k.endswith(REL_POS_TABLE) for k in out) and not any(
            k.endswith(REL_POS_INDEX) for k in state
        ):
            notes.append("no relative_position_index buffers (mimkit recomputes them)")
        if rel_pos_bias == "per_layer":
            if spec.rel_pos == "shared":
                from mimkit.models.resize import expand_shared_rel_pos_bias

                out = expand_shared_rel_pos_bias(out, spec.depth)
                spec = dataclasses.replace(spec, rel_pos="per_layer")
                notes.append(f"shared relative position table copied into {spec.depth} blocks")
            else:
                notes.append("rel_pos_bias='per_layer': no shared table, nothing to copy")

    extra_meta: dict[str, Any] = {}
    if kind == "mae-linprobe":
        count = out.pop(PROBE_COUNT, None)
        extra_meta["probe_num_batches_tracked"] = None if count is None else int(count)
        out = {PROBE_KEYS.get(k, k): v for k, v in out.items()}
        if probe == "fold":
            out = _fold_probe(out, notes)
            official_kind = "mae-classifier"

    expected = dict(expected_shapes(official_kind, spec))
    unexpected, missing, mis = compare_shapes(out, expected)
    mis = problems + mis
    if strict and (unexpected or missing or mis):
        parts = [
            key_listing(n, x)
            for n, x in (("unexpected keys", unexpected), ("missing keys", missing))
            if x
        ]
        if mis:
            parts.append(key_listing("mismatched keys", mis))
        raise ValueError(
            f"{source}: the official {kind} weights do not convert cleanly to mimkit's "
            f"{mimkit_layout(kind, probe)[1]} layout: {'; '.join(parts)}. Pass strict=False to "
            "convert anyway (unexpected and mismatched keys are dropped, all are listed in the "
            "metadata)"
        )
    if not strict:
        bad = {m.split(" ", 1)[0] for m in mis}
        out = {k: v for k, v in out.items() if k in expected and k not in bad}
    meta = official_provenance(spec, official_kind, kind, a, probe=probe, notes=notes)
    meta.update(extra_meta)
    if not strict:
        meta.update(unexpected_keys=unexpected, missing_keys=missing, mismatched_keys=mis)
    meta["notes"] = notes
    return out, meta


def _fold_probe(state: Tensors, notes: list[str]) -> Tensors:
    need = [k for k in PROBE_KEYS.values() if k not in state]
    if need:
        raise ValueError(f"cannot fold the linear probe: missing {need}")
    w, b = state.pop("probe.head.weight"), state.pop("probe.head.bias")
    mean, var = state.pop("probe.bn.running_mean"), state.pop("probe.bn.running_var")
    scale = (var.double() + PROBE_BN_EPS).rsqrt()  # (D,)
    w2 = w.double() * scale  # (C, D)
    state["head.weight"] = w2.to(w.dtype)
    state["head.bias"] = (b.double() - w2 @ mean.double()).to(b.dtype)
    notes.append(
        f"the probe's BatchNorm (eps {PROBE_BN_EPS:g}, running statistics) folded into 'head'"
    )
    return state


def preview_official(
    state: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None
) -> tuple[dict[str, Any], bool]:
    """(the metadata an import would record, whether the heads were guessed), from the shapes
    alone: ``mimkit inspect`` has no ``num_heads`` to give, so 1 stands in where none is known."""
    for heads, dec_heads in ((None, None), (None, 1), (1, 1)):
        try:
            _, meta = convert_official(
                state, args=args, strict=False, num_heads=heads, decoder_num_heads=dec_heads
            )
            return meta, heads is not None
        except ValueError as err:
            if "heads" not in str(err) or heads == 1:
                raise
    raise AssertionError("unreachable")


def load_official(
    path: str | Path, *, entry: str | None = None, **options: Unpack[OfficialOptions]
) -> tuple[Tensors, dict[str, Any]]:
    """An official MAE / BEiT ``.pth`` -> (mimkit state dict, provenance metadata).

    Read safely with :func:`read_official` (nothing but tensors, plain values and
    ``argparse.Namespace`` is unpickled), converted with :func:`convert_official` (see there for
    the options). The metadata also records the file's ``official_entry`` and the top-level
    entries that were not converted (``official_extras``: optimizer, epoch, scaler, ...).
    """
    ck = read_official(path, entry=entry)
    state, meta = convert_official(ck.state, args=ck.args, source=str(ck.path), **options)
    meta["official_entry"] = ck.entry
    meta["official_file"] = ck.path.name
    if ck.extras:
        meta["official_extras"] = ck.extras
        meta["notes"].append(f"not converted: top-level entries {ck.extras}")
    return state, meta


def import_official(src: str | Path, dst: str | Path, **options: Unpack[OfficialOptions]) -> Path:
    """An official ``.pth`` -> a mimkit ``.safetensors`` with provenance metadata; returns ``dst``.

    Read and converted by :func:`load_official` (``options``: see :func:`convert_official`).
    The file works wherever mimkit takes a checkpoint (encoders, full pretraining models and
    classifiers; a kept linear probe's ``probe.*`` keys are for
    :func:`~mimkit.interop.official.export_official`).
    """
    from mimkit.engine.checkpoint import save_weights

    state, meta = load_official(src, **options)
    dst = Path(dst)
    save_weights(dst, state, meta)
    return dst
