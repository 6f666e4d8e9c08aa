"""mimkit: masked image modeling (MAE, BEiT) for Vision Transformers.

The names below load on first use (PEP 562), so that ``mimkit --help`` and config errors answer
before PyTorch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "mimkit.config",
    "PretrainConfig": "mimkit.config",
    "load_config": "mimkit.config",
    "Mask": "mimkit.masking",
    "random_masking": "mimkit.masking",
    "MAE": "mimkit.models",
    "VisionTransformer": "mimkit.models",
    "build_encoder": "mimkit.models",
    "build_mae": "mimkit.models",
    "mae_loss": "mimkit.models",
}

__all__ = [
    "MAE",
    "ConfigError",
    "Mask",
    "PretrainConfig",
    "VisionTransformer",
    "__version__",
    "build_encoder",
    "build_mae",
    "load_config",
    "mae_loss",
    "random_masking",
]

if TYPE_CHECKING:
    from mimkit.config import ConfigError, PretrainConfig, load_config
    from mimkit.masking import Mask, random_masking
    from mimkit.models import MAE, VisionTransformer, build_encoder, build_mae, mae_loss


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
