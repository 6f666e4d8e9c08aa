"""Convert mimkit checkpoints to and from Hugging Face ``transformers`` (ViT, ViTMAE, BEiT).

Pure tensor and key manipulation: nothing here imports ``transformers``, downloads anything or
unpickles anything. Supported pairs (mimkit state dict layout <-> HF class):

======================================  ==========================================================
mimkit                                  Hugging Face
======================================  ==========================================================
MAE encoder (timm ViT layout)           ``ViTModel`` (default) or ``ViTMAEModel``
full MAE (official layout)              ``ViTMAEForPreTraining``
ViT classifier, ``pool="cls"``          ``ViTForImageClassification``
BEiT encoder (timm Beit layout)         ``BeitModel``
full BEiT (official layout, lm_head)    ``BeitForMaskedImageModeling``
BEiT classifier, ``pool="avg"``/"cls"   ``BeitForImageClassification``
======================================  ==========================================================

A ViT classifier with ``pool="avg"`` has no HF counterpart (``ViTForImageClassification`` reads
the normed cls token) and is refused with a ValueError.

The key mapping (fused <-> split qkv, BEiT's absent key bias, ``gamma`` <-> ``lambda``, ...)
and the HF architecture table: :mod:`mimkit.interop.hf_layout`; the config conversion:
:mod:`mimkit.interop.hf_config`.

Two HF key layouts exist. ``"hub"``: the names in HF checkpoint files (``encoder.layer.i.
attention.attention.query`` ...), which transformers 4.x uses in memory and 5.x still writes with
``save_pretrained`` and reads back; ``"v5"``: the in-memory names of transformers 5.x
(``layers.i.attention.q_proj`` ...), for ``model.load_state_dict``. :func:`to_hf` writes either;
:func:`from_hf` reads both (and the ``decoder.decoder_encoder.layer.i`` names that transformers 5
``save_pretrained`` writes for ViTMAE's decoder).

mimkit LayerNorms use eps 1e-6; exported configs say ``layer_norm_eps=1e-6`` (HF's default is
1e-12). Importing a config with another eps warns (mimkit keeps 1e-6; outputs differ by about
eps / variance, relatively). HF ``ViTModel``'s pooler (dense + tanh on the cls token) has no
mimkit counterpart: it is dropped on import (with a warning) and absent on export, so load an
exported ``ViTModel`` with ``from_pretrained(folder, add_pooling_layer=False)``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mimkit.config import ModelConfig
from mimkit.engine.checkpoint import load_weights, save_weights
from mimkit.interop.hf_config import (
    _config_dict,
    _detect_architecture,
    _hf_config,
    _mimkit_kind,
    _model_config_dict,
    _spec_from_hf,
    _spec_from_mimkit,
)
from mimkit.interop.hf_layout import (
    _ARCHS,
    _HF_DEFAULTS,
    _HUB_TO_V5_RE,
    _LAYOUTS,
    _V5_TO_HUB_RE,
    HF_ARCHITECTURES,
    Tensors,
    _check_keys,
    _plan,
    _rename,
)

__all__ = [
    "HF_ARCHITECTURES",
    "export_to_hf",
    "from_hf",
    "import_from_hf",
    "load_hf_folder",
    "save_hf_folder",
    "to_hf",
]


# ---- mimkit -> HF ----


def flat_state(state: Mapping[str, torch.Tensor]) -> Tensors:
    """``encoder.``-prefixed module state dicts (MAE, BEiT, Classifier) -> the flat layout."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    out: Tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state key {k!r} is not a tensor ({type(v).__name__})")
        out[k.removeprefix("encoder.")] = v
    return out


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
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    flat = flat_state(state)
    mc = _model_config_dict(model_config)
    kind = _mimkit_kind(mc["method"], flat)
    allowed = [n for n, a in _ARCHS.items() if (a.method, a.kind) == (mc["method"], kind)]
    arch = architecture or allowed[0]  # the default: the first of _ARCHS that fits
    if arch not in _ARCHS:
        raise ValueError(
            f"architecture {arch!r} is not supported; choose one of {HF_ARCHITECTURES}"
        )
    if arch not in allowed:
        raise ValueError(
            f"architecture {arch!r} cannot hold a mimkit {mc['method']} {kind} state; "
            f"choose one of {allowed}"
        )
    spec = _spec_from_mimkit(mc, arch, flat)
    plan = _plan(spec)
    _check_keys(
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
            key = _rename(name, _V5_TO_HUB_RE) if layout == "hub" else name
            hf[key] = part.clone().contiguous()
    config = _hf_config(spec, mc, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, labels=labels)
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
    cfg = _config_dict(hf_config)
    if not isinstance(hf_state, Mapping):
        raise ValueError(f"hf_state must be a mapping of tensors, got {type(hf_state).__name__}")
    hf: Tensors = {}
    given: dict[str, str] = {}  # v5 name -> the name in hf_state
    for k, v in hf_state.items():
        if k.endswith("relative_position_index"):  # a buffer in old HF BEiT checkpoints
            continue
        new = _rename(k, _HUB_TO_V5_RE)
        if new in hf:
            raise ValueError(f"hf_state has key {k!r} twice (in both HF layouts)")
        hf[new], given[new] = v, k
    hub = any(new != k for new, k in given.items())  # name missing keys in the caller's layout
    arch = architecture or _detect_architecture(cfg, hf)
    if arch not in _ARCHS:
        raise ValueError(
            f"architecture {arch!r} is not supported; choose one of {HF_ARCHITECTURES}"
        )
    spec, mc = _spec_from_hf(cfg, arch, hf)
    plan = _plan(spec)
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
    _check_keys(
        hf,
        expected,
        what="hf_state",
        hint=f"does hf_config match the weights? (converting {arch})",
        show=lambda k: given.get(k, _rename(k, _V5_TO_HUB_RE) if hub else k),
    )
    state: Tensors = {}
    for e in plan:
        parts = [hf[name].detach() for name in e.hf]
        state[e.mimkit] = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)
    return state, mc


# ---- HF folders (config.json + model.safetensors) ----

_PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


def save_hf_folder(
    folder: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF checkpoint-file key names) to ``folder``.

    ``state`` and ``config`` are what :func:`to_hf` returns (either layout). The folder loads with
    ``<Class>.from_pretrained(folder)`` in transformers 4.x and 5.x (for ``ViTModel`` pass
    ``add_pooling_layer=False``: mimkit exports no pooler). The weights file is written
    atomically; returns the folder.
    """
    cfg = _config_dict(config)
    if cfg.get("model_type") not in _HF_DEFAULTS:
        raise ValueError(
            f"config 'model_type' must be one of {sorted(_HF_DEFAULTS)}, got "
            f"{cfg.get('model_type')!r}"
        )
    if not cfg.get("architectures"):
        raise ValueError("config has no 'architectures': from_pretrained needs the class name")
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_rename(k, _V5_TO_HUB_RE): v for k, v in state.items()}
    save_weights(folder / "model.safetensors", tensors, {"format": "pt"})
    tmp = folder / ".config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / "config.json")
    return folder


def load_hf_folder(folder: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """(HF state dict, config dict) of an HF model folder, read from safetensors only.

    Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
    ``model.safetensors.index.json``). Pickled weights (``pytorch_model.bin``) are refused with a
    ValueError: unpickling can run code. Pass the result to :func:`from_hf`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"HF model folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single)), config
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: no valid 'weight_map' ({err})") from None
        state: Tensors = {}
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(f"{index}: shard name {name!r} is not a .safetensors file name")
            state.update(load_file(str(folder / name)))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise ValueError(f"{index}: key {missing[0]!r} is in no shard")
        return state, config
    pickled = [n for n in _PICKLE_WEIGHTS if (folder / n).exists()]
    if pickled:
        raise ValueError(
            f"{folder} holds {pickled[0]} but no model.safetensors: mimkit reads safetensors only "
            "(unpickling can run code). Convert it in an environment you trust, e.g. "
            "`Model.from_pretrained(folder).save_pretrained(out)` (transformers writes "
            "safetensors), and read `out`"
        )
    raise FileNotFoundError(f"{folder} has no model.safetensors")


# ---- whole checkpoints: a mimkit .safetensors <-> an HF folder ----

# top-level metadata keys of mimkit checkpoints (see mimkit.tasks.pretrain.provenance)
_ARCH_KEYS = (
    "arch",
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
)


def export_to_hf(
    checkpoint: str | Path,
    folder: str | Path,
    *,
    architecture: str | None = None,
) -> Path:
    """A mimkit checkpoint (file or run directory) -> an HF model folder; returns the folder.

    The architecture, MAE mask ratio and target, and class names come from the checkpoint's
    provenance metadata. A checkpoint that does not record its target (an official file saved
    without ``args``, such as the released ``mae_visualize_*`` weights, trained on raw pixels)
    exports ``norm_pix_loss=False``, HF's default; the mask ratio defaults to 0.75.
    """
    from mimkit.models.loading import find_checkpoint

    path = find_checkpoint(checkpoint)
    state, meta = load_weights(path)
    if meta.get("format") != "mimkit" or "model_config" not in meta:
        raise ValueError(f"{path} has no mimkit metadata ('model_config'): not a mimkit checkpoint")
    mask_ratio = meta.get("mask_ratio")
    hf_state, config = to_hf(
        state,
        model_config=meta["model_config"],
        architecture=architecture,
        mask_ratio=0.75 if mask_ratio is None else float(mask_ratio),
        norm_pix_loss=meta.get("target") == "norm_pixels",
        labels=meta.get("classes"),
    )
    return save_hf_folder(folder, hf_state, config)


def import_from_hf(
    folder: str | Path,
    path: str | Path,
    *,
    architecture: str | None = None,
) -> Path:
    """An HF model folder -> a mimkit ``.safetensors`` with provenance metadata; returns ``path``.

    The file works wherever mimkit takes a checkpoint (``model.init`` of fine-tuning, probes and
    dense tasks). HF folders do not record the training data's normalization, so there is no
    ``mean``/``std`` in the metadata.
    """
    from mimkit import __version__

    hf_state, config = load_hf_folder(folder)
    arch = architecture or _detect_architecture(config, hf_state)
    state, mc = from_hf(hf_state, config, architecture=arch)
    a = _ARCHS[arch]
    meta: dict[str, Any] = {
        "format": "mimkit",
        "mimkit_version": __version__,
        "source": f"huggingface:{arch}",
        "method": a.method,
        **{k: mc[k] for k in _ARCH_KEYS},
        "model_config": mc,
    }
    if a.kind == "classifier":
        labels = config.get("id2label") or {}
        meta.update(
            kind="classifier",
            layout="timm-classifier",
            num_classes=int(state["head.weight"].shape[0]),
            pool="avg" if "fc_norm.weight" in state else "cls",
            classes=[labels[k] for k in sorted(labels, key=int)] if labels else None,
        )
    else:
        pretrain = a.kind == "pretrain"
        meta["includes_decoder"] = pretrain
        if a.method == "mae":
            meta["layout"] = "official-mae" if pretrain else "timm-vit"
            c = {**_HF_DEFAULTS["vit_mae"], **config}
            if a.model_type == "vit_mae":
                meta["mask_ratio"] = float(c["mask_ratio"])
                meta["target"] = "norm_pixels" if c["norm_pix_loss"] else "pixels"
        else:
            meta["layout"] = "official-beit" if pretrain else "timm-beit"
            if pretrain:
                meta["vocab_size"] = int(state["lm_head.weight"].shape[0])
    path = Path(path)
    save_weights(path, state, meta)
    return path
