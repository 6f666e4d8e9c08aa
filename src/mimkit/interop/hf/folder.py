"""Hugging Face model folders (``config.json`` + safetensors); whole mimkit checkpoints <-> HF."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mimkit.engine.checkpoint import load_weights, save_weights
from mimkit.interop.hf.config import config_dict, detect_architecture
from mimkit.interop.hf.layout import HF_DEFAULTS, hub_name
from mimkit.interop.hf.provenance import hf_provenance
from mimkit.interop.hf.state import from_hf, to_hf
from mimkit.interop.spec import Tensors

__all__ = ["export_to_hf", "import_from_hf", "load_hf_folder", "save_hf_folder"]


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
    cfg = config_dict(config)
    if cfg.get("model_type") not in HF_DEFAULTS:
        raise ValueError(
            f"config 'model_type' must be one of {sorted(HF_DEFAULTS)}, got "
            f"{cfg.get('model_type')!r}"
        )
    if not cfg.get("architectures"):
        raise ValueError("config has no 'architectures': from_pretrained needs the class name")
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {hub_name(k): v for k, v in state.items()}
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
    hf_state, config = load_hf_folder(folder)
    arch = architecture or detect_architecture(config, hf_state)
    state, mc = from_hf(hf_state, config, architecture=arch)
    meta = hf_provenance(arch, state, mc, config)
    path = Path(path)
    save_weights(path, state, meta)
    return path
