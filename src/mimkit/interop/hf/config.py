"""Model configurations for :mod:`mimkit.interop.hf`: mimkit ``ModelConfig`` <-> HF config.

Each direction resolves its configuration into a :class:`~mimkit.interop.spec.ModelSpec` (what
fixes the keys and shapes on both sides, through :func:`~mimkit.interop.hf.layout.key_plan`): a
mimkit ``model_config`` and state -> spec and the HF config dict (:func:`~mimkit.interop.hf.to_hf`),
an HF config and state -> spec and a complete mimkit ``model_config`` dict
(:func:`~mimkit.interop.hf.from_hf`). Configurations mimkit cannot build raise ValueError.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from mimkit.config import VIT_PRESETS, ModelConfig
from mimkit.interop.hf.layout import ARCHS, HF_DEFAULTS, LN_EPS
from mimkit.interop.spec import ModelSpec, preset_name

__all__ = [
    "build_hf_config",
    "config_dict",
    "detect_architecture",
    "mimkit_kind",
    "model_config_dict",
    "spec_from_hf",
    "spec_from_mimkit",
]


# ---- model configs ----


def model_config_dict(model_config: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    """A complete, resolved ``ModelConfig`` dict (defaults for absent keys, presets filled)."""
    if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        given = dataclasses.asdict(model_config)
    elif isinstance(model_config, Mapping):
        given = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in model_config.items()}
    else:
        raise ValueError(
            f"model_config must be a ModelConfig or a mapping, got {type(model_config).__name__}"
        )
    out = dataclasses.asdict(ModelConfig())
    for k, v in given.items():
        if k not in out:
            raise ValueError(f"model_config has unknown key {k!r} (known: {sorted(out)})")
        if k == "decoder":
            dec = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else dict(v or {})
            for dk in dec:
                if dk not in out["decoder"]:
                    raise ValueError(f"model_config has unknown key 'decoder.{dk}'")
            out["decoder"].update(dec)
        else:
            out[k] = v
    if out["method"] not in ("mae", "beit"):
        raise ValueError(f"model_config 'method' must be 'mae' or 'beit', got {out['method']!r}")
    preset = VIT_PRESETS.get(out["arch"])
    for k, i in (("embed_dim", 0), ("depth", 1), ("num_heads", 2)):
        if out[k] is None:
            if preset is None:
                raise ValueError(
                    f"model_config {k!r} is null and arch={out['arch']!r} is no preset"
                )
            out[k] = preset[i]
    if out["img_size"] % out["patch_size"]:
        raise ValueError(
            f"model_config 'img_size'={out['img_size']} is not divisible by "
            f"'patch_size'={out['patch_size']}"
        )
    if out["embed_dim"] % out["num_heads"]:
        raise ValueError(
            f"model_config 'embed_dim'={out['embed_dim']} is not divisible by "
            f"'num_heads'={out['num_heads']}"
        )
    if out["rel_pos_bias"] not in ("shared", "per_layer", "none"):
        raise ValueError(
            f"model_config 'rel_pos_bias' must be shared, per_layer or none, "
            f"got {out['rel_pos_bias']!r}"
        )
    return out


# ---- mimkit -> HF ----


def mimkit_kind(method: str, state: Mapping[str, torch.Tensor]) -> str:
    """What a mimkit ``method`` state holds: ``"pretrain"``, ``"classifier"`` or ``"encoder"``."""
    pretrain_keys = ("lm_head.",) if method == "beit" else ("decoder_", "mask_token")
    pretrain = any(k.startswith(pretrain_keys) for k in state)
    classifier = any(k.startswith("head.") for k in state)
    if pretrain and classifier:
        raise ValueError(
            "state has both a classifier head ('head.*') and pretraining keys "
            f"({pretrain_keys}): give one model"
        )
    return "pretrain" if pretrain else "classifier" if classifier else "encoder"


def _spec(arch: str, mc: dict[str, Any], *, mask_token: bool, fc_norm: bool, out: int) -> ModelSpec:
    """The spec of HF class ``arch`` for the complete model config ``mc``; ``out``: the rows of
    its classifier or MIM head (0: none)."""
    a, dec = ARCHS[arch], mc["decoder"]
    beit = a.method == "beit"
    mae_pretrain = a.kind == "pretrain" and not beit
    return ModelSpec(
        method=a.method,
        img_size=mc["img_size"],
        patch_size=mc["patch_size"],
        in_chans=mc["in_chans"],
        embed_dim=mc["embed_dim"],
        depth=mc["depth"],
        num_heads=mc["num_heads"],
        mlp_ratio=mc["mlp_ratio"],
        layer_scale=beit and bool(mc["layer_scale"]),
        rel_pos=mc["rel_pos_bias"] if beit else "none",
        abs_pos=not beit or bool(mc["abs_pos_emb"]),
        mask_token=mask_token,
        fc_norm=fc_norm,
        num_classes=out if a.kind == "classifier" else 0,
        vocab_size=out if a.kind == "pretrain" else 0,
        dec_dim=dec["embed_dim"] if mae_pretrain else 0,
        dec_depth=dec["depth"] if mae_pretrain else 0,
        dec_heads=dec["num_heads"] if mae_pretrain else 0,
    )


def spec_from_mimkit(mc: dict[str, Any], arch: str, state: Mapping[str, torch.Tensor]) -> ModelSpec:
    """The spec of a mimkit ``state`` (complete model config ``mc``) as HF class ``arch``."""
    a = ARCHS[arch]
    beit = a.method == "beit"
    has_fc_norm = "fc_norm.weight" in state
    if a.kind == "classifier":
        fc_norm = has_fc_norm
    elif a.kind == "encoder":
        fc_norm = has_fc_norm and "norm.weight" not in state
    else:
        fc_norm = False
    if fc_norm and not beit:
        raise ValueError(
            "state has 'fc_norm.weight': a mean-pooled ('avg') ViT has no Hugging Face "
            f"counterpart ({arch} reads the normed cls token); fine-tune with pool='cls' to "
            "export a ViT classifier"
        )
    out_key = {"classifier": "head.weight", "pretrain": "lm_head.weight" if beit else ""}
    key = out_key.get(a.kind, "")
    if key and key not in state:
        raise ValueError(f"state is missing key {key!r} (needed by {arch})")
    out = int(state[key].shape[0]) if key else 0
    return _spec(arch, mc, mask_token=beit and "mask_token" in state, fc_norm=fc_norm, out=out)


def build_hf_config(
    arch: str,
    s: ModelSpec,
    mc: dict[str, Any],
    *,
    mask_ratio: float,
    norm_pix_loss: bool,
    labels: Sequence[str] | None,
) -> dict[str, Any]:
    """The HF config dict of class ``arch`` for spec ``s`` (mimkit's ``model_config`` ``mc`` is
    kept in it under ``"mimkit"``)."""
    from mimkit import __version__

    a = ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": a.model_type,
        "image_size": s.img_size,
        "patch_size": s.patch_size,
        "num_channels": s.in_chans,
        "hidden_size": s.embed_dim,
        "num_hidden_layers": s.depth,
        "num_attention_heads": s.num_heads,
        "intermediate_size": s.hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": LN_EPS,
    }
    if a.method == "mae":
        cfg["qkv_bias"] = True
    if a.model_type == "vit_mae":
        dec = mc["decoder"]
        cfg.update(
            decoder_hidden_size=dec["embed_dim"],
            decoder_num_hidden_layers=dec["depth"],
            decoder_num_attention_heads=dec["num_heads"],
            decoder_intermediate_size=int(dec["embed_dim"] * mc["mlp_ratio"]),
            mask_ratio=float(mask_ratio),
            norm_pix_loss=bool(norm_pix_loss),
        )
    if a.method == "beit":
        cfg.update(
            use_mask_token=s.mask_token,
            use_absolute_position_embeddings=s.abs_pos,
            use_relative_position_bias=s.rel_pos == "per_layer",
            use_shared_relative_position_bias=s.rel_pos == "shared",
            layer_scale_init_value=float(mc["layer_scale"]) if s.layer_scale else 0.0,
            drop_path_rate=float(mc["drop_path"]),
            # MIM: beit.layernorm must be an identity (mimkit's norm is the top-level layernorm)
            use_mean_pooling=s.fc_norm or a.kind == "pretrain",
        )
        if a.kind == "pretrain":
            cfg["vocab_size"] = s.vocab_size
    if a.kind == "classifier":
        if labels is not None and len(labels) != s.num_classes:
            raise ValueError(
                f"labels has {len(labels)} names but the head has {s.num_classes} classes"
            )
        names = [str(x) for x in labels] if labels is not None else None
        names = names or [f"LABEL_{i}" for i in range(s.num_classes)]
        cfg["id2label"] = {str(i): name for i, name in enumerate(names)}
        cfg["label2id"] = {name: i for i, name in enumerate(names)}
    # what HF configs cannot say (preset name, ViT drop path, ...) for a lossless way back
    cfg["mimkit"] = {"model_config": mc, "mimkit_version": __version__}
    return cfg


# ---- HF -> mimkit ----


def config_dict(hf_config: Any) -> dict[str, Any]:
    """An HF config (a dict, or a transformers config object) as a plain dict."""
    if hasattr(hf_config, "to_dict") and not isinstance(hf_config, Mapping):
        hf_config = hf_config.to_dict()  # a transformers PretrainedConfig
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"hf_config must be a mapping, got {type(hf_config).__name__}")
    return dict(hf_config)


def detect_architecture(cfg: Mapping[str, Any], keys: Iterable[str]) -> str:
    """The HF class of a model: its config's ``architectures``, else guessed from ``model_type``
    and the state's keys."""
    archs = cfg.get("architectures") or []
    if len(archs) > 1:
        raise ValueError(f"hf_config 'architectures' names several classes {archs}; pass one")
    if archs:
        return archs[0]
    mt, keys = cfg.get("model_type"), list(keys)
    heads = {
        "vit": [("classifier.", "ViTForImageClassification")],
        "vit_mae": [("decoder.", "ViTMAEForPreTraining")],
        "beit": [
            ("lm_head.", "BeitForMaskedImageModeling"),
            ("classifier.", "BeitForImageClassification"),
        ],
    }
    if mt not in heads:
        raise ValueError(
            f"hf_config 'model_type' is {mt!r}; supported: {sorted(heads)} (or pass architecture=)"
        )
    for prefix, name in heads[mt]:
        if any(k.startswith(prefix) for k in keys):
            return name
    return {"vit": "ViTModel", "vit_mae": "ViTMAEModel", "beit": "BeitModel"}[mt]


def _square(cfg: Mapping[str, Any], key: str) -> int:
    v = cfg[key]
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(
                f"hf_config {key!r}={list(v)} is not square; mimkit models take square "
                "images and patches"
            )
        v = v[0]
    return int(v)


def spec_from_hf(
    cfg: Mapping[str, Any], arch: str, hf: Mapping[str, torch.Tensor]
) -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, complete mimkit ``model_config`` dict) of an HF model of class ``arch``."""
    a = ARCHS[arch]
    mt = cfg.get("model_type", a.model_type)
    if mt != a.model_type:
        raise ValueError(
            f"hf_config 'model_type'={mt!r} does not match architecture {arch!r} "
            f"(model_type {a.model_type!r})"
        )
    c = {**HF_DEFAULTS[mt], **cfg}
    beit = a.method == "beit"
    if c["hidden_act"] != "gelu":
        raise ValueError(
            f"hf_config 'hidden_act'={c['hidden_act']!r} is not supported: mimkit's MLPs use "
            "exact GELU ('gelu')"
        )
    if not beit and not c["qkv_bias"]:
        raise ValueError("hf_config 'qkv_bias'=False is not supported: mimkit ViTs have qkv biases")
    if float(c["layer_norm_eps"]) != LN_EPS:
        warnings.warn(
            f"hf_config 'layer_norm_eps'={c['layer_norm_eps']} differs from mimkit's {LN_EPS}: "
            "the weights convert exactly, outputs differ by about eps / variance (relative)",
            UserWarning,
            stacklevel=3,
        )
    img, patch = _square(c, "image_size"), _square(c, "patch_size")
    if img % patch:
        raise ValueError(f"hf_config 'image_size'={img} is not divisible by 'patch_size'={patch}")
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    hidden = int(c["intermediate_size"])
    if d % heads:
        raise ValueError(
            f"hf_config 'hidden_size'={d} is not divisible by 'num_attention_heads'={heads}"
        )
    mlp_ratio = hidden / d
    if int(d * mlp_ratio) != hidden:
        raise ValueError(f"hf_config 'intermediate_size'={hidden} is not representable in mimkit")

    mc = dataclasses.asdict(ModelConfig())
    stash = cfg.get("mimkit")
    saved = stash.get("model_config") if isinstance(stash, Mapping) else None
    if isinstance(saved, Mapping):  # written by to_hf: keep what HF configs cannot say
        for k in ("arch", "drop_path", "decoder", "layer_scale", "rel_pos_bias", "abs_pos_emb"):
            if k in saved:
                mc[k] = dict(saved[k]) if k == "decoder" else saved[k]
    mc.update(
        method=a.method,
        img_size=img,
        patch_size=patch,
        in_chans=int(c["num_channels"]),
        embed_dim=d,
        depth=int(c["num_hidden_layers"]),
        num_heads=heads,
        mlp_ratio=mlp_ratio,
    )
    hint = saved.get("arch") if isinstance(saved, Mapping) else None  # not ModelConfig's default
    mc["arch"] = preset_name(d, mc["depth"], heads, hint)

    mask_token = fc_norm = False
    if beit:
        if c["use_relative_position_bias"] and c["use_shared_relative_position_bias"]:
            raise ValueError(
                "hf_config sets both 'use_relative_position_bias' and "
                "'use_shared_relative_position_bias'; mimkit has one or the other"
            )
        rel_pos = (
            "shared"
            if c["use_shared_relative_position_bias"]
            else "per_layer"
            if c["use_relative_position_bias"]
            else "none"
        )
        abs_pos = bool(c["use_absolute_position_embeddings"])
        mask_token = bool(c["use_mask_token"])
        lsiv = float(c["layer_scale_init_value"])
        mean_pool = bool(c["use_mean_pooling"])
        if arch == "BeitForMaskedImageModeling" and not mean_pool:
            raise ValueError(
                "hf_config 'use_mean_pooling'=False in BeitForMaskedImageModeling stacks two "
                "final LayerNorms (beit.layernorm, layernorm); mimkit's BEiT has one"
            )
        fc_norm = mean_pool and arch != "BeitForMaskedImageModeling"
        mc.update(
            layer_scale=lsiv if lsiv > 0 else None,
            rel_pos_bias=rel_pos,
            abs_pos_emb=abs_pos,
            drop_path=float(c["drop_path_rate"]),
        )
    if a.model_type == "vit_mae":
        dec_dim, dec_depth = int(c["decoder_hidden_size"]), int(c["decoder_num_hidden_layers"])
        dec_hidden = int(c["decoder_intermediate_size"])
        if int(dec_dim * mlp_ratio) != dec_hidden:
            raise ValueError(
                f"hf_config 'decoder_intermediate_size'={dec_hidden} is not "
                f"decoder_hidden_size * {mlp_ratio:g}: mimkit's decoder uses the encoder's MLP "
                "ratio"
            )
        mc["decoder"] = {
            "embed_dim": dec_dim,
            "depth": dec_depth,
            "num_heads": int(c["decoder_num_attention_heads"]),
        }
    out_key = {"classifier": "classifier.weight", "pretrain": "lm_head.weight" if beit else ""}
    key = out_key.get(a.kind, "")
    if key and key not in hf:
        raise ValueError(f"hf_state is missing key {key!r} (needed by {arch})")
    out_dim = int(hf[key].shape[0]) if key else 0
    if a.kind == "classifier" and "id2label" in cfg and len(cfg["id2label"]) != out_dim:
        raise ValueError(
            f"hf_config 'id2label' names {len(cfg['id2label'])} classes but "
            f"'classifier.weight' has {out_dim} rows"
        )
    return _spec(arch, mc, mask_token=mask_token, fc_norm=fc_norm, out=out_dim), mc
