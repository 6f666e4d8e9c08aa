"""Read the official MAE and BEiT checkpoint files (``.pth``) safely; write them back.

Reading a file: :mod:`mimkit.interop.official_read` (the file format, and the weights-only,
allow-listed unpickling: ``argparse.Namespace`` is the one class beyond torch's defaults);
kind detection and architecture inference: :mod:`mimkit.interop.official_spec`. Their public
names are re-exported here.

Layouts: each official kind, the keys it has besides the encoder's, and the mimkit layout it
converts to (``layout`` in the metadata):

- ``mae-encoder`` (``mae_pretrain_vit_*.pth``): ``norm``. -> ``timm-vit``, the same keys.
- ``mae-pretrain`` (``mae_visualize_vit_*.pth``, main_pretrain's ``checkpoint-*.pth``):
  ``norm, decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.i, decoder_norm,
  decoder_pred``. -> ``official-mae``, the same keys (``MAE`` takes them through
  ``from_official_layout``).
- ``mae-classifier`` (main_finetune): ``fc_norm, head`` (global pool, no ``norm``) or ``norm,
  head`` (cls token). -> ``timm-classifier``, the same keys; ``pool`` "avg" / "cls".
- ``mae-linprobe`` (main_linprobe: ``head = Sequential(BatchNorm1d(affine=False, eps=1e-6),
  Linear)``): ``norm`` or ``fc_norm``, ``head.0.running_mean/running_var/num_batches_tracked``,
  ``head.1.weight/bias``. -> ``timm-vit-probe``: the encoder (and ``fc_norm``) plus
  ``probe.bn.running_mean/running_var``, ``probe.head.weight/bias`` (the key names of mimkit's
  ``probe.safetensors`` under ``probe.``; the batch count goes to the metadata), or with
  ``probe="fold"`` a ``timm-classifier``.
- ``beit-pretrain`` (modeling_pretrain): ``mask_token, rel_pos_bias.relative_position_bias_table,
  rel_pos_bias.relative_position_index, norm, lm_head``. -> ``official-beit``.
- ``beit-classifier`` (modeling_finetune, intermediate or final fine-tuning, any resolution):
  ``blocks.i.attn.relative_position_bias_table/_index``, ``fc_norm, head`` (mean pooling) or
  ``norm, head``. -> ``timm-classifier``.
- ``beit-encoder``: a BEiT encoder with neither ``lm_head`` nor ``head``. -> ``timm-beit``.

The ViT encoder (MAE, timm's ``VisionTransformer``): ``cls_token (1,1,D), pos_embed (1,1+N,D),
patch_embed.proj.{weight (D,C,p,p), bias}, blocks.i.{norm1, attn.qkv (3D,D)+bias, attn.proj,
norm2, mlp.fc1, mlp.fc2}``. The BEiT encoder (timm's ``Beit``): ``cls_token, patch_embed.proj,
[pos_embed], blocks.i.{gamma_1, gamma_2, norm1, attn.qkv.weight (no bias), attn.q_bias,
attn.v_bias, [attn.relative_position_bias_table ((2g-1)^2+3, H)], attn.proj, norm2, mlp.fc1,
mlp.fc2}``. The official BEiT registers ``relative_position_index`` ((g*g+1, g*g+1), int64) as a
persistent buffer, so its files hold one per table; mimkit (and timm) recompute it: on import each
is checked against the standard index and dropped, on export it is regenerated. Everything else
converts key for key, tensors unchanged (same objects, dtypes kept), so official -> mimkit ->
official is lossless. ``rel_pos_bias="per_layer"`` copies BEiT's shared pretraining table into
every block, as BEiT's fine-tuning code does (not reversible: the export then has per-block
tables). ``probe="fold"`` folds the linear probe's BatchNorm (eval statistics) into its linear
layer: ``W' = W / sqrt(var + eps)``, ``b' = b - W' mean``, an equivalent mimkit classifier.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.beit import gen_relative_position_index

from mimkit.config import ModelConfig
from mimkit.interop.hf import flat_state
from mimkit.interop.official_read import (
    SAFE_GLOBALS,
    OfficialCheckpoint,
    UnsafeCheckpointError,
    _args_dict,
    _json_value,
    read_official,
)
from mimkit.interop.official_spec import (
    _INDEX,
    _TABLE,
    OFFICIAL_KINDS,
    OfficialKind,
    _compare,
    _detect_kind,
    _expected,
    _family,
    _grid_from_table,
    _infer_spec,
    _layout,
    _listing,
    _preset_name,
    _Spec,
)

__all__ = [
    "OFFICIAL_KINDS",
    "SAFE_GLOBALS",
    "OfficialCheckpoint",
    "OfficialKind",
    "UnsafeCheckpointError",
    "convert_official",
    "export_official",
    "import_official",
    "load_official",
    "read_official",
    "save_official",
    "to_official",
]

Tensors = dict[str, torch.Tensor]

# the official code's normalization: MAE uses ImageNet's statistics; BEiT (without
# --imagenet_default_mean_and_std, its default) the Inception ones
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_INCEPTION_MEAN, _INCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
_PROBE_BN_EPS = 1e-6  # main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6)
_PROBE_KEYS = {  # official linear probe -> mimkit (the names of probe.safetensors, prefixed)
    "head.0.running_mean": "probe.bn.running_mean",
    "head.0.running_var": "probe.bn.running_var",
    "head.1.weight": "probe.head.weight",
    "head.1.bias": "probe.head.bias",
}
_PROBE_COUNT = "head.0.num_batches_tracked"


# ---- official -> mimkit ----


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

    The kind (see the module docstring) is detected from the keys and the architecture inferred
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
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    out: Tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: key {k!r} is not a tensor ({type(v).__name__})")
        out[k] = v
    notes: list[str] = []
    if out and all(k.startswith("module.") for k in out):
        out = {k.removeprefix("module."): v for k, v in out.items()}
        notes.append("'module.' key prefix (DistributedDataParallel) removed")
    a = _args_dict(args)
    kind = _detect_kind(set(out))
    spec = _infer_spec(
        out, kind, a, num_heads=num_heads, decoder_num_heads=decoder_num_heads, img_size=img_size
    )
    problems: list[str] = []

    # relative position indices: checked against the standard one, then dropped (recomputed)
    if spec.family == "beit":
        standard = gen_relative_position_index((spec.grid, spec.grid))
        for k in [k for k in out if k.endswith(_INDEX)]:
            table = k[: -len(_INDEX)] + _TABLE
            if table not in out:
                continue  # left in place: an unexpected key
            v = out.pop(k)
            if tuple(v.shape) != tuple(standard.shape):
                problems.append(f"{k} {tuple(v.shape)} != {tuple(standard.shape)}")
            elif v.is_floating_point() or not torch.equal(v.long(), standard):
                problems.append(f"{k} differs from the standard relative position index")
            elif v.dtype != torch.long:
                notes.append(f"{k} was {v.dtype} (exported as int64)")
        if any(k.endswith(_TABLE) for k in out) and not any(k.endswith(_INDEX) for k in state):
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
        count = out.pop(_PROBE_COUNT, None)
        extra_meta["probe_num_batches_tracked"] = None if count is None else int(count)
        out = {_PROBE_KEYS.get(k, k): v for k, v in out.items()}
        if probe == "fold":
            out = _fold_probe(out, notes)
            spec = dataclasses.replace(spec, kind="mae-classifier")

    expected = dict(_expected(spec))
    unexpected, missing, mis = _compare(out, expected)
    mis = problems + mis
    if strict and (unexpected or missing or mis):
        parts = [
            _listing(n, x)
            for n, x in (("unexpected keys", unexpected), ("missing keys", missing))
            if x
        ]
        if mis:
            parts.append(_listing("mismatched keys", mis))
        raise ValueError(
            f"{source}: the official {kind} weights do not convert cleanly to mimkit's "
            f"{_layout(kind, probe)[1]} layout: {'; '.join(parts)}. Pass strict=False to convert "
            "anyway (unexpected and mismatched keys are dropped, all are listed in the metadata)"
        )
    if not strict:
        bad = {m.split(" ", 1)[0] for m in mis}
        out = {k: v for k, v in out.items() if k in expected and k not in bad}
    meta = _metadata(spec, kind, a, probe=probe, notes=notes)
    meta.update(extra_meta)
    if not strict:
        meta.update(unexpected_keys=unexpected, missing_keys=missing, mismatched_keys=mis)
    meta["notes"] = notes
    return out, meta


def _fold_probe(state: Tensors, notes: list[str]) -> Tensors:
    need = [k for k in _PROBE_KEYS.values() if k not in state]
    if need:
        raise ValueError(f"cannot fold the linear probe: missing {need}")
    w, b = state.pop("probe.head.weight"), state.pop("probe.head.bias")
    mean, var = state.pop("probe.bn.running_mean"), state.pop("probe.bn.running_var")
    scale = (var.double() + _PROBE_BN_EPS).rsqrt()  # (D,)
    w2 = w.double() * scale  # (C, D)
    state["head.weight"] = w2.to(w.dtype)
    state["head.bias"] = (b.double() - w2 @ mean.double()).to(b.dtype)
    notes.append(
        f"the probe's BatchNorm (eps {_PROBE_BN_EPS:g}, running statistics) folded into 'head'"
    )
    return state


def _metadata(
    spec: _Spec, source_kind: str, args: Mapping[str, Any], *, probe: str, notes: list[str]
) -> dict[str, Any]:
    from mimkit import __version__

    kind, layout = _layout(source_kind, probe)
    beit = spec.family == "beit"
    mc = dataclasses.asdict(ModelConfig())
    mc.update(
        method=spec.family,
        arch=_preset_name(spec.embed_dim, spec.depth, spec.num_heads),
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
    )
    if isinstance(args.get("drop_path"), (int, float)):
        mc["drop_path"] = float(args["drop_path"])
    if beit:
        ls = args.get("layer_scale_init_value")
        if spec.layer_scale and not (isinstance(ls, (int, float)) and ls > 0):
            ls = 0.1
            notes.append("layer-scale initial value not in args: 0.1 recorded (init only)")
        mc.update(
            layer_scale=float(ls) if spec.layer_scale else None,
            rel_pos_bias=spec.rel_pos,
            abs_pos_emb=spec.abs_pos,
        )
    if spec.kind == "mae-pretrain":
        mc["decoder"] = {
            "embed_dim": spec.dec_dim,
            "depth": spec.dec_depth,
            "num_heads": spec.dec_heads,
        }
    meta: dict[str, Any] = {
        "format": "mimkit",
        "mimkit_version": __version__,
        "source": f"official-{spec.family}",
        "official_kind": spec.kind,
        "kind": kind,
        "layout": layout,
        "method": spec.family,
        **{k: mc[k] for k in ("arch", "img_size", "patch_size", "in_chans")},
        **{k: mc[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")},
        "includes_decoder": kind == "pretrain",
    }
    if spec.in_chans == 3:
        imagenet = not beit or bool(args.get("imagenet_default_mean_and_std", False))
        meta["mean"] = _IMAGENET_MEAN if imagenet else _INCEPTION_MEAN
        meta["std"] = _IMAGENET_STD if imagenet else _INCEPTION_STD
    if kind == "pretrain" and not beit:
        meta["mask_strategy"] = "random"
        meta["mask_ratio"] = float(args.get("mask_ratio", 0.75))
        meta["loss_on"] = "masked"
        if isinstance(args.get("norm_pix_loss"), bool):
            meta["target"] = "norm_pixels" if args["norm_pix_loss"] else "pixels"
    elif kind == "pretrain":
        meta["mask_strategy"] = "blockwise"
        meta["num_masked"] = int(args.get("num_mask_patches", 75))
        meta["loss_on"] = "masked"
        meta["target"] = "visual_tokens"
        meta["vocab_size"] = spec.vocab_size
    elif kind in ("classifier", "linear_probe"):
        meta.update(num_classes=spec.num_classes, pool=spec.pool, pretrain_method=spec.family)
        if kind == "linear_probe":
            meta["probe"] = {"bn_eps": _PROBE_BN_EPS, "prefix": "probe."}
        if source_kind == "mae-linprobe" and kind == "classifier":
            meta["folded_from"] = "mae-linprobe"
        mc.pop("decoder")  # a classifier has none (as mimkit's fine-tuning metadata)
    meta["model_config"] = mc
    if args:
        meta["args"] = dict(args)
    return meta


def load_official(
    path: str | Path,
    *,
    strict: bool = True,
    entry: str | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    rel_pos_bias: Literal["keep", "per_layer"] = "keep",
    probe: Literal["keep", "fold"] = "keep",
) -> tuple[Tensors, dict[str, Any]]:
    """An official MAE / BEiT ``.pth`` -> (mimkit state dict, provenance metadata).

    Read safely with :func:`read_official` (nothing but tensors, plain values and
    ``argparse.Namespace`` is unpickled), converted with :func:`convert_official` (see there for
    the options). The metadata also records the file's ``official_entry`` and the top-level
    entries that were not converted (``official_extras``: optimizer, epoch, scaler, ...).
    """
    ck = read_official(path, entry=entry)
    state, meta = convert_official(
        ck.state,
        args=ck.args,
        strict=strict,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        img_size=img_size,
        rel_pos_bias=rel_pos_bias,
        probe=probe,
        source=str(ck.path),
    )
    meta["official_entry"] = ck.entry
    meta["official_file"] = ck.path.name
    if ck.extras:
        meta["official_extras"] = ck.extras
        meta["notes"].append(f"not converted: top-level entries {ck.extras}")
    return state, meta


# ---- mimkit -> official ----


def _kind_from_mimkit(method: str | None, keys: set[str]) -> str:
    family = method if method in ("mae", "beit") else _family(keys)
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
    inverse = {v: k for k, v in _PROBE_KEYS.items()}
    out: Tensors = {}
    indices: dict[int, torch.Tensor] = {}  # one per grid: blocks share it (one storage saved)
    for k, v in flat.items():
        out[inverse.get(k, k) if kind == "mae-linprobe" else k] = v
        if family == "beit" and k.endswith(_TABLE) and v.ndim == 2:
            g = _grid_from_table(v.shape[0], k)
            if g not in indices:
                indices[g] = gen_relative_position_index((g, g))
            out[k[: -len(_TABLE)] + _INDEX] = indices[g]
    if kind == "mae-linprobe":
        count = metadata.get("probe_num_batches_tracked", 0)
        if count is not None:
            out[_PROBE_COUNT] = torch.tensor(int(count), dtype=torch.long)
    dec = mc.get("decoder") if isinstance(mc.get("decoder"), Mapping) else {}
    # heads fix no key or shape except a relative position table's columns: the check below
    # works without them
    tables = [v for k, v in flat.items() if k.endswith(_TABLE) and v.ndim == 2]
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
        plain = {k: _json_value(v) for k, v in fields.items()}
        obj["args"] = argparse.Namespace(**{k: v for k, v in plain.items() if v is not ...})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---- whole files: official .pth <-> mimkit .safetensors ----


def import_official(
    src: str | Path,
    dst: str | Path,
    *,
    strict: bool = True,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    rel_pos_bias: Literal["keep", "per_layer"] = "keep",
    probe: Literal["keep", "fold"] = "keep",
) -> Path:
    """An official ``.pth`` -> a mimkit ``.safetensors`` with provenance metadata; returns ``dst``.

    The file works wherever mimkit takes a checkpoint (encoders, full pretraining models and
    classifiers; a kept linear probe's ``probe.*`` keys are for :func:`export_official`).
    """
    from mimkit.engine.checkpoint import save_weights

    state, meta = load_official(
        src,
        strict=strict,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        img_size=img_size,
        rel_pos_bias=rel_pos_bias,
        probe=probe,
    )
    dst = Path(dst)
    save_weights(dst, state, meta)
    return dst


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
