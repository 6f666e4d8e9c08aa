"""Typed configuration: schemas, loading, validation (see :mod:`mimkit.config.core`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimkit.config.core import (
    ConfigError,
    load_recipe,
    native_bf16,
    resolve_precision,
    save_config,
    to_dict,
)
from mimkit.config.pretrain import (
    VIT_PRESETS,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    KnnConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    TargetConfig,
    TokenizerRef,
    TrainConfig,
    resolve,
    validate,
)
from mimkit.config.tokenizer import DVAEConfig, DVAELossConfig, TokenizerConfig


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    schema: type = PretrainConfig,
) -> Any:
    """Load a recipe, apply dotlist ``overrides``, validate and resolve it.

    Returns an instance of ``schema`` (by default :class:`PretrainConfig`) with presets and the
    absolute learning rate filled in. Raises :class:`ConfigError` with a one-line message.
    """
    return load_recipe(path, overrides, schema=schema)


__all__ = [
    "VIT_PRESETS",
    "ConfigError",
    "DVAEConfig",
    "DVAELossConfig",
    "DataConfig",
    "DecoderConfig",
    "EvalConfig",
    "KnnConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "TargetConfig",
    "TokenizerConfig",
    "TokenizerRef",
    "TrainConfig",
    "load_config",
    "load_recipe",
    "native_bf16",
    "resolve",
    "resolve_precision",
    "save_config",
    "to_dict",
    "validate",
]
