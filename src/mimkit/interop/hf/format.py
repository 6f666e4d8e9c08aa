"""A Hugging Face ``save_pretrained`` folder as a :class:`~mimkit.interop.format.Format`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mimkit.interop.format import Exported, Format, folder_config, tensor_counts, written_notes
from mimkit.interop.hf.folder import export_to_hf, import_from_hf, load_hf_folder

__all__ = ["FORMAT", "HFFormat"]

# HF config fields `mimkit inspect` shows, under mimkit's names
_SHOWN_CONFIG = {
    "image_size": "img_size", "patch_size": "patch_size", "num_channels": "in_chans",
    "hidden_size": "embed_dim", "num_hidden_layers": "depth",
    "num_attention_heads": "num_heads", "mask_ratio": "mask_ratio",
    "norm_pix_loss": "norm_pix_loss", "vocab_size": "vocab_size",
}  # fmt: skip


class HFFormat(Format):
    """A Hugging Face model folder: ``config.json`` with ``model_type``, safetensors weights."""

    name = "hf"

    def recognise(self, path: Path) -> bool:
        """A folder whose ``config.json`` has a ``model_type`` (and no timm ``architecture``)."""
        config = folder_config(path)
        return config is not None and "model_type" in config and "architecture" not in config

    def describe(self, path: Path) -> dict[str, Any]:
        """Sizes, the HF class and its config's architecture fields, the parts it has."""
        state, config = load_hf_folder(path)
        info: dict[str, Any] = tensor_counts(state)
        arch = (config.get("architectures") or [None])[0]
        info["architecture"], info["model_type"] = arch, config.get("model_type")
        info.update({ours: config[hf] for hf, ours in _SHOWN_CONFIG.items() if hf in config})
        info["has_decoder"] = arch in ("ViTMAEForPreTraining", "BeitForMaskedImageModeling")
        info["has_head"] = bool(arch and arch.endswith("ForImageClassification"))
        if arch and arch.endswith("ForImageClassification"):
            info["num_classes"] = len(config.get("id2label") or {}) or None
        return info

    def to_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> list[str]:
        """:func:`~mimkit.interop.hf.import_from_hf` (``architecture``: the class to read)."""
        import_from_hf(src, dst, architecture=options.get("architecture"))
        return written_notes(dst)

    def from_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> Exported:
        """:func:`~mimkit.interop.hf.export_to_hf` (``architecture``: the class to write)."""
        export_to_hf(src, dst, architecture=options.get("architecture"))
        return [], {}


FORMAT = HFFormat()
