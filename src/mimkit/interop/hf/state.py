"""mimkit <-> Hugging Face state dicts: :func:`to_hf`, :func:`from_hf`.

The supported pairs and the two HF key layouts: :mod:`mimkit.interop.hf`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mimkit.config import ModelConfig
from mimkit.interop.hf.config import (
    build_hf_config,
    config_dict,
    detect_architecture,
    mimkit_kind,
    model_config_dict,
    spec_from_hf,
    spec_from_mimkit,
)
from mimkit.interop.hf.layout import (
    ARCHS,
    HF_ARCHITECTURES,
    HF_LAYOUTS,
    check_keys,
    hub_name,
    key_plan,
    v5_name,
)
from mimkit.interop.spec import Tensors, flat_state

__all__ = ["from_hf", "to_hf"]


# ---- mimkit -> HF ----


def to_hf(
    state: Mapping[str, torch.Tensor],
    *,
    model_config: Mapping[str, Any] | ModelConfig,
    architecture: str | None = None,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    labels: Sequence[str] | None = None,
    layout: str = "hub",
) -> tuple[Tensors, dict[str, Any]]:
    """A mimkit state dict -> (HF state dict, HF config dict).

    ``state``: a mimkit encoder (timm layout), full pretraining model (official MAE / BEiT
    layout) or classifier (timm layout with ``head``/``fc_norm``); ``encoder.``-prefixed module
    state dicts are accepted too. ``model_config``: the architecture (the ``model_config`` of
    mimkit checkpoint metadata, or a :class:`~mimkit.config.ModelConfig`). ``architecture``: an
    HF class name from :data:`HF_ARCHITECTURES`; by default the one for the state's method and
    kind (``ViTModel``, ``ViTMAEForPreTraining``, ``ViTForImageClassification``, ``BeitModel``,
    ``BeitForMaskedImageModeling``, ``BeitForImageClassification``). ``mask_ratio`` and
    ``norm_pix_loss`` go into ViTMAE configs; ``labels`` names the classes of a classifier.
    ``layout``: ``"hub"`` (checkpoint-file names) or ``"v5"`` (transformers 5 module names).

    The config dict is what ``<ConfigClass>.from_dict`` or ``config.json`` takes; it carries
    the mimkit ``model_config`` under ``"mimkit"``. Tensors are copies, dtypes kept. Raises
    ValueError naming the key for a missing, unexpected or mis-shaped tensor, and for models
    without an HF counterpart (a mean-pooled ViT classifier).
    """
    if layout not in HF_LAYOUTS:
        raise ValueError(f"layout must be one of {HF_LAYOUTS}, got {layout!r}")
    flat = flat_state(state)
    mc = model_config_dict(model_config)
    kind = mimkit_kind(mc["method"], flat)
    allowed = [n for n, a in ARCHS.items() if (a.method, a.kind) == (mc["method"], kind)]
    arch = architecture or allowed[0]  # the default: the first of ARCHS that fits
    if arch not in ARCHS:
        raise ValueError(
            f"architecture {arch!r} is not supported; choose one of {HF_ARCHITECTURES}"
        )
    if arch not in allowed:
        raise ValueError(
            f"architecture {arch!r} cannot hold a mimkit {mc['method']} {kind} state; "
            f"choose one of {allowed}"
        )
    spec = spec_from_mimkit(mc, arch, flat)
    plan = key_plan(arch, spec)
    check_keys(
        flat,
        {e.mimkit: e.shape for e in plan},
        what="state",
        hint=f"does model_config match the weights? (converting to {arch})",
    )
    hf: Tensors = {}
    for e in plan:
        t = flat[e.mimkit].detach()
        parts = (t,) if len(e.hf) == 1 else t.chunk(len(e.hf), dim=0)
        for name, part in zip(e.hf, parts, strict=True):
            key = hub_name(name) if layout == "hub" else name
            hf[key] = part.clone().contiguous()
    config = build_hf_config(
        arch, spec, mc, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, labels=labels
    )
    return hf, config


# ---- HF -> mimkit ----


def from_hf(
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any] | Any,
    *,
    architecture: str | None = None,
) -> tuple[Tensors, dict[str, Any]]:
    """An HF state dict and config -> (mimkit state dict, mimkit ``model_config`` dict).

    ``hf_state``: keys in either HF layout (checkpoint-file names, or transformers 5 module
    names). ``hf_config``: a config dict (``config.json``) or a transformers config object.
    ``architecture``: the HF class; by default ``hf_config["architectures"][0]``, else guessed
    from ``model_type`` and the keys. The state comes back in mimkit's flat layouts: an encoder
    (timm), a full MAE / BEiT (official: decoder or ``lm_head`` beside the encoder keys) or a
    classifier (timm, with ``head`` and, for mean pooling, ``fc_norm`` instead of ``norm``).
    The model config is a complete :class:`~mimkit.config.ModelConfig` dict (``to_dict`` form).

    HF ``ViTModel``'s pooler is dropped with a warning; a ``layer_norm_eps`` other than 1e-6
    warns. Raises ValueError naming the key or config field for a missing, unexpected or
    mis-shaped tensor and for configurations mimkit cannot build (non-square images, an
    activation other than exact GELU, no qkv bias, two kinds of relative position bias, ...).
    """
    cfg = config_dict(hf_config)
    if not isinstance(hf_state, Mapping):
        raise ValueError(f"hf_state must be a mapping of tensors, got {type(hf_state).__name__}")
    hf: Tensors = {}
    given: dict[str, str] = {}  # v5 name -> the name in hf_state
    for k, v in hf_state.items():
        if k.endswith("relative_position_index"):  # a buffer in old HF BEiT checkpoints
            continue
        new = v5_name(k)
        if new in hf:
            raise ValueError(f"hf_state has key {k!r} twice (in both HF layouts)")
        hf[new], given[new] = v, k
    hub = any(new != k for new, k in given.items())  # name missing keys in the caller's layout
    arch = architecture or detect_architecture(cfg, hf)
    if arch not in ARCHS:
        raise ValueError(
            f"architecture {arch!r} is not supported; choose one of {HF_ARCHITECTURES}"
        )
    spec, mc = spec_from_hf(cfg, arch, hf)
    plan = key_plan(arch, spec)
    if arch == "ViTModel":
        pooler = sorted(k for k in hf if k.startswith("pooler."))
        if pooler:
            warnings.warn(
                f"dropping the HF ViTModel pooler ({', '.join(pooler)}): mimkit has no pooler "
                "(dense + tanh on the cls token); last_hidden_state is unaffected",
                UserWarning,
                stacklevel=2,
            )
            hf = {k: v for k, v in hf.items() if k not in pooler}
    expected = {name: e.hf_shape() for e in plan for name in e.hf}
    check_keys(
        hf,
        expected,
        what="hf_state",
        hint=f"does hf_config match the weights? (converting {arch})",
        show=lambda k: given.get(k, hub_name(k) if hub else k),
    )
    state: Tensors = {}
    for e in plan:
        parts = [hf[name].detach() for name in e.hf]
        state[e.mimkit] = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)
    return state, mc
