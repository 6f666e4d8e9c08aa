"""Convert mimkit checkpoints to and from Hugging Face ``transformers`` (ViT, ViTMAE, BEiT).

Pure tensor and key manipulation: nothing here imports ``transformers``, downloads anything or
unpickles anything. Supported pairs (mimkit state dict layout <-> HF class):

======================================  ==========================================================
mimkit                                  Hugging Face
======================================  ==========================================================
MAE encoder (timm ViT layout)           ``ViTModel`` (default) or ``ViTMAEModel``
full MAE (official layout)              ``ViTMAEForPreTraining``
ViT classifier, ``pool="cls"``          ``ViTForImageClassification``
BEiT encoder (timm Beit layout)         ``BeitModel``
full BEiT (official layout, lm_head)    ``BeitForMaskedImageModeling``
BEiT classifier, ``pool="avg"``/"cls"   ``BeitForImageClassification``
======================================  ==========================================================

A ViT classifier with ``pool="avg"`` has no HF counterpart (``ViTForImageClassification`` reads
the normed cls token) and is refused with a ValueError.

Key mapping (per block ``i``; ``P`` is the HF base-model prefix: ``""``, ``"vit."`` or
``"beit."``). mimkit and timm fuse q, k and v into one ``attn.qkv`` linear; HF keeps three:

- ``blocks.i.attn.qkv.weight`` (3D, D) <-> ``P layers.i.attention.{q,k,v}_proj.weight`` (rows
  split in q, k, v order); ViT's ``attn.qkv.bias`` likewise. BEiT has no key bias (a key bias
  adds the same ``q . b_k`` to every logit of a query row, so softmax ignores it): ``attn.q_bias``
  / ``attn.v_bias`` <-> ``q_proj.bias`` / ``v_proj.bias`` and HF's ``k_proj`` has no bias.
- ``attn.proj`` <-> ``attention.o_proj``, ``norm1``/``norm2`` <-> ``layernorm_before``/``_after``,
  ``mlp.fc1``/``fc2`` <-> ``mlp.fc1``/``fc2``, BEiT ``gamma_1``/``gamma_2`` <-> ``lambda_1``/
  ``lambda_2``, per-layer ``attn.relative_position_bias_table`` <->
  ``layers.i.relative_position_bias.relative_position_bias_table``.
- ``cls_token``, ``pos_embed`` (cls position included, both sides), ``patch_embed.proj``,
  BEiT ``mask_token`` <-> ``P embeddings.{cls_token, position_embeddings, patch_embeddings.
  projection, mask_token}``; ``rel_pos_bias.*`` <-> ``P shared_position_bias.*``.
- ``norm`` <-> ``P layernorm`` (for ``BeitForMaskedImageModeling``: the top-level ``layernorm``,
  with ``use_mean_pooling=True`` so that ``beit.layernorm`` is an identity); BEiT ``fc_norm`` <->
  ``P pooler.layernorm`` (``use_mean_pooling=True``); ``head`` <-> ``classifier``; ``lm_head``
  <-> ``lm_head``.
- MAE decoder: ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_norm``,
  ``decoder_pred`` <-> ``decoder.<same name>``; ``decoder_blocks.i`` <-> ``decoder.
  decoder_layers.i`` (mapped as encoder blocks). The fixed sin-cos embeddings are stored on both
  sides, in the same channel layout (columns first), so they are copied, not recomputed.

Two HF key layouts exist. ``"hub"``: the names in HF checkpoint files (``encoder.layer.i.
attention.attention.query`` ...), which transformers 4.x uses in memory and 5.x still writes with
``save_pretrained`` and reads back; ``"v5"``: the in-memory names of transformers 5.x
(``layers.i.attention.q_proj`` ...), for ``model.load_state_dict``. :func:`to_hf` writes either;
:func:`from_hf` reads both (and the ``decoder.decoder_encoder.layer.i`` names that transformers 5
``save_pretrained`` writes for ViTMAE's decoder).

mimkit LayerNorms use eps 1e-6; exported configs say ``layer_norm_eps=1e-6`` (HF's default is
1e-12). Importing a config with another eps warns (mimkit keeps 1e-6; outputs differ by about
eps / variance, relatively). HF ``ViTModel``'s pooler (dense + tanh on the cls token) has no
mimkit counterpart: it is dropped on import (with a warning) and absent on export, so load an
exported ``ViTModel`` with ``from_pretrained(folder, add_pooling_layer=False)``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mimkit.config import VIT_PRESETS, ModelConfig
from mimkit.engine.checkpoint import load_weights, save_weights

__all__ = [
    "HF_ARCHITECTURES",
    "export_to_hf",
    "from_hf",
    "import_from_hf",
    "load_hf_folder",
    "save_hf_folder",
    "to_hf",
]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Arch:
    method: str  # mimkit's model family: "mae" (VisionTransformer) or "beit"
    kind: str  # "encoder" | "pretrain" | "classifier"
    model_type: str  # HF config model_type
    prefix: str  # HF base-model prefix of the encoder keys


_ARCHS: dict[str, _Arch] = {
    "ViTModel": _Arch("mae", "encoder", "vit", ""),
    "ViTMAEModel": _Arch("mae", "encoder", "vit_mae", ""),
    "ViTMAEForPreTraining": _Arch("mae", "pretrain", "vit_mae", "vit."),
    "ViTForImageClassification": _Arch("mae", "classifier", "vit", "vit."),
    "BeitModel": _Arch("beit", "encoder", "beit", ""),
    "BeitForMaskedImageModeling": _Arch("beit", "pretrain", "beit", "beit."),
    "BeitForImageClassification": _Arch("beit", "classifier", "beit", "beit."),
}

HF_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHS)
"""The HF classes this module converts to and from."""

# HF config defaults of the fields read here (pinned against the installed transformers by a
# test): Hub config.json files, written with use_diff=True, leave out values equal to these
_VIT_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {**_VIT_DEFAULTS, "qkv_bias": True},
    "vit_mae": {
        **_VIT_DEFAULTS,
        "qkv_bias": True,
        "decoder_hidden_size": 512,
        "decoder_num_hidden_layers": 8,
        "decoder_num_attention_heads": 16,
        "decoder_intermediate_size": 2048,
        "mask_ratio": 0.75,
        "norm_pix_loss": False,
    },
    "beit": {
        **_VIT_DEFAULTS,
        "vocab_size": 8192,
        "use_mask_token": False,
        "use_absolute_position_embeddings": False,
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": False,
        "layer_scale_init_value": 0.1,
        "drop_path_rate": 0.1,
        "use_mean_pooling": True,
    },
}

_LN_EPS = 1e-6  # mimkit's (and timm's, and the official MAE / BEiT code's) LayerNorm eps

# ---- the two HF key layouts ----

_V5_TO_HUB = [
    (r"^((?:vit\.|beit\.)?)layers\.(\d+)\.relative_position_bias\.",
     r"\1encoder.layer.\2.attention.attention.relative_position_bias."),
    (r"^((?:vit\.|beit\.)?)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"^((?:beit\.)?)shared_position_bias\.", r"\1encoder.relative_position_bias."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]  # fmt: skip
_HUB_TO_V5 = [
    # what transformers 5.x save_pretrained writes for ViTMAE's decoder blocks
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
    (r"^((?:vit\.|beit\.)?)encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"^((?:beit\.)?)encoder\.relative_position_bias\.", r"\1shared_position_bias."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]
_V5_TO_HUB_RE = [(re.compile(p), r) for p, r in _V5_TO_HUB]
_HUB_TO_V5_RE = [(re.compile(p), r) for p, r in _HUB_TO_V5]
_LAYOUTS = ("hub", "v5")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


# ---- the mapping plan: one list of (mimkit key, HF key(s), mimkit shape) per architecture ----


@dataclass(frozen=True)
class _Spec:
    """What fixes the key set and shapes on both sides."""

    arch: str
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    hidden: int  # MLP hidden width
    layer_scale: bool = False  # BEiT gamma_* / lambda_*
    rel_pos: str = "none"  # BEiT: shared | per_layer | none
    abs_pos: bool = True  # ViT always; BEiT when abs_pos_emb
    mask_token: bool = False  # BEiT encoder mask embedding
    final: str = "norm"  # "norm" (norm on all tokens) | "fc_norm" (norm after mean pooling)
    out_dim: int = 0  # classes (head) or vocabulary (lm_head)
    dec_dim: int = 0  # MAE decoder width, depth and MLP hidden width
    dec_depth: int = 0
    dec_hidden: int = 0


@dataclass(frozen=True)
class _Entry:
    mimkit: str
    hf: tuple[str, ...]  # one key, or three (q, k, v) that concatenate along dim 0
    shape: tuple[int, ...]  # of the mimkit tensor

    def hf_shape(self) -> tuple[int, ...]:
        n = len(self.hf)
        return self.shape if n == 1 else (self.shape[0] // n, *self.shape[1:])


def _plan(s: _Spec) -> list[_Entry]:
    a = _ARCHS[s.arch]
    beit, p, d = a.method == "beit", a.prefix, s.embed_dim
    grid = s.img_size // s.patch_size
    n = grid * grid
    table = ((2 * grid - 1) ** 2 + 3, s.num_heads)  # BEiT: relative offsets + 3 cls entries
    out: list[_Entry] = []

    def add(m: str, h: str | tuple[str, ...], shape: tuple[int, ...]) -> None:
        out.append(_Entry(m, (h,) if isinstance(h, str) else h, shape))

    def linear(m: str, h: str, rows: int, cols: int) -> None:
        add(f"{m}.weight", f"{h}.weight", (rows, cols))
        add(f"{m}.bias", f"{h}.bias", (rows,))

    def norm(m: str, h: str, dim: int) -> None:
        add(f"{m}.weight", f"{h}.weight", (dim,))
        add(f"{m}.bias", f"{h}.bias", (dim,))

    def block(m: str, h: str, dim: int, hidden: int, *, beit_block: bool) -> None:
        norm(f"{m}norm1", f"{h}layernorm_before", dim)
        qkv = tuple(f"{h}attention.{x}_proj" for x in "qkv")
        add(f"{m}attn.qkv.weight", tuple(f"{x}.weight" for x in qkv), (3 * dim, dim))
        if beit_block:  # no key bias
            add(f"{m}attn.q_bias", f"{qkv[0]}.bias", (dim,))
            add(f"{m}attn.v_bias", f"{qkv[2]}.bias", (dim,))
        else:
            add(f"{m}attn.qkv.bias", tuple(f"{x}.bias" for x in qkv), (3 * dim,))
        if beit_block and s.rel_pos == "per_layer":
            add(
                f"{m}attn.relative_position_bias_table",
                f"{h}relative_position_bias.relative_position_bias_table",
                table,
            )
        linear(f"{m}attn.proj", f"{h}attention.o_proj", dim, dim)
        norm(f"{m}norm2", f"{h}layernorm_after", dim)
        linear(f"{m}mlp.fc1", f"{h}mlp.fc1", hidden, dim)
        linear(f"{m}mlp.fc2", f"{h}mlp.fc2", dim, hidden)
        if beit_block and s.layer_scale:
            add(f"{m}gamma_1", f"{h}lambda_1", (dim,))
            add(f"{m}gamma_2", f"{h}lambda_2", (dim,))

    e = f"{p}embeddings."
    add("cls_token", f"{e}cls_token", (1, 1, d))
    if beit and s.mask_token:
        add("mask_token", f"{e}mask_token", (1, 1, d))
    if s.abs_pos:
        add("pos_embed", f"{e}position_embeddings", (1, n + 1, d))
    add(
        "patch_embed.proj.weight",
        f"{e}patch_embeddings.projection.weight",
        (d, s.in_chans, s.patch_size, s.patch_size),
    )
    add("patch_embed.proj.bias", f"{e}patch_embeddings.projection.bias", (d,))
    if beit and s.rel_pos == "shared":
        add(
            "rel_pos_bias.relative_position_bias_table",
            f"{p}shared_position_bias.relative_position_bias_table",
            table,
        )
    for i in range(s.depth):
        block(f"blocks.{i}.", f"{p}layers.{i}.", d, s.hidden, beit_block=beit)
    if s.final == "norm":
        norm("norm", "layernorm" if s.arch == "BeitForMaskedImageModeling" else f"{p}layernorm", d)
    else:
        norm("fc_norm", f"{p}pooler.layernorm", d)
    if a.kind == "classifier":
        linear("head", "classifier", s.out_dim, d)
    elif a.kind == "pretrain" and beit:
        linear("lm_head", "lm_head", s.out_dim, d)
    elif a.kind == "pretrain":
        ed = s.dec_dim
        linear("decoder_embed", "decoder.decoder_embed", ed, d)
        add("mask_token", "decoder.mask_token", (1, 1, ed))
        add("decoder_pos_embed", "decoder.decoder_pos_embed", (1, n + 1, ed))
        for i in range(s.dec_depth):
            block(
                f"decoder_blocks.{i}.",
                f"decoder.decoder_layers.{i}.",
                ed,
                s.dec_hidden,
                beit_block=False,
            )
        norm("decoder_norm", "decoder.decoder_norm", ed)
        linear("decoder_pred", "decoder.decoder_pred", s.patch_size**2 * s.in_chans, ed)
    return out


def _check_keys(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    hint: str,
    show=lambda k: k,
) -> None:
    """Missing, unexpected and mis-shaped keys, each a ValueError naming the first offender."""
    missing = [k for k in expected if k not in got]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{what} is missing key {show(missing[0])!r}{more}; {hint}")
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{what} has unexpected key {show(unexpected[0])!r}{more}; {hint}")
    for k, shape in expected.items():
        if tuple(got[k].shape) != shape:
            raise ValueError(
                f"{what} key {show(k)!r} has shape {tuple(got[k].shape)}, expected {shape}; {hint}"
            )


# ---- model configs ----


def _model_config_dict(model_config: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
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


def _preset_name(embed_dim: int, depth: int, num_heads: int, hint: Any) -> str:
    dims = (embed_dim, depth, num_heads)
    if hint in VIT_PRESETS and VIT_PRESETS[hint] == dims:
        return hint
    return next((name for name, v in VIT_PRESETS.items() if v == dims), "custom")


# ---- mimkit -> HF ----


def flat_state(state: Mapping[str, torch.Tensor]) -> Tensors:
    """``encoder.``-prefixed module state dicts (MAE, BEiT, Classifier) -> the flat layout."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    out: Tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state key {k!r} is not a tensor ({type(v).__name__})")
        out[k.removeprefix("encoder.")] = v
    return out


def _mimkit_kind(method: str, state: Mapping[str, torch.Tensor]) -> str:
    pretrain_keys = ("lm_head.",) if method == "beit" else ("decoder_", "mask_token")
    pretrain = any(k.startswith(pretrain_keys) for k in state)
    classifier = any(k.startswith("head.") for k in state)
    if pretrain and classifier:
        raise ValueError(
            "state has both a classifier head ('head.*') and pretraining keys "
            f"({pretrain_keys}): give one model"
        )
    return "pretrain" if pretrain else "classifier" if classifier else "encoder"


def _spec_from_mimkit(mc: dict[str, Any], arch: str, state: Mapping[str, torch.Tensor]) -> _Spec:
    a, d = _ARCHS[arch], mc["embed_dim"]
    beit = a.method == "beit"
    hidden = int(d * mc["mlp_ratio"])
    has_fc_norm = "fc_norm.weight" in state
    if a.kind == "classifier":
        final = "fc_norm" if has_fc_norm else "norm"
    elif a.kind == "encoder":
        final = "fc_norm" if has_fc_norm and "norm.weight" not in state else "norm"
    else:
        final = "norm"
    if final == "fc_norm" and not beit:
        raise ValueError(
            "state has 'fc_norm.weight': a mean-pooled ('avg') ViT has no Hugging Face "
            f"counterpart ({arch} reads the normed cls token); fine-tune with pool='cls' to "
            "export a ViT classifier"
        )
    out_key = {"classifier": "head.weight", "pretrain": "lm_head.weight" if beit else ""}
    key = out_key.get(a.kind, "")
    if key and key not in state:
        raise ValueError(f"state is missing key {key!r} (needed by {arch})")
    dec = mc["decoder"]
    mae_pretrain = a.kind == "pretrain" and not beit
    return _Spec(
        arch=arch,
        img_size=mc["img_size"],
        patch_size=mc["patch_size"],
        in_chans=mc["in_chans"],
        embed_dim=d,
        depth=mc["depth"],
        num_heads=mc["num_heads"],
        hidden=hidden,
        layer_scale=beit and bool(mc["layer_scale"]),
        rel_pos=mc["rel_pos_bias"] if beit else "none",
        abs_pos=not beit or bool(mc["abs_pos_emb"]),
        mask_token=beit and "mask_token" in state,
        final=final,
        out_dim=int(state[key].shape[0]) if key else 0,
        dec_dim=dec["embed_dim"] if mae_pretrain else 0,
        dec_depth=dec["depth"] if mae_pretrain else 0,
        dec_hidden=int(dec["embed_dim"] * mc["mlp_ratio"]) if mae_pretrain else 0,
    )


def _hf_config(
    s: _Spec,
    mc: dict[str, Any],
    *,
    mask_ratio: float,
    norm_pix_loss: bool,
    labels: Sequence[str] | None,
) -> dict[str, Any]:
    from mimkit import __version__

    a = _ARCHS[s.arch]
    cfg: dict[str, Any] = {
        "architectures": [s.arch],
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
        "layer_norm_eps": _LN_EPS,
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
            use_mean_pooling=s.final == "fc_norm" or a.kind == "pretrain",
        )
        if a.kind == "pretrain":
            cfg["vocab_size"] = s.out_dim
    if a.kind == "classifier":
        if labels is not None and len(labels) != s.out_dim:
            raise ValueError(f"labels has {len(labels)} names but the head has {s.out_dim} classes")
        names = [str(x) for x in labels] if labels is not None else None
        names = names or [f"LABEL_{i}" for i in range(s.out_dim)]
        cfg["id2label"] = {str(i): name for i, name in enumerate(names)}
        cfg["label2id"] = {name: i for i, name in enumerate(names)}
    # what HF configs cannot say (preset name, ViT drop path, ...) for a lossless way back
    cfg["mimkit"] = {"model_config": mc, "mimkit_version": __version__}
    return cfg


def to_hf(
    state: Mapping[str, torch.Tensor],
    *,
    model_config: Mapping[str, Any] | ModelConfig,
    architecture: str | None = None,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    labels: Sequence[str] | None = None,
    layout: str = "hub",
) -> tuple[Tensors, dict[str, Any]]:
    """A mimkit state dict -> (HF state dict, HF config dict).

    ``state``: a mimkit encoder (timm layout), full pretraining model (official MAE / BEiT
    layout) or classifier (timm layout with ``head``/``fc_norm``); ``encoder.``-prefixed module
    state dicts are accepted too. ``model_config``: the architecture (the ``model_config`` of
    mimkit checkpoint metadata, or a :class:`~mimkit.config.ModelConfig`). ``architecture``: an
    HF class name from :data:`HF_ARCHITECTURES`; by default the one for the state's method and
    kind (``ViTModel``, ``ViTMAEForPreTraining``, ``ViTForImageClassification``, ``BeitModel``,
    ``BeitForMaskedImageModeling``, ``BeitForImageClassification``). ``mask_ratio`` and
    ``norm_pix_loss`` go into ViTMAE configs; ``labels`` names the classes of a classifier.
    ``layout``: ``"hub"`` (checkpoint-file names) or ``"v5"`` (transformers 5 module names).

    The config dict is what ``<ConfigClass>.from_dict`` or ``config.json`` takes; it carries
    the mimkit ``model_config`` under ``"mimkit"``. Tensors are copies, dtypes kept. Raises
    ValueError naming the key for a missing, unexpected or mis-shaped tensor, and for models
    without an HF counterpart (a mean-pooled ViT classifier).
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    flat = flat_state(state)
    mc = _model_config_dict(model_config)
    kind = _mimkit_kind(mc["method"], flat)
    allowed = [n for n, a in _ARCHS.items() if (a.method, a.kind) == (mc["method"], kind)]
    arch = architecture or allowed[0]  # the default: the first of _ARCHS that fits
    if arch not in _ARCHS:
        raise ValueError(
            f"architecture {arch!r} is not supported; choose one of {HF_ARCHITECTURES}"
        )
    if arch not in allowed:
        raise ValueError(
            f"architecture {arch!r} cannot hold a mimkit {mc['method']} {kind} state; "
            f"choose one of {allowed}"
        )
    spec = _spec_from_mimkit(mc, arch, flat)
    plan = _plan(spec)
    _check_keys(
        flat,
        {e.mimkit: e.shape for e in plan},
        what="state",
        hint=f"does model_config match the weights? (converting to {arch})",
    )
    hf: Tensors = {}
    for e in plan:
        t = flat[e.mimkit].detach()
        parts = (t,) if len(e.hf) == 1 else t.chunk(len(e.hf), dim=0)
        for name, part in zip(e.hf, parts, strict=True):
            key = _rename(name, _V5_TO_HUB_RE) if layout == "hub" else name
            hf[key] = part.clone().contiguous()
    config = _hf_config(spec, mc, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, labels=labels)
    return hf, config


# ---- HF -> mimkit ----


def _config_dict(hf_config: Any) -> dict[str, Any]:
    if hasattr(hf_config, "to_dict") and not isinstance(hf_config, Mapping):
        hf_config = hf_config.to_dict()  # a transformers PretrainedConfig
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"hf_config must be a mapping, got {type(hf_config).__name__}")
    return dict(hf_config)


def _detect_architecture(cfg: Mapping[str, Any], keys: Iterable[str]) -> str:
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


def _spec_from_hf(
    cfg: Mapping[str, Any], arch: str, hf: Mapping[str, torch.Tensor]
) -> tuple[_Spec, dict[str, Any]]:
    a = _ARCHS[arch]
    mt = cfg.get("model_type", a.model_type)
    if mt != a.model_type:
        raise ValueError(
            f"hf_config 'model_type'={mt!r} does not match architecture {arch!r} "
            f"(model_type {a.model_type!r})"
        )
    c = {**_HF_DEFAULTS[mt], **cfg}
    beit = a.method == "beit"
    if c["hidden_act"] != "gelu":
        raise ValueError(
            f"hf_config 'hidden_act'={c['hidden_act']!r} is not supported: mimkit's MLPs use "
            "exact GELU ('gelu')"
        )
    if not beit and not c["qkv_bias"]:
        raise ValueError("hf_config 'qkv_bias'=False is not supported: mimkit ViTs have qkv biases")
    if float(c["layer_norm_eps"]) != _LN_EPS:
        warnings.warn(
            f"hf_config 'layer_norm_eps'={c['layer_norm_eps']} differs from mimkit's {_LN_EPS}: "
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
    mc["arch"] = _preset_name(d, mc["depth"], heads, mc["arch"])

    layer_scale, rel_pos, abs_pos, mask_token, final = False, "none", True, False, "norm"
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
        layer_scale = lsiv > 0
        mean_pool = bool(c["use_mean_pooling"])
        if arch == "BeitForMaskedImageModeling" and not mean_pool:
            raise ValueError(
                "hf_config 'use_mean_pooling'=False in BeitForMaskedImageModeling stacks two "
                "final LayerNorms (beit.layernorm, layernorm); mimkit's BEiT has one"
            )
        final = "fc_norm" if mean_pool and arch != "BeitForMaskedImageModeling" else "norm"
        mc.update(
            layer_scale=lsiv if layer_scale else None,
            rel_pos_bias=rel_pos,
            abs_pos_emb=abs_pos,
            drop_path=float(c["drop_path_rate"]),
        )
    dec_dim = dec_depth = dec_hidden = 0
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
        if a.kind != "pretrain":
            dec_dim = dec_depth = dec_hidden = 0
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
    spec = _Spec(
        arch=arch,
        img_size=img,
        patch_size=patch,
        in_chans=mc["in_chans"],
        embed_dim=d,
        depth=mc["depth"],
        num_heads=heads,
        hidden=hidden,
        layer_scale=layer_scale,
        rel_pos=rel_pos,
        abs_pos=abs_pos,
        mask_token=mask_token,
        final=final,
        out_dim=out_dim,
        dec_dim=dec_dim,
        dec_depth=dec_depth,
        dec_hidden=dec_hidden,
    )
    return spec, mc


def from_hf(
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any] | Any,
    *,
    architecture: str | None = None,
) -> tuple[Tensors, dict[str, Any]]:
    """An HF state dict and config -> (mimkit state dict, mimkit ``model_config`` dict).

    ``hf_state``: keys in either HF layout (checkpoint-file names, or transformers 5 module
    names). ``hf_config``: a config dict (``config.json``) or a transformers config object.
    ``architecture``: the HF class; by default ``hf_config["architectures"][0]``, else guessed
    from ``model_type`` and the keys. The state comes back in mimkit's flat layouts: an encoder
    (timm), a full MAE / BEiT (official: decoder or ``lm_head`` beside the encoder keys) or a
    classifier (timm, with ``head`` and, for mean pooling, ``fc_norm`` instead of ``norm``).
    The model config is a complete :class:`~mimkit.config.ModelConfig` dict (``to_dict`` form).

    HF ``ViTModel``'s pooler is dropped with a warning; a ``layer_norm_eps`` other than 1e-6
    warns. Raises ValueError naming the key or config field for a missing, unexpected or
    mis-shaped tensor and for configurations mimkit cannot build (non-square images, an
    activation other than exact GELU, no qkv bias, two kinds of relative position bias, ...).
    """
    cfg = _config_dict(hf_config)
    if not isinstance(hf_state, Mapping):
        raise ValueError(f"hf_state must be a mapping of tensors, got {type(hf_state).__name__}")
    hf: Tensors = {}
    given: dict[str, str] = {}  # v5 name -> the name in hf_state
    for k, v in hf_state.items():
        if k.endswith("relative_position_index"):  # a buffer in old HF BEiT checkpoints
            continue
        new = _rename(k, _HUB_TO_V5_RE)
        if new in hf:
            raise ValueError(f"hf_state has key {k!r} twice (in both HF layouts)")
        hf[new], given[new] = v, k
    hub = any(new != k for new, k in given.items())  # name missing keys in the caller's layout
    arch = architecture or _detect_architecture(cfg, hf)
    if arch not in _ARCHS:
        raise ValueError(
            f"architecture {arch!r} is not supported; choose one of {HF_ARCHITECTURES}"
        )
    spec, mc = _spec_from_hf(cfg, arch, hf)
    plan = _plan(spec)
    if arch == "ViTModel":
        pooler = sorted(k for k in hf if k.startswith("pooler."))
        if pooler:
            warnings.warn(
                f"dropping the HF ViTModel pooler ({', '.join(pooler)}): mimkit has no pooler "
                "(dense + tanh on the cls token); last_hidden_state is unaffected",
                UserWarning,
                stacklevel=2,
            )
            hf = {k: v for k, v in hf.items() if k not in pooler}
    expected = {name: e.hf_shape() for e in plan for name in e.hf}
    _check_keys(
        hf,
        expected,
        what="hf_state",
        hint=f"does hf_config match the weights? (converting {arch})",
        show=lambda k: given.get(k, _rename(k, _V5_TO_HUB_RE) if hub else k),
    )
    state: Tensors = {}
    for e in plan:
        parts = [hf[name].detach() for name in e.hf]
        state[e.mimkit] = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)
    return state, mc


# ---- HF folders (config.json + model.safetensors) ----

_PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


def save_hf_folder(
    folder: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF checkpoint-file key names) to ``folder``.

    ``state`` and ``config`` are what :func:`to_hf` returns (either layout). The folder loads with
    ``<Class>.from_pretrained(folder)`` in transformers 4.x and 5.x (for ``ViTModel`` pass
    ``add_pooling_layer=False``: mimkit exports no pooler). The weights file is written
    atomically; returns the folder.
    """
    cfg = _config_dict(config)
    if cfg.get("model_type") not in _HF_DEFAULTS:
        raise ValueError(
            f"config 'model_type' must be one of {sorted(_HF_DEFAULTS)}, got "
            f"{cfg.get('model_type')!r}"
        )
    if not cfg.get("architectures"):
        raise ValueError("config has no 'architectures': from_pretrained needs the class name")
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_rename(k, _V5_TO_HUB_RE): v for k, v in state.items()}
    save_weights(folder / "model.safetensors", tensors, {"format": "pt"})
    tmp = folder / ".config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / "config.json")
    return folder


def load_hf_folder(folder: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """(HF state dict, config dict) of an HF model folder, read from safetensors only.

    Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
    ``model.safetensors.index.json``). Pickled weights (``pytorch_model.bin``) are refused with a
    ValueError: unpickling can run code. Pass the result to :func:`from_hf`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"HF model folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single)), config
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: no valid 'weight_map' ({err})") from None
        state: Tensors = {}
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(f"{index}: shard name {name!r} is not a .safetensors file name")
            state.update(load_file(str(folder / name)))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise ValueError(f"{index}: key {missing[0]!r} is in no shard")
        return state, config
    pickled = [n for n in _PICKLE_WEIGHTS if (folder / n).exists()]
    if pickled:
        raise ValueError(
            f"{folder} holds {pickled[0]} but no model.safetensors: mimkit reads safetensors only "
            "(unpickling can run code). Convert it in an environment you trust, e.g. "
            "`Model.from_pretrained(folder).save_pretrained(out)` (transformers writes "
            "safetensors), and read `out`"
        )
    raise FileNotFoundError(f"{folder} has no model.safetensors")


# ---- whole checkpoints: a mimkit .safetensors <-> an HF folder ----

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


def export_to_hf(
    checkpoint: str | Path,
    folder: str | Path,
    *,
    architecture: str | None = None,
) -> Path:
    """A mimkit checkpoint (file or run directory) -> an HF model folder; returns the folder.

    The architecture, MAE mask ratio and target, and class names come from the checkpoint's
    provenance metadata. A checkpoint that does not record its target (an official file saved
    without ``args``, such as the released ``mae_visualize_*`` weights, trained on raw pixels)
    exports ``norm_pix_loss=False``, HF's default; the mask ratio defaults to 0.75.
    """
    from mimkit.models.loading import find_checkpoint

    path = find_checkpoint(checkpoint)
    state, meta = load_weights(path)
    if meta.get("format") != "mimkit" or "model_config" not in meta:
        raise ValueError(f"{path} has no mimkit metadata ('model_config'): not a mimkit checkpoint")
    mask_ratio = meta.get("mask_ratio")
    hf_state, config = to_hf(
        state,
        model_config=meta["model_config"],
        architecture=architecture,
        mask_ratio=0.75 if mask_ratio is None else float(mask_ratio),
        norm_pix_loss=meta.get("target") == "norm_pixels",
        labels=meta.get("classes"),
    )
    return save_hf_folder(folder, hf_state, config)


def import_from_hf(
    folder: str | Path,
    path: str | Path,
    *,
    architecture: str | None = None,
) -> Path:
    """An HF model folder -> a mimkit ``.safetensors`` with provenance metadata; returns ``path``.

    The file works wherever mimkit takes a checkpoint (``model.init`` of fine-tuning, probes and
    dense tasks). HF folders do not record the training data's normalization, so there is no
    ``mean``/``std`` in the metadata.
    """
    from mimkit import __version__

    hf_state, config = load_hf_folder(folder)
    arch = architecture or _detect_architecture(config, hf_state)
    state, mc = from_hf(hf_state, config, architecture=arch)
    a = _ARCHS[arch]
    meta: dict[str, Any] = {
        "format": "mimkit",
        "mimkit_version": __version__,
        "source": f"huggingface:{arch}",
        "method": a.method,
        **{k: mc[k] for k in _ARCH_KEYS},
        "model_config": mc,
    }
    if a.kind == "classifier":
        labels = config.get("id2label") or {}
        meta.update(
            kind="classifier",
            layout="timm-classifier",
            num_classes=int(state["head.weight"].shape[0]),
            pool="avg" if "fc_norm.weight" in state else "cls",
            classes=[labels[k] for k in sorted(labels, key=int)] if labels else None,
        )
    else:
        pretrain = a.kind == "pretrain"
        meta["includes_decoder"] = pretrain
        if a.method == "mae":
            meta["layout"] = "official-mae" if pretrain else "timm-vit"
            c = {**_HF_DEFAULTS["vit_mae"], **config}
            if a.model_type == "vit_mae":
                meta["mask_ratio"] = float(c["mask_ratio"])
                meta["target"] = "norm_pixels" if c["norm_pix_loss"] else "pixels"
        else:
            meta["layout"] = "official-beit" if pretrain else "timm-beit"
            if pretrain:
                meta["vocab_size"] = int(state["lm_head.weight"].shape[0])
    path = Path(path)
    save_weights(path, state, meta)
    return path
