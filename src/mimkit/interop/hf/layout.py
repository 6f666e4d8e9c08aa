"""The Hugging Face side of :mod:`mimkit.interop.hf`: architectures, config defaults, key names.

The table of supported HF classes (:data:`ARCHS`), the HF config defaults that Hub files leave
out, the rules renaming between the two HF key layouts (``"hub"`` / ``"v5"``, described in
:mod:`mimkit.interop.hf`) and the mapping plan: one list of (mimkit key, HF key(s), mimkit
shape) per architecture, built from a :class:`~mimkit.interop.spec.ModelSpec`. Pure data and
key manipulation.

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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mimkit.interop.spec import ModelSpec

__all__ = [
    "ARCHS",
    "HF_ARCHITECTURES",
    "HF_DEFAULTS",
    "HF_LAYOUTS",
    "LN_EPS",
    "Arch",
    "PlanEntry",
    "check_keys",
    "hub_name",
    "key_plan",
    "v5_name",
]


@dataclass(frozen=True)
class Arch:
    """What mimkit needs to know of a supported HF class."""

    method: str  # mimkit's model family: "mae" (VisionTransformer) or "beit"
    kind: str  # "encoder" | "pretrain" | "classifier"
    model_type: str  # HF config model_type
    prefix: str  # HF base-model prefix of the encoder keys


ARCHS: dict[str, Arch] = {
    "ViTModel": Arch("mae", "encoder", "vit", ""),
    "ViTMAEModel": Arch("mae", "encoder", "vit_mae", ""),
    "ViTMAEForPreTraining": Arch("mae", "pretrain", "vit_mae", "vit."),
    "ViTForImageClassification": Arch("mae", "classifier", "vit", "vit."),
    "BeitModel": Arch("beit", "encoder", "beit", ""),
    "BeitForMaskedImageModeling": Arch("beit", "pretrain", "beit", "beit."),
    "BeitForImageClassification": Arch("beit", "classifier", "beit", "beit."),
}

HF_ARCHITECTURES: tuple[str, ...] = tuple(ARCHS)
"""The HF classes :mod:`mimkit.interop.hf` converts to and from."""

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
HF_DEFAULTS: dict[str, dict[str, Any]] = {
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

LN_EPS = 1e-6  # mimkit's (and timm's, and the official MAE / BEiT code's) LayerNorm eps

# ---- the two HF key layouts ----

# the module names inside a block, (v5, hub): renamed alike in both directions
_BLOCK_NAMES = [
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
]
_V5_TO_HUB = [
    (r"^((?:vit\.|beit\.)?)layers\.(\d+)\.relative_position_bias\.",
     r"\1encoder.layer.\2.attention.attention.relative_position_bias."),
    (r"^((?:vit\.|beit\.)?)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"^((?:beit\.)?)shared_position_bias\.", r"\1encoder.relative_position_bias."),
    *((re.escape(v5), hub) for v5, hub in _BLOCK_NAMES),
]  # fmt: skip
_HUB_TO_V5 = [
    # what transformers 5.x save_pretrained writes for ViTMAE's decoder blocks
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
    (r"^((?:vit\.|beit\.)?)encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"^((?:beit\.)?)encoder\.relative_position_bias\.", r"\1shared_position_bias."),
    *((re.escape(hub), v5) for v5, hub in _BLOCK_NAMES),
]
_V5_TO_HUB_RE = [(re.compile(p), r) for p, r in _V5_TO_HUB]
_HUB_TO_V5_RE = [(re.compile(p), r) for p, r in _HUB_TO_V5]
HF_LAYOUTS = ("hub", "v5")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def hub_name(key: str) -> str:
    """An HF key in the checkpoint-file (``"hub"``) layout; such a key is returned unchanged."""
    return _rename(key, _V5_TO_HUB_RE)


def v5_name(key: str) -> str:
    """An HF key in the transformers 5 (``"v5"``) layout; such a key is returned unchanged."""
    return _rename(key, _HUB_TO_V5_RE)


# ---- the mapping plan: one list of (mimkit key, HF key(s), mimkit shape) per architecture ----


@dataclass(frozen=True)
class PlanEntry:
    """One mimkit tensor and the HF tensor(s) it maps to."""

    mimkit: str
    hf: tuple[str, ...]  # one key, or three (q, k, v) that concatenate along dim 0
    shape: tuple[int, ...]  # of the mimkit tensor

    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor (a third of the rows when q, k and v are split)."""
        n = len(self.hf)
        return self.shape if n == 1 else (self.shape[0] // n, *self.shape[1:])


def key_plan(arch: str, s: ModelSpec) -> list[PlanEntry]:
    """The mapping of HF class ``arch`` with architecture ``s``: every key, in both layouts."""
    a = ARCHS[arch]
    beit, p, d = a.method == "beit", a.prefix, s.embed_dim
    grid = s.img_size // s.patch_size
    n = grid * grid
    table = ((2 * grid - 1) ** 2 + 3, s.num_heads)  # BEiT: relative offsets + 3 cls entries
    out: list[PlanEntry] = []

    def add(m: str, h: str | tuple[str, ...], shape: tuple[int, ...]) -> None:
        out.append(PlanEntry(m, (h,) if isinstance(h, str) else h, shape))

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
    if not s.fc_norm:
        norm("norm", "layernorm" if arch == "BeitForMaskedImageModeling" else f"{p}layernorm", d)
    else:
        norm("fc_norm", f"{p}pooler.layernorm", d)
    if a.kind == "classifier":
        linear("head", "classifier", s.num_classes, d)
    elif a.kind == "pretrain" and beit:
        linear("lm_head", "lm_head", s.vocab_size, d)
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


def check_keys(
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
