"""Loading typed configs: YAML recipes + dotted overrides -> validated dataclasses.

A recipe is a YAML mapping whose keys mirror a schema dataclass (:class:`PretrainConfig`,
:class:`TokenizerConfig`). Overrides are dotlist items (``optim.lr=1e-3``) applied after the file.
Loading goes through OmegaConf structured configs, which reject unknown keys and values of the
wrong type; the schema's ``resolve()`` fills derived values and its ``validate()`` checks ranges
and relations. Any problem becomes one :class:`ConfigError` whose message names the file, the key,
the value and what is allowed. The config is not mutated afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

__all__ = [
    "ConfigError",
    "check_choices",
    "choices",
    "fail",
    "load_recipe",
    "native_bf16",
    "positive",
    "renamed",
    "resolve_precision",
    "save_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A user error in a recipe or an override. ``str(err)`` is one line, meant to be printed."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # safe_load: no Python tags, no arbitrary objects
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def _omegaconf_message(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", "") or err).splitlines()[0]
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of (\[.*\])", msg)
    if choice:  # a Literal-typed key
        return f"{source}: {key}={choice[1]!r} is not allowed: one of {choice[2]}"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"{source}: unknown key '{key}'" + (f" (not a key of '{parent}')" if parent else "")
    return f"{source}: bad value for '{key}': {msg}"


def _check_shape(data: Any, schema: type, source: str, prefix: str = "") -> None:
    """Sections must be mappings and list-valued keys lists, before OmegaConf sees the data."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the recipe"
        raise ConfigError(f"{source}: '{where}' must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            continue  # OmegaConf reports unknown keys with their full name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            _check_shape(value, type(default), source, f"{prefix}{key}.")
        elif str(f.type).startswith("list") and value is not None and not isinstance(value, list):
            raise ConfigError(f"{source}: bad value for '{prefix}{key}': {value!r} is not a list")


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...],
    *,
    schema: type,
) -> Any:
    """Load a recipe as ``schema``, apply dotlist ``overrides``, validate and resolve it.

    Returns an instance of ``schema`` with presets and the absolute learning rate filled in.
    Raises :class:`ConfigError` with a one-line message. (:func:`mimkit.config.load_config` is
    the same with pretraining as the default schema.)
    """
    base = OmegaConf.structured(schema)
    source = str(path) if path is not None else "<defaults>"
    try:
        if path is not None:
            data = _read_yaml(Path(path))
            _check_shape(data, schema, source)
            base = OmegaConf.merge(base, OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err, source)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key = item.split("=", 1)[0]
        try:
            patch = OmegaConf.from_dotlist([item])
            _check_shape(OmegaConf.to_container(patch), schema, f"override '{key}'")
            base = OmegaConf.merge(base, patch)
        except OmegaConfBaseException as err:
            raise ConfigError(_omegaconf_message(err, f"override '{key}'")) from None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML") from None
    try:
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err, source)) from None
    if hasattr(cfg, "resolve"):
        cfg.resolve()
    cfg.validate()  # before the precision is resolved: errors first, without PyTorch
    resolve_precision(cfg)
    return cfg


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags as Linux lists them, or None where there is no such file."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 | aarch64
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing PyTorch where no GPU driver is loaded (no
    NVIDIA or ROCm device node): config checks on a CPU machine stay light."""
    if "torch" not in sys.modules and not any(
        Path(p).exists()
        for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
    ):  # NVIDIA, ROCm, WSL2
        return False
    import torch

    return torch.cuda.is_available()


def native_bf16(device: str = "auto") -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why: a CUDA GPU that supports bf16, or a CPU
    with ``avx512_bf16`` or AMX (Linux ``/proc/cpuinfo`` flags). ``device``: a ``run.device``."""
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        index = torch.device(device).index or 0
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return False, f"{name} has no native bf16"
    flags = cpu_flags()
    if flags is None:
        return False, "CPU flags unknown (no /proc/cpuinfo)"
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return True, f"the CPU has {' and '.join(native)}"
    return False, "the CPU has neither avx512_bf16 nor AMX"


def resolve_precision(cfg: Any) -> None:
    """``train.precision=auto``: bf16 autocast where the device computes bf16 natively (see
    :func:`native_bf16`), fp32 elsewhere. The choice is written into the config (and so into the
    run's ``config.yaml``); the environment variable ``MIMKIT_PRECISION_AUTO`` (bf16 | fp32)
    overrides the detection, for tests and for machines whose flags mislead."""
    train, run = getattr(cfg, "train", None), getattr(cfg, "run", None)
    if train is None or getattr(train, "precision", None) != "auto":
        return
    forced = os.environ.get("MIMKIT_PRECISION_AUTO")
    if forced:
        if forced not in ("bf16", "fp32"):
            raise ConfigError(f"MIMKIT_PRECISION_AUTO={forced!r} is not allowed: bf16 or fp32")
        train.precision = forced
        train._precision_why = f"auto, MIMKIT_PRECISION_AUTO={forced}"
        return
    native, why = native_bf16(getattr(run, "device", "auto"))
    train.precision = "bf16" if native else "fp32"
    train._precision_why = f"auto: {why}"  # not a field: printed at the run's start, not saved


def choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` (or optional ``Literal``) annotation, else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        for arg in args:
            if typing.get_origin(arg) is typing.Literal:
                return (*typing.get_args(arg), *((None,) if type(None) in args else ()))
    return None


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Every ``Literal``-typed key of the dataclass tree ``cfg`` holds one of its values (YAML
    and overrides are checked by OmegaConf already; this covers configs built in Python)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
            continue
        allowed = choices(hints[f.name])
        if allowed is not None and value not in allowed:
            fail(f"{prefix}{f.name}", value, f"one of {[a for a in allowed if a is not None]}")


def renamed(old: str, new: str) -> None:
    """Say once on stderr that ``old`` is an older spelling of ``new`` (it keeps working)."""
    if (old, new) not in _SAID:
        _SAID.add((old, new))
        print(f"mimkit: warning: {old} is deprecated, use {new} (same meaning)", file=sys.stderr)


_SAID: set[tuple[str, str]] = set()


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def positive(key: str, value: float | int | None) -> None:
    if value is None or not (value > 0) or (isinstance(value, float) and math.isinf(value)):
        fail(key, value, "must be a positive number")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's ``config.yaml``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
