"""The provenance metadata of official MAE / BEiT weights converted to mimkit.

What a converted file records beside its tensors: mimkit's kind and layout, the architecture
(``model_config``), the normalization of the official code, the pretraining target and masking,
a classifier's classes and pooling, and the training ``args`` the file kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mimkit.config import ModelConfig
from mimkit.interop.official.spec import PROBE_BN_EPS, mimkit_layout
from mimkit.interop.spec import ModelSpec, preset_name
from mimkit.weights import Provenance

__all__ = ["official_provenance"]

# the official code's normalization: MAE uses ImageNet's statistics; BEiT (without
# --imagenet_default_mean_and_std, its default) the Inception ones
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_INCEPTION_MEAN, _INCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def official_provenance(
    spec: ModelSpec,
    official_kind: str,
    source_kind: str,
    args: Mapping[str, Any],
    *,
    probe: str,
    notes: list[str],
) -> dict[str, Any]:
    """The metadata of ``source_kind`` weights of architecture ``spec`` converted to mimkit.

    ``official_kind``: what they are after the conversion (a folded linear probe is an
    ``mae-classifier``); ``args``: the official training settings kept (:func:`official_args`).
    Appends to ``notes`` what it had to assume.
    """
    from mimkit import __version__

    kind, layout = mimkit_layout(source_kind, probe)
    beit = spec.method == "beit"
    mc = dataclasses.asdict(ModelConfig())
    mc.update(
        method=spec.method,
        arch=preset_name(spec.embed_dim, spec.depth, spec.num_heads),
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
    )
    if isinstance(args.get("drop_path"), (int, float)):
        mc["drop_path"] = float(args["drop_path"])
    if beit:
        ls = args.get("layer_scale_init_value")
        if spec.layer_scale and not (isinstance(ls, (int, float)) and ls > 0):
            ls = 0.1
            notes.append("layer-scale initial value not in args: 0.1 recorded (init only)")
        mc.update(
            layer_scale=float(ls) if spec.layer_scale else None,
            rel_pos_bias=spec.rel_pos,
            abs_pos_emb=spec.abs_pos,
        )
    if official_kind == "mae-pretrain":
        mc["decoder"] = {
            "embed_dim": spec.dec_dim,
            "depth": spec.dec_depth,
            "num_heads": spec.dec_heads,
        }
    meta: dict[str, Any] = {
        "official_kind": official_kind,
        **{k: mc[k] for k in ("arch", "img_size", "patch_size", "in_chans")},
        **{k: mc[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")},
        "includes_decoder": kind == "pretrain",
    }
    mean = std = None
    if spec.in_chans == 3:
        imagenet = not beit or bool(args.get("imagenet_default_mean_and_std", False))
        mean = _IMAGENET_MEAN if imagenet else _INCEPTION_MEAN
        std = _IMAGENET_STD if imagenet else _INCEPTION_STD
    if kind == "pretrain" and not beit:
        meta["mask_strategy"] = "random"
        meta["mask_ratio"] = float(args.get("mask_ratio", 0.75))
        meta["loss_on"] = "masked"
        if isinstance(args.get("norm_pix_loss"), bool):
            meta["target"] = "norm_pixels" if args["norm_pix_loss"] else "pixels"
    elif kind == "pretrain":
        meta["mask_strategy"] = "blockwise"
        meta["num_masked"] = int(args.get("num_mask_patches", 75))
        meta["loss_on"] = "masked"
        meta["target"] = "visual_tokens"
        meta["vocab_size"] = spec.vocab_size
    elif kind in ("classifier", "linear_probe"):
        meta.update(num_classes=spec.num_classes, pool=spec.pool, pretrain_method=spec.method)
        if kind == "linear_probe":
            meta["probe"] = {"bn_eps": PROBE_BN_EPS, "prefix": "probe."}
        if source_kind == "mae-linprobe" and kind == "classifier":
            meta["folded_from"] = "mae-linprobe"
        mc.pop("decoder")  # a classifier has none (as mimkit's fine-tuning metadata)
    if args:
        meta["args"] = dict(args)
    return Provenance(
        kind=kind, method=spec.method, source=f"official-{spec.method}", layout=layout,
        model_config=mc, mean=mean, std=std, mimkit_version=__version__, extra=meta,
    ).to_metadata()  # fmt: skip
