"""The provenance metadata of Hugging Face weights converted to mimkit.

What an imported folder's file records beside its tensors: the HF class it came from, mimkit's
kind and layout, the architecture (``model_config``), a classifier's classes and pooling, and an
MAE's mask ratio and target. HF folders do not record the training data's normalization, so
there is no ``mean``/``std``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mimkit.interop.hf.layout import ARCHS, HF_DEFAULTS
from mimkit.interop.spec import Tensors
from mimkit.weights import Provenance

__all__ = ["hf_provenance"]

# top-level metadata keys of mimkit checkpoints (see mimkit.tasks.pretrain.provenance)
_ARCH_KEYS = (
    "arch",
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
)


def hf_provenance(
    arch: str, state: Tensors, mc: dict[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """The metadata of an HF ``arch`` model (its ``config``) converted to the mimkit ``state``
    with model config ``mc`` (what :func:`~mimkit.interop.hf.from_hf` returns)."""
    from mimkit import __version__

    a = ARCHS[arch]
    meta: dict[str, Any] = {k: mc[k] for k in _ARCH_KEYS}
    if a.kind == "classifier":
        labels = config.get("id2label") or {}
        kind, layout = "classifier", "timm-classifier"
        meta.update(
            num_classes=int(state["head.weight"].shape[0]),
            pool="avg" if "fc_norm.weight" in state else "cls",
            classes=[labels[k] for k in sorted(labels, key=int)] if labels else None,
        )
    else:
        pretrain = a.kind == "pretrain"
        kind = "pretrain" if pretrain else "encoder"  # as mimkit's own files
        meta["includes_decoder"] = pretrain
        if a.method == "mae":
            layout = "official-mae" if pretrain else "timm-vit"
            c = {**HF_DEFAULTS["vit_mae"], **config}
            if a.model_type == "vit_mae":
                meta["mask_ratio"] = float(c["mask_ratio"])
                meta["target"] = "norm_pixels" if c["norm_pix_loss"] else "pixels"
        else:
            layout = "official-beit" if pretrain else "timm-beit"
            if pretrain:
                meta["vocab_size"] = int(state["lm_head.weight"].shape[0])
    return Provenance(
        kind=kind, method=a.method, source=f"huggingface:{arch}", layout=layout,
        model_config=mc, mimkit_version=__version__, extra=meta,
    ).to_metadata()  # fmt: skip
