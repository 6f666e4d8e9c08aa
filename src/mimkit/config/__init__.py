"""Typed configuration: schemas, loading, validation (see :mod:`mimkit.config.core`)."""

from mimkit.config.core import ConfigError, load_config, save_config, to_dict
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
    "resolve",
    "save_config",
    "to_dict",
    "validate",
]
