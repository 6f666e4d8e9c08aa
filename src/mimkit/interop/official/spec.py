"""What an official MAE / BEiT state dict is (kind, architecture) and what mimkit expects.

The kind is detected from the keys (the kinds and their layouts: :mod:`mimkit.interop.official`).
The architecture is read from tensor shapes: width, depth, patch size, channels and MLP ratio
from ``patch_embed``/``blocks``, the grid from ``pos_embed`` or a relative position table, BEiT's
heads from the table's columns. A plain ViT's heads are not in any shape: they come from
``num_heads=``, else from the ViT preset of that width and depth (base 12, large 16, huge 16);
the MAE decoder's from ``decoder_num_heads=``, else 16 for the official 512-wide decoder.
What mimkit expects for an architecture (key -> shape) is read from mimkit's own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch

from mimkit.config import VIT_PRESETS
from mimkit.interop.spec import ModelSpec

__all__ = [
    "OFFICIAL_KINDS",
    "PROBE_BN_EPS",
    "PROBE_COUNT",
    "PROBE_KEYS",
    "REL_POS_INDEX",
    "REL_POS_TABLE",
    "OfficialKind",
    "compare_shapes",
    "detect_kind",
    "expected_shapes",
    "family_of",
    "grid_from_table",
    "infer_spec",
    "key_listing",
    "mimkit_layout",
]

OfficialKind = Literal[
    "mae-encoder",
    "mae-pretrain",
    "mae-classifier",
    "mae-linprobe",
    "beit-encoder",
    "beit-pretrain",
    "beit-classifier",
]
OFFICIAL_KINDS: tuple[str, ...] = get_args(OfficialKind)

_OFFICIAL_DECODER = (512, 16)  # every official MAE decoder: width 512, 16 heads
# BEiT's relative position tables, and the index buffers the official code saves beside them
REL_POS_TABLE, REL_POS_INDEX = "relative_position_bias_table", "relative_position_index"
_SHARED_TABLE = f"rel_pos_bias.{REL_POS_TABLE}"
PROBE_BN_EPS = 1e-6  # main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6)
PROBE_KEYS = {  # official linear probe -> mimkit (the names of probe.safetensors, prefixed)
    "head.0.running_mean": "probe.bn.running_mean",
    "head.0.running_var": "probe.bn.running_var",
    "head.1.weight": "probe.head.weight",
    "head.1.bias": "probe.head.bias",
}
PROBE_COUNT = "head.0.num_batches_tracked"  # the probe's BatchNorm batch count (metadata)


# ---- what a state dict is: kind and architecture ----


def family_of(keys: set[str]) -> str:
    """``"beit"`` when BEiT-only keys are there (q/v biases, layer scale, a relative position
    table, a MIM head), else ``"mae"``."""
    beit = any(k.endswith(("attn.q_bias", ".gamma_1", REL_POS_TABLE)) for k in keys)
    return "beit" if beit or "lm_head.weight" in keys else "mae"


def detect_kind(keys: set[str]) -> str:
    """The official kind of a state dict with these keys (ValueError when it is no MAE / BEiT)."""
    if "patch_embed.proj.weight" not in keys:
        raise ValueError(
            "not an official MAE or BEiT checkpoint: no 'patch_embed.proj.weight' "
            f"(keys: {sorted(keys)[:8]})"
        )
    if family_of(keys) == "beit":
        if "lm_head.weight" in keys:
            return "beit-pretrain"
        return "beit-classifier" if "head.weight" in keys else "beit-encoder"
    if any(k.startswith("decoder_") for k in keys) or "mask_token" in keys:
        return "mae-pretrain"
    if any(k.startswith(("head.0.", "head.1.")) for k in keys):
        return "mae-linprobe"
    return "mae-classifier" if "head.weight" in keys else "mae-encoder"


def _count(keys: set[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    if idx and idx != set(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - idx)
        raise ValueError(f"'{prefix}*' keys skip block(s) {missing}: the state dict is incomplete")
    return len(idx)


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"the state dict has no {key!r}, needed to infer the architecture")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def grid_from_table(rows: int, key: str) -> int:
    """The grid side ``g`` of a relative position table of ``rows`` = (2g-1)^2 + 3 rows."""
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(
            f"{key!r} has {rows} rows, not (2g-1)^2 + 3 for a square grid g: mimkit models take "
            "square images"
        )
    return (side + 1) // 2


def _preset_heads(embed_dim: int, depth: int) -> int | None:
    return next((h for d, n, h in VIT_PRESETS.values() if (d, n) == (embed_dim, depth)), None)


def infer_spec(
    state: Mapping[str, torch.Tensor],
    kind: str,
    args: Mapping[str, Any],
    *,
    num_heads: int | None,
    decoder_num_heads: int | None,
    img_size: int | None,
) -> ModelSpec:
    """The architecture of an official state dict (indices included or not), from its shapes."""
    keys = set(state)
    d, c, p, p2 = _shape(state, "patch_embed.proj.weight", 4)
    if p != p2:
        raise ValueError(f"'patch_embed.proj.weight' has a {p}x{p2} kernel: mimkit takes square")
    depth = _count(keys, "blocks.")
    if depth == 0:
        raise ValueError("the state dict has no 'blocks.{i}.*' keys")
    hidden = _shape(state, "blocks.0.mlp.fc1.weight", 2)[0]
    mlp_ratio = hidden / d
    if int(d * mlp_ratio) != hidden:
        raise ValueError(f"'blocks.0.mlp.fc1.weight' width {hidden} is not representable")
    beit = kind.startswith("beit")

    # the patch grid: absolute position embeddings, else a relative position table
    grid = None
    if "pos_embed" in state:
        n = _shape(state, "pos_embed", 3)[1] - 1
        grid = math.isqrt(max(n, 0))
        if grid * grid != n or n < 1:
            raise ValueError(
                f"'pos_embed' holds {n} patch positions (+1 cls): not a square grid, which "
                "mimkit models need"
            )
    tables = [k for k in (_SHARED_TABLE, f"blocks.0.attn.{REL_POS_TABLE}") if k in state]
    table_heads = None
    if beit and tables:
        rows, table_heads = _shape(state, tables[0], 2)
        g = grid_from_table(rows, tables[0])
        if grid is not None and g != grid:
            raise ValueError(
                f"'pos_embed' says a {grid}x{grid} grid but {tables[0]!r} a {g}x{g} one"
            )
        grid = g
    if grid is None:
        size = img_size or args.get("input_size")
        if not isinstance(size, int) or size % p:
            raise ValueError(
                "the image size is in no tensor shape (no pos_embed, no relative position table) "
                f"and args.input_size is {size!r}: pass img_size= (a multiple of {p})"
            )
        grid = size // p
    if img_size is not None and img_size != grid * p:
        raise ValueError(
            f"img_size={img_size} does not match the weights, which are for {grid * p}px "
            f"({grid}x{grid} patches of {p})"
        )

    heads = num_heads or table_heads or _preset_heads(d, depth)
    if heads is None:
        raise ValueError(
            f"the number of attention heads is in no tensor shape (width {d}, depth {depth}, no "
            "ViT preset of those): pass num_heads="
        )
    if table_heads is not None and heads != table_heads:
        raise ValueError(
            f"num_heads={heads} but {tables[0]!r} has {table_heads} columns (one per head)"
        )
    if d % heads:
        raise ValueError(f"embed_dim {d} is not divisible by num_heads {heads}")
    spec = ModelSpec(kind.split("-")[0], grid * p, p, c, d, depth, heads, mlp_ratio)

    if beit:
        if "blocks.0.attn.q_bias" not in state:
            raise ValueError(
                "'blocks.0.attn.q_bias' is missing: BEiT without q/v biases (qkv_bias=False) is "
                "not supported (mimkit's BEiT blocks always have them)"
            )
        if len(tables) == 2:
            raise ValueError(
                f"both a shared table ({_SHARED_TABLE!r}) and per-block tables: mimkit's BEiT has "
                "one or the other"
            )
        rel = "none" if not tables else "shared" if tables[0] == _SHARED_TABLE else "per_layer"
        spec = dataclasses.replace(
            spec,
            layer_scale="blocks.0.gamma_1" in state,
            rel_pos=rel,
            abs_pos="pos_embed" in state,
            mask_token="mask_token" in state or kind == "beit-pretrain",
        )
    elif "blocks.0.attn.qkv.bias" not in state:
        raise ValueError(
            "'blocks.0.attn.qkv.bias' is missing: ViTs without qkv biases are not supported "
            "(mimkit's ViT blocks always have them)"
        )

    if kind.endswith("classifier"):
        spec = dataclasses.replace(
            spec,
            fc_norm="fc_norm.weight" in state,
            num_classes=_shape(state, "head.weight", 2)[0],
        )
    elif kind == "mae-linprobe":
        spec = dataclasses.replace(
            spec,
            fc_norm="fc_norm.weight" in state,
            num_classes=_shape(state, "head.1.weight", 2)[0],
        )
    elif kind == "beit-pretrain":
        spec = dataclasses.replace(spec, vocab_size=_shape(state, "lm_head.weight", 2)[0])
    elif kind == "mae-pretrain":
        e = _shape(state, "decoder_embed.weight", 2)[0]
        dec_depth = _count(keys, "decoder_blocks.")
        dec_heads = decoder_num_heads or (16 if e == _OFFICIAL_DECODER[0] else None)
        if dec_heads is None:
            raise ValueError(
                f"the decoder's number of heads is in no tensor shape (width {e}; the official "
                f"decoders are {_OFFICIAL_DECODER[0]} wide with 16): pass decoder_num_heads="
            )
        if e % dec_heads:
            raise ValueError(f"decoder width {e} is not divisible by decoder_num_heads {dec_heads}")
        if dec_depth == 0:
            raise ValueError("the state dict has no 'decoder_blocks.{i}.*' keys")
        dec_hidden = _shape(state, "decoder_blocks.0.mlp.fc1.weight", 2)[0]
        if dec_hidden != int(e * mlp_ratio):
            raise ValueError(
                f"'decoder_blocks.0.mlp.fc1.weight' width {dec_hidden} is not decoder width "
                f"{e} x the encoder's MLP ratio {mlp_ratio:g}: mimkit's decoder shares the ratio"
            )
        spec = dataclasses.replace(spec, dec_dim=e, dec_depth=dec_depth, dec_heads=dec_heads)
    return spec


# ---- what mimkit expects: key -> shape, from mimkit's own modules ----


def _expand_blocks(
    shapes: dict[str, tuple[int, ...]], prefix: str, depth: int
) -> dict[str, tuple[int, ...]]:
    """Keys of a depth-1 model -> those of ``depth`` blocks (``{prefix}0.*`` repeated)."""
    first = f"{prefix}0."
    block = {k[len(first) :]: s for k, s in shapes.items() if k.startswith(first)}
    out: dict[str, tuple[int, ...]] = {}
    for k, s in shapes.items():
        if not k.startswith(first):
            out[k] = s
        elif k[len(first) :] == next(iter(block)):  # where block 0 starts: every block
            for i in range(depth):
                out.update({f"{prefix}{i}.{name}": shape for name, shape in block.items()})
    return out


@functools.lru_cache(maxsize=16)
def expected_shapes(kind: str, spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """mimkit's keys and shapes for official ``kind`` weights of architecture ``spec`` (a depth-1
    model is built: cheap, RNG untouched)."""
    from mimkit.models.beit import BEiT, BEiTEncoder
    from mimkit.models.heads import Classifier
    from mimkit.models.mae import MAE, to_official_layout
    from mimkit.models.vit import VisionTransformer

    common = dict(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        embed_dim=spec.embed_dim,
        depth=1,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if spec.method == "beit":
            encoder: torch.nn.Module = BEiTEncoder(
                **common,
                layer_scale=0.1 if spec.layer_scale else None,
                abs_pos_emb=spec.abs_pos,
                shared_rel_pos_bias=spec.rel_pos == "shared",
                rel_pos_bias=spec.rel_pos == "per_layer",
                mask_token=spec.mask_token and kind != "beit-classifier",
            )
        else:
            encoder = VisionTransformer(**common)
        if kind == "mae-pretrain":
            model = MAE(
                encoder,
                decoder_embed_dim=spec.dec_dim,
                decoder_depth=1,
                decoder_num_heads=spec.dec_heads,
                mlp_ratio=spec.mlp_ratio,
            )
            state = to_official_layout(model.state_dict())
        elif kind == "beit-pretrain":
            state = to_official_layout(BEiT(encoder, vocab_size=spec.vocab_size).state_dict())
        elif kind.endswith(("classifier", "linprobe")):
            clf = Classifier(encoder, num_classes=spec.num_classes, pool=spec.pool)
            state = clf.timm_state_dict()
            if kind == "mae-linprobe":
                state = {k: v for k, v in state.items() if not k.startswith("head.")}
                d, n = spec.embed_dim, spec.num_classes
                state |= {
                    "probe.bn.running_mean": torch.empty(d),
                    "probe.bn.running_var": torch.empty(d),
                    "probe.head.weight": torch.empty(n, d),
                    "probe.head.bias": torch.empty(n),
                }
        else:
            state = encoder.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    shapes = _expand_blocks(shapes, "blocks.", spec.depth)
    if kind == "mae-pretrain":
        shapes = _expand_blocks(shapes, "decoder_blocks.", spec.dec_depth)
    return tuple(shapes.items())


def mimkit_layout(kind: str, probe: str) -> tuple[str, str]:
    """(mimkit ``kind``, ``layout``) of a converted official kind."""
    return {
        "mae-encoder": ("encoder", "timm-vit"),
        "mae-pretrain": ("pretrain", "official-mae"),
        "mae-classifier": ("classifier", "timm-classifier"),
        "mae-linprobe": ("linear_probe", "timm-vit-probe")
        if probe == "keep"
        else ("classifier", "timm-classifier"),
        "beit-encoder": ("encoder", "timm-beit"),
        "beit-pretrain": ("pretrain", "official-beit"),
        "beit-classifier": ("classifier", "timm-classifier"),
    }[kind]


def compare_shapes(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(unexpected keys, missing keys, ``"key (shape) != (expected)"`` for mis-shaped ones)."""
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    mis = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    return unexpected, missing, mis


def key_listing(name: str, items: list[str], limit: int = 12) -> str:
    """``"name (count): [the first limit items] and N more"``, for error messages."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{name} ({len(items)}): {items[:limit]}{more}"
