"""Convert OpenAI's published DALL-E dVAE pickles (``encoder.pkl``, ``decoder.pkl``) to safetensors.

OpenAI published the dVAE as ``torch.save`` of the whole module objects, whose classes live in the
``dall_e`` package. Loading a pickle can run arbitrary code, so :func:`convert_dalle_pickle`
refuses unless the caller passes ``trust_pickle=True``, and even then it unpickles with an
allowlist: no class or function outside it is ever imported or called, and the ``dall_e`` package
is not needed. The allowlist (see :func:`_resolve_global`):

- the ``dall_e`` classes (``dall_e.encoder.Encoder``/``EncoderBlock``,
  ``dall_e.decoder.Decoder``/``DecoderBlock``, ``dall_e.utils.Conv2d``) and any ``torch.nn``
  module class (``Sequential``, ``ReLU``, ``MaxPool2d``, ``Identity``, ``Upsample``, ...): all are
  replaced by an inert stand-in that only stores the pickled attribute dict and has no behaviour;
- ``torch._utils._rebuild_tensor``/``_rebuild_tensor_v2``/``_rebuild_parameter`` (tensor and
  parameter reconstruction; storages are resolved by ``torch.load`` itself),
  ``collections.OrderedDict``, ``builtins.set``/``frozenset`` and ``torch.device``.

Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) stops the load with an
:class:`UnsafePickleError` naming the global before it is resolved. The parameters are then read
out of the stand-ins' attribute dicts (``_parameters``, persistent ``_buffers``, ``_modules``) into
a flat state dict with the keys of the original module's ``state_dict()``, checked strictly
against :class:`~mimkit.models.dalle.DalleEncoder` / ``DalleDecoder``, and written with
``safetensors``.
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from mimkit.interop.format import Format
from mimkit.models.dalle import DalleDecoder, DalleEncoder, infer_dalle_config

__all__ = [
    "FORMAT",
    "DalleFormat",
    "UnsafePickleError",
    "convert_dalle_pickle",
    "read_dalle_pickle",
]

_DALLE_CLASSES = frozenset(
    {
        ("dall_e.encoder", "Encoder"),
        ("dall_e.encoder", "EncoderBlock"),
        ("dall_e.decoder", "Decoder"),
        ("dall_e.decoder", "DecoderBlock"),
        ("dall_e.utils", "Conv2d"),
    }
)
_ROOTS = {"dall_e.encoder.Encoder": "encoder", "dall_e.decoder.Decoder": "decoder"}
_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the DALL-E allowlist; nothing of it was run."""


class _InertModule:
    """Stand-in for a pickled ``nn.Module``: keeps the pickled attribute dict, runs nothing."""

    pickled_name: ClassVar[str] = "?"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = state[0]
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.pickled_name}: unexpected pickled state {type(state)}")
        self.state = state


_stand_ins: dict[str, type[_InertModule]] = {}


def _stand_in(qualified: str) -> type[_InertModule]:
    """One inert class per pickled class name (so identity checks in the pickle stay coherent)."""
    if qualified not in _stand_ins:
        short = qualified.rsplit(".", 1)[-1]
        _stand_ins[qualified] = type(f"Inert{short}", (_InertModule,), {"pickled_name": qualified})
    return _stand_ins[qualified]


def _is_torch_module_class(module: str, name: str) -> bool:
    """Whether ``module.name`` is an ``nn.Module`` class of an already imported ``torch.nn``."""
    if not (module == "torch.nn" or module.startswith("torch.nn.modules.")):
        return False
    if not name.isidentifier():  # no dotted (nested) names
        return False
    mod = sys.modules.get(module)  # never import anything on the pickle's behalf
    obj = getattr(mod, name, None) if mod is not None else None
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _resolve_global(module: str, name: str) -> Any:
    """The object a pickle's global ``module.name`` stands for, or :class:`UnsafePickleError`."""
    # Protocol-2 pickles spell some modules the Python 2 way (``__builtin__.set``); translate as
    # the default ``find_class`` does, by table lookup only.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _DALLE_CLASSES or _is_torch_module_class(module, name):
        return _stand_in(f"{module}.{name}")
    if (module, name) in _ALLOWED_CALLABLES:
        return _ALLOWED_CALLABLES[(module, name)]
    raise UnsafePickleError(
        f"refusing to unpickle global '{module}.{name}': it is not on the DALL-E dVAE allowlist "
        "(module classes, tensor rebuild functions, OrderedDict, set, torch.device); "
        "the file is not a plain dVAE checkpoint and may try to run code"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose every global lookup goes through :func:`_resolve_global`."""

    def find_class(self, module: str, name: str) -> Any:
        return _resolve_global(module, name)


def _restricted_load(file: IO[bytes], **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` (subclassed by torch to resolve
# storages) and ``load`` (legacy-format headers).
_restricted_pickle = types.ModuleType("mimkit_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


def _flatten(obj: _InertModule, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """``state_dict()`` of a pickled module tree: parameters, persistent buffers, children."""
    if id(obj) in seen:
        raise ValueError(f"module '{prefix}' appears twice in the pickled module tree")
    seen.add(id(obj))
    state: dict[str, Any] = obj.__dict__.get("state", {})  # set by __setstate__, if pickled
    params = state.get("_parameters", {})
    buffers = state.get("_buffers", {})
    children = state.get("_modules", {})
    skip = state.get("_non_persistent_buffers_set", set())
    if not all(isinstance(d, Mapping) for d in (params, buffers, children)):
        raise ValueError(f"{obj.pickled_name} at '{prefix}' does not look like a torch module")
    for kind, tensors in (("parameter", params), ("buffer", buffers)):
        for name, t in tensors.items():
            if t is None or (kind == "buffer" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{kind} '{prefix}{name}' is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach().contiguous().clone()
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, _InertModule):
            raise ValueError(f"submodule '{prefix}{name}' is a {type(child).__name__}")
        _flatten(child, f"{prefix}{name}.", out, seen)


def read_dalle_pickle(
    src: str | Path, *, trust_pickle: bool
) -> tuple[str, dict[str, torch.Tensor]]:
    """``(kind, state dict)`` from a published dVAE pickle, "encoder" or "decoder".

    Refuses with ``PermissionError`` unless ``trust_pickle=True``; with it, unpickles through the
    allowlist described in the module docstring (``UnsafePickleError`` on anything else).
    """
    src = Path(src)
    if trust_pickle is not True:
        raise PermissionError(
            f"refusing to unpickle {src}: loading a pickle can execute arbitrary code. Pass "
            "trust_pickle=True only for a file from a source you trust (OpenAI's published "
            "encoder.pkl / decoder.pkl); even then only an allowlist of globals is accepted."
        )
    try:
        with warnings.catch_warnings():
            # Legacy-format files name module classes with their source for a staleness check,
            # which cannot (and need not) find source for the stand-ins.
            warnings.filterwarnings("ignore", "Couldn't retrieve source code for container")
            root = torch.load(
                src, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False
            )
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{src}: {e}") from None
    if not isinstance(root, _InertModule) or root.pickled_name not in _ROOTS:
        found = root.pickled_name if isinstance(root, _InertModule) else type(root).__name__
        raise ValueError(
            f"{src} holds a {found}, not a dall_e.encoder.Encoder or dall_e.decoder.Decoder"
        )
    state: dict[str, torch.Tensor] = {}
    _flatten(root, "", state, set())
    return _ROOTS[root.pickled_name], state


def convert_dalle_pickle(src: Path, dst: Path, *, trust_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Convert a published dVAE pickle to a safetensors file; returns ``{key: shape}``.

    ``src`` is OpenAI's ``encoder.pkl`` or ``decoder.pkl`` (``torch.save`` of a ``dall_e``
    module); nothing is read unless ``trust_pickle=True`` (``PermissionError`` otherwise) and the
    unpickling is restricted to an allowlist (``UnsafePickleError`` naming the offending global).
    The keys are those of the original module's ``state_dict()`` and are checked strictly against
    a :class:`~mimkit.models.dalle.DalleEncoder` / ``DalleDecoder`` of the inferred configuration,
    so the output loads with :func:`~mimkit.models.dalle.load_dalle_encoder` /
    :func:`~mimkit.models.dalle.load_dalle_decoder`. The file's metadata records ``format``
    ("pt"), ``kind`` and the configuration (``vocab_size``, ``n_hid``, ``group_count``, ...).
    """
    src, dst = Path(src), Path(dst)
    kind, state = read_dalle_pickle(src, trust_pickle=trust_pickle)
    _, config = infer_dalle_config(state, kind)
    with torch.device("meta"):  # shapes only, no memory
        model = DalleEncoder(**config) if kind == "encoder" else DalleDecoder(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(
            f"{src}: parameters do not match a DALL-E {kind} {config}: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {wrong}"
        )
    metadata = {"format": "pt", "kind": kind, "source": src.name}
    metadata.update({k: str(v) for k, v in config.items()})
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:  # write next to dst, then rename: no half-written file under the final name
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return found


class DalleFormat(Format):
    """OpenAI's DALL-E dVAE pickles: converted to a mimkit tokenizer file, only when trusted."""

    name = "dalle"
    one_way = "a DALL-E dVAE converts to mimkit only (a tokenizer .safetensors)"

    def recognise(self, path: Path) -> bool:
        """A ``.pkl`` file."""
        return path.is_file() and path.suffix == ".pkl"

    def describe(self, path: Path) -> dict[str, Any]:
        """Nothing read: a pickle is not opened to be described."""
        return {
            "note": "a pickle (OpenAI's DALL-E dVAE?): not opened, unpickling can run code; "
            "convert it with `mimkit convert --from dalle --trust-pickle IN OUT.safetensors` if "
            "you trust it"
        }

    def to_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> list[str]:
        """:func:`convert_dalle_pickle`, refused without ``trust_pickle``."""
        if not options.get("trust_pickle"):
            raise PermissionError(
                f"{src} is a pickle, and loading a pickle can run arbitrary code: pass "
                "trust_pickle (--trust-pickle) only for files from a source you trust (OpenAI's "
                "published encoder.pkl/decoder.pkl)"
            )
        convert_dalle_pickle(src, dst, trust_pickle=True)
        return []


FORMAT = DalleFormat()
