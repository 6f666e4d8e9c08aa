"""Official MAE / BEiT state dicts and ``.pth`` files -> mimkit.

The kinds and their layouts: :mod:`mimkit.interop.official`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.beit import gen_relative_position_index

from mimkit.config import ModelConfig
from mimkit.interop.official.read import _args_dict, read_official
from mimkit.interop.official.spec import (
    _INDEX,
    _TABLE,
    _compare,
    _detect_kind,
    _expected,
    _infer_spec,
    _layout,
    _listing,
    _preset_name,
    _Spec,
)

__all__ = ["convert_official", "import_official", "load_official"]

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
