"""The timm converters under their old module name: see :mod:`mimkit.interop.timm`."""

# kept for old imports (``from mimkit.interop.timm_io import export_timm``, as the README shows)
from mimkit.interop.timm import export_timm, import_timm, read_timm, timm_model_spec, to_timm_model

__all__ = ["export_timm", "import_timm", "read_timm", "timm_model_spec", "to_timm_model"]
