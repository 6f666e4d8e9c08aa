"""Read the official MAE and BEiT checkpoint files (``.pth``) safely; write them back.

The official code (facebookresearch/mae, microsoft/unilm ``beit/``) saves ``torch.save`` pickles:
``{'model': state_dict}`` (released weights), or from a training run ``{'model', 'optimizer',
'epoch', 'scaler', 'args'}`` (plus ``'model_ema'`` in BEiT); BEiT files may use ``'module'`` for
``'model'`` (its ``--model_key model|module``). ``args`` is an ``argparse.Namespace``.

Safety. Files are read with ``torch.load(path, map_location="cpu", weights_only=True)`` inside
``torch.serialization.safe_globals(SAFE_GLOBALS)``: torch's weights-only unpickler (tensor and
storage rebuilding, dtypes, ``OrderedDict``, plain containers and scalars) plus exactly one class,
``argparse.Namespace`` (the ``args`` entry; the official ``args`` fields are str, int, float,
bool, None, lists and tuples of those; the optimizer and scaler states are plain dicts of tensors
and numbers). Nothing else is allowed: a pickle that names any other global (``os.system``,
``pathlib.Path.touch``, ``getattr``, ``numpy`` scalars, ``pathlib.PosixPath``, ...) is refused
with an :class:`UnsafeCheckpointError` before that global is resolved, so nothing in the file
runs. Re-save such a file in an environment you trust (``torch.save({'model': sd}, out)``).

Layouts: each official kind, the keys it has besides the encoder's, and the mimkit layout it
converts to (``layout`` in the metadata):

- ``mae-encoder`` (``mae_pretrain_vit_*.pth``): ``norm``. -> ``timm-vit``, the same keys.
- ``mae-pretrain`` (``mae_visualize_vit_*.pth``, main_pretrain's ``checkpoint-*.pth``):
  ``norm, decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.i, decoder_norm,
  decoder_pred``. -> ``official-mae``, the same keys (``MAE`` takes them through
  ``from_official_layout``).
- ``mae-classifier`` (main_finetune): ``fc_norm, head`` (global pool, no ``norm``) or ``norm,
  head`` (cls token). -> ``timm-classifier``, the same keys; ``pool`` "avg" / "cls".
- ``mae-linprobe`` (main_linprobe: ``head = Sequential(BatchNorm1d(affine=False, eps=1e-6),
  Linear)``): ``norm`` or ``fc_norm``, ``head.0.running_mean/running_var/num_batches_tracked``,
  ``head.1.weight/bias``. -> ``timm-vit-probe``: the encoder (and ``fc_norm``) plus
  ``probe.bn.running_mean/running_var``, ``probe.head.weight/bias`` (the key names of mimkit's
  ``probe.safetensors`` under ``probe.``; the batch count goes to the metadata), or with
  ``probe="fold"`` a ``timm-classifier``.
- ``beit-pretrain`` (modeling_pretrain): ``mask_token, rel_pos_bias.relative_position_bias_table,
  rel_pos_bias.relative_position_index, norm, lm_head``. -> ``official-beit``.
- ``beit-classifier`` (modeling_finetune, intermediate or final fine-tuning, any resolution):
  ``blocks.i.attn.relative_position_bias_table/_index``, ``fc_norm, head`` (mean pooling) or
  ``norm, head``. -> ``timm-classifier``.
- ``beit-encoder``: a BEiT encoder with neither ``lm_head`` nor ``head``. -> ``timm-beit``.

The ViT encoder (MAE, timm's ``VisionTransformer``): ``cls_token (1,1,D), pos_embed (1,1+N,D),
patch_embed.proj.{weight (D,C,p,p), bias}, blocks.i.{norm1, attn.qkv (3D,D)+bias, attn.proj,
norm2, mlp.fc1, mlp.fc2}``. The BEiT encoder (timm's ``Beit``): ``cls_token, patch_embed.proj,
[pos_embed], blocks.i.{gamma_1, gamma_2, norm1, attn.qkv.weight (no bias), attn.q_bias,
attn.v_bias, [attn.relative_position_bias_table ((2g-1)^2+3, H)], attn.proj, norm2, mlp.fc1,
mlp.fc2}``. The official BEiT registers ``relative_position_index`` ((g*g+1, g*g+1), int64) as a
persistent buffer, so its files hold one per table; mimkit (and timm) recompute it: on import each
is checked against the standard index and dropped, on export it is regenerated. Everything else
converts key for key, tensors unchanged (same objects, dtypes kept), so official -> mimkit ->
official is lossless. ``rel_pos_bias="per_layer"`` copies BEiT's shared pretraining table into
every block, as BEiT's fine-tuning code does (not reversible: the export then has per-block
tables). ``probe="fold"`` folds the linear probe's BatchNorm (eval statistics) into its linear
layer: ``W' = W / sqrt(var + eps)``, ``b' = b - W' mean``, an equivalent mimkit classifier.

The architecture is read from tensor shapes: width, depth, patch size, channels and MLP ratio
from ``patch_embed``/``blocks``, the grid from ``pos_embed`` or a relative position table, BEiT's
heads from the table's columns. A plain ViT's heads are not in any shape: they come from
``num_heads=``, else from the ViT preset of that width and depth (base 12, large 16, huge 16);
the MAE decoder's from ``decoder_num_heads=``, else 16 for the official 512-wide decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from timm.models.beit import gen_relative_position_index

from mimkit.config import VIT_PRESETS, ModelConfig
from mimkit.interop.hf import flat_state

__all__ = [
    "OFFICIAL_KINDS",
    "SAFE_GLOBALS",
    "OfficialCheckpoint",
    "OfficialKind",
    "UnsafeCheckpointError",
    "convert_official",
    "export_official",
    "import_official",
    "load_official",
    "read_official",
    "save_official",
    "to_official",
]

Tensors = dict[str, torch.Tensor]
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

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""What :func:`read_official` allows beyond torch's weights-only defaults: the ``args`` entry."""

# the official code's normalization: MAE uses ImageNet's statistics; BEiT (without
# --imagenet_default_mean_and_std, its default) the Inception ones
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_INCEPTION_MEAN, _INCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
_PROBE_BN_EPS = 1e-6  # main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6)
_OFFICIAL_DECODER = (512, 16)  # every official MAE decoder: width 512, 16 heads
_TABLE, _INDEX = "relative_position_bias_table", "relative_position_index"
_SHARED_TABLE = f"rel_pos_bias.{_TABLE}"
_PROBE_KEYS = {  # official linear probe -> mimkit (the names of probe.safetensors, prefixed)
    "head.0.running_mean": "probe.bn.running_mean",
    "head.0.running_var": "probe.bn.running_var",
    "head.1.weight": "probe.head.weight",
    "head.1.bias": "probe.head.bias",
}
_PROBE_COUNT = "head.0.num_batches_tracked"
# args fields worth keeping in the metadata (JSON values); the rest are paths and launch details
_ARG_FIELDS = (
    "model",
    "input_size",
    "mask_ratio",
    "norm_pix_loss",
    "epochs",
    "batch_size",
    "accum_iter",
    "blr",
    "lr",
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "layer_decay",
    "drop_path",
    "global_pool",
    "nb_classes",
    "smoothing",
    "mixup",
    "cutmix",
    "reprob",
    "seed",
    "num_mask_patches",
    "max_mask_patches_per_block",
    "min_mask_patches_per_block",
    "second_input_size",
    "discrete_vae_type",
    "layer_scale_init_value",
    "rel_pos_bias",
    "shared_rel_pos_bias",
    "abs_pos_emb",
    "use_mean_pooling",
    "imagenet_default_mean_and_std",
)


class UnsafeCheckpointError(ValueError):
    """The file's pickle needs a global outside the allow-list; nothing of it was run."""


@dataclass
class OfficialCheckpoint:
    state: Tensors  # the model state dict, official key names
    entry: str | None  # the top-level key it came from ("model", "module"), None: the file itself
    args: dict[str, Any]  # useful fields of the ``args`` Namespace, as JSON values
    extras: list[str]  # other top-level entries (optimizer, epoch, scaler, model_ema, ...)
    path: Path


# ---- reading a file safely ----


def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL (\S+)", message)
    return m.group(1) if m else None


def _safe_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(str(err))
        if name is not None:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: its pickle needs the global {name!r}, which is not on "
                "the allow-list (tensors, plain containers, argparse.Namespace); nothing in the "
                "file was run. If you trust its source, re-save only the weights "
                "(torch.save({'model': state_dict}, out)) and read that"
            ) from None
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(err).__name__


def _json_value(v: Any) -> Any:
    """A JSON-able copy of a plain value, or ``...`` when it is not one."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        items = [_json_value(x) for x in v]
        return ... if any(x is ... for x in items) else items
    return ...


def _args_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        return {}  # not the official Namespace: nothing worth keeping
    out = {}
    for k in _ARG_FIELDS:
        if k in args:
            v = _json_value(args[k])
            if v is not ...:
                out[k] = v
    return out


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_official(path: str | Path, *, entry: str | None = None) -> OfficialCheckpoint:
    """The model state dict, ``args`` and other entries of an official ``.pth`` (safely).

    ``entry``: the top-level key holding the weights; by default ``'model'``, else ``'module'``,
    else the file itself when it is a bare state dict. Raises :class:`UnsafeCheckpointError` for a
    pickle that needs anything outside :data:`SAFE_GLOBALS` (nothing of it runs), ValueError for
    anything that is not a checkpoint of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _safe_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if entry is None:
        entry = next((k for k in ("model", "module") if k in obj), None)
        if entry is None and not _is_state_dict(obj):
            raise ValueError(
                f"{path}: no 'model' or 'module' entry and not a bare state dict "
                f"(top-level keys: {sorted(map(str, obj))[:10]})"
            )
    elif entry not in obj:
        raise ValueError(f"{path}: no entry {entry!r} (top-level keys: {sorted(map(str, obj))})")
    state = obj if entry is None else obj[entry]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: entry {entry!r} is not a state dict ({type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entry {entry!r} holds non-tensor values, e.g. {bad[0]!r}")
    extras = [] if entry is None else sorted(str(k) for k in obj if k not in (entry, "args"))
    args = obj.get("args") if entry is not None else None
    return OfficialCheckpoint(dict(state), entry, _args_dict(args), extras, path)


# ---- what a state dict is: kind and architecture ----


@dataclass(frozen=True)
class _Spec:
    kind: str  # an official kind
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    pool: str = "avg"  # classifiers and probes
    num_classes: int = 0
    vocab_size: int = 0  # BEiT lm_head rows
    layer_scale: bool = False  # BEiT
    rel_pos: str = "none"  # BEiT: shared | per_layer | none
    abs_pos: bool = True
    mask_token: bool = False  # BEiT encoder
    dec_dim: int = 0  # MAE decoder
    dec_depth: int = 0
    dec_heads: int = 0

    @property
    def family(self) -> str:
        return self.kind.split("-")[0]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def _family(keys: set[str]) -> str:
    beit = any(k.endswith(("attn.q_bias", ".gamma_1", _TABLE)) for k in keys)
    return "beit" if beit or "lm_head.weight" in keys else "mae"


def _detect_kind(keys: set[str]) -> str:
    if "patch_embed.proj.weight" not in keys:
        raise ValueError(
            "not an official MAE or BEiT checkpoint: no 'patch_embed.proj.weight' "
            f"(keys: {sorted(keys)[:8]})"
        )
    if _family(keys) == "beit":
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


def _grid_from_table(rows: int, key: str) -> int:
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(
            f"{key!r} has {rows} rows, not (2g-1)^2 + 3 for a square grid g: mimkit models take "
            "square images"
        )
    return (side + 1) // 2


def _preset_heads(embed_dim: int, depth: int) -> int | None:
    return next((h for d, n, h in VIT_PRESETS.values() if (d, n) == (embed_dim, depth)), None)


def _preset_name(embed_dim: int, depth: int, num_heads: int) -> str:
    dims = (embed_dim, depth, num_heads)
    return next((name for name, v in VIT_PRESETS.items() if v == dims), "custom")


def _infer_spec(
    state: Mapping[str, torch.Tensor],
    kind: str,
    args: Mapping[str, Any],
    *,
    num_heads: int | None,
    decoder_num_heads: int | None,
    img_size: int | None,
) -> _Spec:
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
    tables = [k for k in (_SHARED_TABLE, f"blocks.0.attn.{_TABLE}") if k in state]
    table_heads = None
    if beit and tables:
        rows, table_heads = _shape(state, tables[0], 2)
        g = _grid_from_table(rows, tables[0])
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
    spec = _Spec(kind, grid * p, p, c, d, depth, heads, mlp_ratio)

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
            pool="avg" if "fc_norm.weight" in state else "cls",
            num_classes=_shape(state, "head.weight", 2)[0],
        )
    elif kind == "mae-linprobe":
        spec = dataclasses.replace(
            spec,
            pool="avg" if "fc_norm.weight" in state else "cls",
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
def _expected(spec: _Spec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """mimkit's keys and shapes for ``spec`` (a depth-1 model is built: cheap, RNG untouched)."""
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
        if spec.family == "beit":
            encoder: torch.nn.Module = BEiTEncoder(
                **common,
                layer_scale=0.1 if spec.layer_scale else None,
                abs_pos_emb=spec.abs_pos,
                shared_rel_pos_bias=spec.rel_pos == "shared",
                rel_pos_bias=spec.rel_pos == "per_layer",
                mask_token=spec.mask_token and spec.kind != "beit-classifier",
            )
        else:
            encoder = VisionTransformer(**common)
        if spec.kind == "mae-pretrain":
            model = MAE(
                encoder,
                decoder_embed_dim=spec.dec_dim,
                decoder_depth=1,
                decoder_num_heads=spec.dec_heads,
                mlp_ratio=spec.mlp_ratio,
            )
            state = to_official_layout(model.state_dict())
        elif spec.kind == "beit-pretrain":
            state = to_official_layout(BEiT(encoder, vocab_size=spec.vocab_size).state_dict())
        elif spec.kind.endswith(("classifier", "linprobe")):
            clf = Classifier(encoder, num_classes=spec.num_classes, pool=spec.pool)
            state = clf.timm_state_dict()
            if spec.kind == "mae-linprobe":
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
    if spec.kind == "mae-pretrain":
        shapes = _expand_blocks(shapes, "decoder_blocks.", spec.dec_depth)
    return tuple(shapes.items())


def _layout(kind: str, probe: str) -> tuple[str, str]:
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


def _compare(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    mis = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    return unexpected, missing, mis


def _listing(name: str, items: list[str], limit: int = 12) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{name} ({len(items)}): {items[:limit]}{more}"


# ---- official -> mimkit ----


def convert_official(
    state: Mapping[str, torch.Tensor],
    *,
    args: Mapping[str, Any] | argparse.Namespace | None = None,
    strict: bool = True,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    rel_pos_bias: Literal["keep", "per_layer"] = "keep",
    probe: Literal["keep", "fold"] = "keep",
    source: str = "state",
) -> tuple[Tensors, dict[str, Any]]:
    """An official MAE / BEiT model state dict -> (mimkit state dict, provenance metadata).

    The kind (see the module docstring) is detected from the keys and the architecture inferred
    from the shapes; ``args`` (the checkpoint's Namespace or its fields) adds the training
    settings to the metadata. ``strict``: any unexpected, missing or mis-shaped key after the
    conversion raises one ValueError listing them all; with ``strict=False`` the unexpected and
    mis-shaped ones are dropped and all three lists are returned in the metadata
    (``unexpected_keys``, ``missing_keys``, ``mismatched_keys``). ``rel_pos_bias="per_layer"``
    copies BEiT's shared table into every block; ``probe="fold"`` folds an MAE linear probe's
    BatchNorm into its linear layer (a plain classifier). Tensors are not copied.
    """
    if rel_pos_bias not in ("keep", "per_layer"):
        raise ValueError(f"rel_pos_bias must be 'keep' or 'per_layer', got {rel_pos_bias!r}")
    if probe not in ("keep", "fold"):
        raise ValueError(f"probe must be 'keep' or 'fold', got {probe!r}")
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of tensors, got {type(state).__name__}")
    out: Tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: key {k!r} is not a tensor ({type(v).__name__})")
        out[k] = v
    notes: list[str] = []
    if out and all(k.startswith("module.") for k in out):
        out = {k.removeprefix("module."): v for k, v in out.items()}
        notes.append("'module.' key prefix (DistributedDataParallel) removed")
    a = _args_dict(args)
    kind = _detect_kind(set(out))
    spec = _infer_spec(
        out, kind, a, num_heads=num_heads, decoder_num_heads=decoder_num_heads, img_size=img_size
    )
    problems: list[str] = []

    # relative position indices: checked against the standard one, then dropped (recomputed)
    if spec.family == "beit":
        standard = gen_relative_position_index((spec.grid, spec.grid))
        for k in [k for k in out if k.endswith(_INDEX)]:
            table = k[: -len(_INDEX)] + _TABLE
            if table not in out:
                continue  # left in place: an unexpected key
            v = out.pop(k)
            if tuple(v.shape) != tuple(standard.shape):
                problems.append(f"{k} {tuple(v.shape)} != {tuple(standard.shape)}")
            elif v.is_floating_point() or not torch.equal(v.long(), standard):
                problems.append(f"{k} differs from the standard relative position index")
            elif v.dtype != torch.long:
                notes.append(f"{k} was {v.dtype} (exported as int64)")
        if any(k.endswith(_TABLE) for k in out) and not any(k.endswith(_INDEX) for k in state):
            notes.append("no relative_position_index buffers (mimkit recomputes them)")
        if rel_pos_bias == "per_layer":
            if spec.rel_pos == "shared":
                from mimkit.models.resize import expand_shared_rel_pos_bias

                out = expand_shared_rel_pos_bias(out, spec.depth)
                spec = dataclasses.replace(spec, rel_pos="per_layer")
                notes.append(f"shared relative position table copied into {spec.depth} blocks")
            else:
                notes.append("rel_pos_bias='per_layer': no shared table, nothing to copy")

    extra_meta: dict[str, Any] = {}
    if kind == "mae-linprobe":
        count = out.pop(_PROBE_COUNT, None)
        extra_meta["probe_num_batches_tracked"] = None if count is None else int(count)
        out = {_PROBE_KEYS.get(k, k): v for k, v in out.items()}
        if probe == "fold":
            out = _fold_probe(out, notes)
            spec = dataclasses.replace(spec, kind="mae-classifier")

    expected = dict(_expected(spec))
    unexpected, missing, mis = _compare(out, expected)
    mis = problems + mis
    if strict and (unexpected or missing or mis):
        parts = [
            _listing(n, x)
            for n, x in (("unexpected keys", unexpected), ("missing keys", missing))
            if x
        ]
        if mis:
            parts.append(_listing("mismatched keys", mis))
        raise ValueError(
            f"{source}: the official {kind} weights do not convert cleanly to mimkit's "
            f"{_layout(kind, probe)[1]} layout: {'; '.join(parts)}. Pass strict=False to convert "
            "anyway (unexpected and mismatched keys are dropped, all are listed in the metadata)"
        )
    if not strict:
        bad = {m.split(" ", 1)[0] for m in mis}
        out = {k: v for k, v in out.items() if k in expected and k not in bad}
    meta = _metadata(spec, kind, a, probe=probe, notes=notes)
    meta.update(extra_meta)
    if not strict:
        meta.update(unexpected_keys=unexpected, missing_keys=missing, mismatched_keys=mis)
    meta["notes"] = notes
    return out, meta


def _fold_probe(state: Tensors, notes: list[str]) -> Tensors:
    need = [k for k in _PROBE_KEYS.values() if k not in state]
    if need:
        raise ValueError(f"cannot fold the linear probe: missing {need}")
    w, b = state.pop("probe.head.weight"), state.pop("probe.head.bias")
    mean, var = state.pop("probe.bn.running_mean"), state.pop("probe.bn.running_var")
    scale = (var.double() + _PROBE_BN_EPS).rsqrt()  # (D,)
    w2 = w.double() * scale  # (C, D)
    state["head.weight"] = w2.to(w.dtype)
    state["head.bias"] = (b.double() - w2 @ mean.double()).to(b.dtype)
    notes.append(
        f"the probe's BatchNorm (eps {_PROBE_BN_EPS:g}, running statistics) folded into 'head'"
    )
    return state


def _metadata(
    spec: _Spec, source_kind: str, args: Mapping[str, Any], *, probe: str, notes: list[str]
) -> dict[str, Any]:
    from mimkit import __version__

    kind, layout = _layout(source_kind, probe)
    beit = spec.family == "beit"
    mc = dataclasses.asdict(ModelConfig())
    mc.update(
        method=spec.family,
        arch=_preset_name(spec.embed_dim, spec.depth, spec.num_heads),
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
    if spec.kind == "mae-pretrain":
        mc["decoder"] = {
            "embed_dim": spec.dec_dim,
            "depth": spec.dec_depth,
            "num_heads": spec.dec_heads,
        }
    meta: dict[str, Any] = {
        "format": "mimkit",
        "mimkit_version": __version__,
        "source": f"official-{spec.family}",
        "official_kind": spec.kind,
        "kind": kind,
        "layout": layout,
        "method": spec.family,
        **{k: mc[k] for k in ("arch", "img_size", "patch_size", "in_chans")},
        **{k: mc[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")},
        "includes_decoder": kind == "pretrain",
    }
    if spec.in_chans == 3:
        imagenet = not beit or bool(args.get("imagenet_default_mean_and_std", False))
        meta["mean"] = _IMAGENET_MEAN if imagenet else _INCEPTION_MEAN
        meta["std"] = _IMAGENET_STD if imagenet else _INCEPTION_STD
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
        meta.update(num_classes=spec.num_classes, pool=spec.pool, pretrain_method=spec.family)
        if kind == "linear_probe":
            meta["probe"] = {"bn_eps": _PROBE_BN_EPS, "prefix": "probe."}
        if source_kind == "mae-linprobe" and kind == "classifier":
            meta["folded_from"] = "mae-linprobe"
        mc.pop("decoder")  # a classifier has none (as mimkit's fine-tuning metadata)
    meta["model_config"] = mc
    if args:
        meta["args"] = dict(args)
    return meta


def load_official(
    path: str | Path,
    *,
    strict: bool = True,
    entry: str | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    rel_pos_bias: Literal["keep", "per_layer"] = "keep",
    probe: Literal["keep", "fold"] = "keep",
) -> tuple[Tensors, dict[str, Any]]:
    """An official MAE / BEiT ``.pth`` -> (mimkit state dict, provenance metadata).

    Read safely with :func:`read_official` (nothing but tensors, plain values and
    ``argparse.Namespace`` is unpickled), converted with :func:`convert_official` (see there for
    the options). The metadata also records the file's ``official_entry`` and the top-level
    entries that were not converted (``official_extras``: optimizer, epoch, scaler, ...).
    """
    ck = read_official(path, entry=entry)
    state, meta = convert_official(
        ck.state,
        args=ck.args,
        strict=strict,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        img_size=img_size,
        rel_pos_bias=rel_pos_bias,
        probe=probe,
        source=str(ck.path),
    )
    meta["official_entry"] = ck.entry
    meta["official_file"] = ck.path.name
    if ck.extras:
        meta["official_extras"] = ck.extras
        meta["notes"].append(f"not converted: top-level entries {ck.extras}")
    return state, meta


# ---- mimkit -> official ----


def _kind_from_mimkit(method: str | None, keys: set[str]) -> str:
    family = method if method in ("mae", "beit") else _family(keys)
    if family == "beit":
        if "lm_head.weight" in keys:
            return "beit-pretrain"
        return "beit-classifier" if "head.weight" in keys else "beit-encoder"
    if any(k.startswith("decoder_") for k in keys):
        return "mae-pretrain"
    if any(k.startswith("probe.") for k in keys):
        return "mae-linprobe"
    return "mae-classifier" if "head.weight" in keys else "mae-encoder"


def to_official(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    kind: OfficialKind | None = None,
) -> Tensors:
    """A mimkit state dict (flat, or ``encoder.``-prefixed module keys) -> official key names.

    ``kind``: the official layout to write; by default the metadata's ``official_kind`` (files
    imported by :func:`load_official`), else detected from the keys and ``method``. BEiT's
    ``relative_position_index`` buffers are regenerated (int64) beside each table and a linear
    probe's keys renamed back (``head.0.*`` BatchNorm, ``head.1.*`` linear). The result is checked
    by converting it back (strictly): it must give exactly the keys it came from.
    """
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
    flat = flat_state(state)
    mc = metadata.get("model_config") or {}
    method = metadata.get("method") or mc.get("method")
    kind = kind or metadata.get("official_kind") or _kind_from_mimkit(method, set(flat))
    if kind not in OFFICIAL_KINDS:
        raise ValueError(f"kind must be one of {OFFICIAL_KINDS}, got {kind!r}")
    family = kind.split("-")[0]
    if method in ("mae", "beit") and method != family:
        raise ValueError(f"kind {kind!r} does not fit the checkpoint's method {method!r}")
    inverse = {v: k for k, v in _PROBE_KEYS.items()}
    out: Tensors = {}
    indices: dict[int, torch.Tensor] = {}  # one per grid: blocks share it (one storage saved)
    for k, v in flat.items():
        out[inverse.get(k, k) if kind == "mae-linprobe" else k] = v
        if family == "beit" and k.endswith(_TABLE) and v.ndim == 2:
            g = _grid_from_table(v.shape[0], k)
            if g not in indices:
                indices[g] = gen_relative_position_index((g, g))
            out[k[: -len(_TABLE)] + _INDEX] = indices[g]
    if kind == "mae-linprobe":
        count = metadata.get("probe_num_batches_tracked", 0)
        if count is not None:
            out[_PROBE_COUNT] = torch.tensor(int(count), dtype=torch.long)
    dec = mc.get("decoder") if isinstance(mc.get("decoder"), Mapping) else {}
    # heads fix no key or shape except a relative position table's columns: the check below
    # works without them
    tables = [v for k, v in flat.items() if k.endswith(_TABLE) and v.ndim == 2]
    heads = mc.get("num_heads") or metadata.get("num_heads")
    heads = heads or (int(tables[0].shape[1]) if tables else 1)
    try:
        back, back_meta = convert_official(
            out,
            strict=True,
            num_heads=heads,
            decoder_num_heads=(dec.get("num_heads") or 1) if kind == "mae-pretrain" else None,
            img_size=mc.get("img_size") or metadata.get("img_size"),
            source=f"the {kind} export",
        )
    except ValueError as err:
        raise ValueError(f"the state does not fit the official {kind} layout: {err}") from None
    if back_meta["official_kind"] != kind:
        raise ValueError(
            f"the state holds an official {back_meta['official_kind']} model, not {kind!r} "
            f"(keys: {sorted(flat)[:6]} ...)"
        )
    if set(back) != set(flat):
        raise ValueError(
            f"the {kind} export would not load back to the same keys: "
            f"{sorted(set(back) ^ set(flat))[:8]}"
        )
    return out


def save_official(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    path: str | Path,
    *,
    kind: OfficialKind | None = None,
    entry: str = "model",
    include_args: bool = False,
) -> Path:
    """Write ``{entry: official state dict}`` with ``torch.save`` (atomically); returns ``path``.

    ``include_args`` adds ``'args'``: an ``argparse.Namespace`` of the metadata's ``args``
    fields (plain values only). Off by default: a Namespace needs an allow-list to be read with
    ``torch.load(weights_only=True)`` (:func:`read_official` has it, a plain load does not).
    """
    official = to_official(state, metadata, kind=kind)
    tensors = {k: v.detach().cpu() for k, v in official.items()}
    obj: dict[str, Any] = {entry: tensors}
    if include_args:
        fields = metadata.get("args") or {}
        plain = {k: _json_value(v) for k, v in fields.items()}
        obj["args"] = argparse.Namespace(**{k: v for k, v in plain.items() if v is not ...})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---- whole files: official .pth <-> mimkit .safetensors ----


def import_official(
    src: str | Path,
    dst: str | Path,
    *,
    strict: bool = True,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    rel_pos_bias: Literal["keep", "per_layer"] = "keep",
    probe: Literal["keep", "fold"] = "keep",
) -> Path:
    """An official ``.pth`` -> a mimkit ``.safetensors`` with provenance metadata; returns ``dst``.

    The file works wherever mimkit takes a checkpoint (encoders, full pretraining models and
    classifiers; a kept linear probe's ``probe.*`` keys are for :func:`export_official`).
    """
    from mimkit.engine.checkpoint import save_weights

    state, meta = load_official(
        src,
        strict=strict,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        img_size=img_size,
        rel_pos_bias=rel_pos_bias,
        probe=probe,
    )
    dst = Path(dst)
    save_weights(dst, state, meta)
    return dst


def export_official(
    checkpoint: str | Path,
    dst: str | Path,
    *,
    kind: OfficialKind | None = None,
    include_args: bool = False,
) -> Path:
    """A mimkit checkpoint (file or run directory) -> an official ``.pth``; returns ``dst``."""
    from mimkit.engine.checkpoint import load_weights
    from mimkit.models.loading import find_checkpoint

    path = find_checkpoint(checkpoint)
    state, meta = load_weights(path)
    if meta.get("format") != "mimkit":
        raise ValueError(f"{path} has no mimkit metadata: not a mimkit checkpoint")
    return save_official(state, meta, dst, kind=kind, include_args=include_args)
