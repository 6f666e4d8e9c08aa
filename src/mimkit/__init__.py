"""mimkit: masked image modeling (MAE, BEiT) for Vision Transformers."""

from mimkit.config import ConfigError, PretrainConfig, load_config
from mimkit.masking import Mask, random_masking
from mimkit.models import MAE, VisionTransformer, build_encoder, build_mae, mae_loss

__version__ = "0.1.0"

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
