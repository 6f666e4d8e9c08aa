"""The DALL-E pickle converter under its old module name: see :mod:`mimkit.interop.dalle`."""

# kept for old imports (``from mimkit.interop.dalle_pickle import convert_dalle_pickle``)
from mimkit.interop.dalle import UnsafePickleError, convert_dalle_pickle, read_dalle_pickle

__all__ = ["UnsafePickleError", "convert_dalle_pickle", "read_dalle_pickle"]
