"""Read an official MAE / BEiT checkpoint file (``.pth``) safely: :func:`read_official`.

The official code (facebookresearch/mae, microsoft/unilm ``beit/``) saves ``torch.save`` pickles:
``{'model': state_dict}`` (released weights), or from a training run ``{'model', 'optimizer',
'epoch', 'scaler', 'args'}`` (plus ``'model_ema'`` in BEiT); BEiT files may use ``'module'`` for
``'model'`` (its ``--model_key model|module``). ``args`` is an ``argparse.Namespace``.

Safety. Files are read with ``torch.load(path, map_location="cpu", weights_only=True)`` inside
``torch.serialization.safe_globals(SAFE_GLOBALS)``: torch's weights-only unpickler (tensor and
storage rebuilding, dtypes, ``OrderedDict``, plain containers and scalars) plus exactly one class,
``argparse.Namespace`` (the ``args`` entry; the official ``args`` fields are str, int, float,
bool, None, lists and tuples of those; the optimizer and scaler states are plain dicts of tensors
and numbers). Nothing else is allowed: a pickle that names any other global (``os.system``,
``pathlib.Path.touch``, ``getattr``, ``numpy`` scalars, ``pathlib.PosixPath``, ...) is refused
with an :class:`UnsafeCheckpointError` before that global is resolved, so nothing in the file
runs. Re-save such a file in an environment you trust (``torch.save({'model': sd}, out)``).

The conversion of what is read: :mod:`mimkit.interop.official`.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimkit.interop.spec import Tensors

__all__ = [
    "SAFE_GLOBALS",
    "OfficialCheckpoint",
    "UnsafeCheckpointError",
    "json_value",
    "official_args",
    "read_official",
]

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""What :func:`read_official` allows beyond torch's weights-only defaults: the ``args`` entry."""

# args fields worth keeping in the metadata (JSON values); the rest are paths and launch details
_ARG_FIELDS = (
    "model",
    "input_size",
    "mask_ratio",
    "norm_pix_loss",
    "epochs",
    "batch_size",
    "accum_iter",
    "blr",
    "lr",
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "layer_decay",
    "drop_path",
    "global_pool",
    "nb_classes",
    "smoothing",
    "mixup",
    "cutmix",
    "reprob",
    "seed",
    "num_mask_patches",
    "max_mask_patches_per_block",
    "min_mask_patches_per_block",
    "second_input_size",
    "discrete_vae_type",
    "layer_scale_init_value",
    "rel_pos_bias",
    "shared_rel_pos_bias",
    "abs_pos_emb",
    "use_mean_pooling",
    "imagenet_default_mean_and_std",
)


class UnsafeCheckpointError(ValueError):
    """The file's pickle needs a global outside the allow-list; nothing of it was run."""


@dataclass
class OfficialCheckpoint:
    """What :func:`read_official` found in a file."""

    state: Tensors  # the model state dict, official key names
    entry: str | None  # the top-level key it came from ("model", "module"), None: the file itself
    args: dict[str, Any]  # useful fields of the ``args`` Namespace, as JSON values
    extras: list[str]  # other top-level entries (optimizer, epoch, scaler, model_ema, ...)
    path: Path


# ---- reading a file safely ----


def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL (\S+)", message)
    return m.group(1) if m else None


def _safe_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(str(err))
        if name is not None:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: its pickle needs the global {name!r}, which is not on "
                "the allow-list (tensors, plain containers, argparse.Namespace); nothing in the "
                "file was run. If you trust its source, re-save only the weights "
                "(torch.save({'model': state_dict}, out)) and read that"
            ) from None
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(err).__name__


def json_value(v: Any) -> Any:
    """A JSON-able copy of a plain value, or ``...`` when it is not one."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        items = [json_value(x) for x in v]
        return ... if any(x is ... for x in items) else items
    return ...


def official_args(args: Any) -> dict[str, Any]:
    """The fields of an official ``args`` Namespace (or mapping) worth keeping, as JSON values."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        return {}  # not the official Namespace: nothing worth keeping
    out = {}
    for k in _ARG_FIELDS:
        if k in args:
            v = json_value(args[k])
            if v is not ...:
                out[k] = v
    return out


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_official(path: str | Path, *, entry: str | None = None) -> OfficialCheckpoint:
    """The model state dict, ``args`` and other entries of an official ``.pth`` (safely).

    ``entry``: the top-level key holding the weights; by default ``'model'``, else ``'module'``,
    else the file itself when it is a bare state dict. Raises :class:`UnsafeCheckpointError` for a
    pickle that needs anything outside :data:`SAFE_GLOBALS` (nothing of it runs), ValueError for
    anything that is not a checkpoint of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _safe_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if entry is None:
        entry = next((k for k in ("model", "module") if k in obj), None)
        if entry is None and not _is_state_dict(obj):
            raise ValueError(
                f"{path}: no 'model' or 'module' entry and not a bare state dict "
                f"(top-level keys: {sorted(map(str, obj))[:10]})"
            )
    elif entry not in obj:
        raise ValueError(f"{path}: no entry {entry!r} (top-level keys: {sorted(map(str, obj))})")
    state = obj if entry is None else obj[entry]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: entry {entry!r} is not a state dict ({type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entry {entry!r} holds non-tensor values, e.g. {bad[0]!r}")
    extras = [] if entry is None else sorted(str(k) for k in obj if k not in (entry, "args"))
    args = obj.get("args") if entry is not None else None
    return OfficialCheckpoint(dict(state), entry, official_args(args), extras, path)
