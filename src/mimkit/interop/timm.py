"""timm checkpoints: mimkit encoders and classifiers out to timm, timm weights in.

mimkit's encoders hold timm's state-dict keys already (``VisionTransformer`` for MAE,
``Beit`` for BEiT; classifiers add ``fc_norm``/``head`` as timm's ``global_pool="avg"``), so the
conversion is a choice of timm model name and constructor arguments, checked by building that
timm model and loading the weights strictly.

Export writes a folder with timm's own writer (:func:`timm.models.save_for_hf`): ``config.json``
(``architecture``, ``model_args``, ``pretrained_cfg`` with the input size and the training data's
mean/std, plus the mimkit provenance under ``"mimkit"``) and ``model.safetensors``. Either of
these loads it, without mimkit::

    timm.create_model("local-dir:OUT", pretrained=True)
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(
        file="OUT/model.safetensors", num_classes=N, input_size=..., mean=..., std=...),
        **MODEL_ARGS)

with ``NAME``, ``N`` and ``MODEL_ARGS`` as recorded in ``config.json`` (``mimkit convert`` prints
the call). ``num_classes`` belongs in the overlay: timm drops a checkpoint's classifier whose
size differs from the pretrained config's.
timm has no MAE decoder nor BEiT MIM head: a full pretraining checkpoint exports its encoder.

Import reads such a folder (or a bare timm ``.safetensors`` of a ViT or a BEiT) and converts it
like an official checkpoint (:func:`mimkit.interop.official.convert_official`: kind from the
keys, architecture from the shapes, strict key check), taking the heads, image size and
normalization from ``config.json`` when there is one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mimkit.interop.format import (
    SHOWN_KEYS,
    Exported,
    Format,
    folder_config,
    model_parts,
    tensor_counts,
    written_notes,
)
from mimkit.interop.spec import Tensors, flat_state

__all__ = [
    "FORMAT",
    "TimmFormat",
    "export_timm",
    "import_timm",
    "read_timm",
    "timm_model_spec",
    "to_timm_model",
]

# the timm name recorded for a ViT of this width (the arguments fix the rest of the shape)
_VIT_NAMES = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
    1280: "vit_huge_patch14_224",
}
_BEIT_NAMES = {768: "beit_base_patch16_224", 1024: "beit_large_patch16_224"}
_NOT_TIMM = ("decoder_", "mask_token", "lm_head.", "probe.")  # pretraining / probe keys


def timm_model_spec(metadata: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[str, dict]:
    """(timm model name, constructor arguments) of a mimkit encoder or classifier checkpoint."""
    mc = metadata.get("model_config")
    if not isinstance(mc, Mapping):
        raise ValueError("the checkpoint has no mimkit metadata 'model_config'")
    kind = metadata.get("kind")
    if kind in ("segmenter", "detector"):
        raise ValueError(
            f"a {kind} checkpoint has no timm counterpart: export the pretrained encoder it was "
            "initialized from instead"
        )
    method = mc.get("method")
    classifier = "head.weight" in state
    args: dict[str, Any] = {
        "img_size": int(mc["img_size"]),
        "patch_size": int(mc["patch_size"]),
        "in_chans": int(mc["in_chans"]),
        "embed_dim": int(mc["embed_dim"]),
        "depth": int(mc["depth"]),
        "num_heads": int(mc["num_heads"]),
        "mlp_ratio": float(mc["mlp_ratio"]),
        "num_classes": int(state["head.weight"].shape[0]) if classifier else 0,
    }
    avg = classifier and "fc_norm.weight" in state
    if method == "mae":
        args["global_pool"] = "avg" if avg else "token"
        name = _VIT_NAMES.get(args["embed_dim"], "vit_base_patch16_224")
    elif method == "beit":
        rel = mc.get("rel_pos_bias") or "none"
        args.update(
            global_pool="avg" if avg else "token",
            use_fc_norm=avg,
            use_abs_pos_emb=bool(mc.get("abs_pos_emb")),
            use_rel_pos_bias=rel == "per_layer",
            use_shared_rel_pos_bias=rel == "shared",
            # timm's create_model drops None arguments (the name's default, 0.1, would win):
            # 0.0 is its other spelling of "no layer scale"
            init_values=mc.get("layer_scale") or 0.0,
        )
        name = _BEIT_NAMES.get(args["embed_dim"], "beit_base_patch16_224")
    else:
        raise ValueError(f"model_config.method must be 'mae' or 'beit', got {method!r}")
    return name, args


def to_timm_model(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> tuple[torch.nn.Module, str, dict[str, Any], list[str]]:
    """A mimkit checkpoint -> (timm model with its weights, name, arguments, notes).

    Pretraining-only keys (MAE decoder, mask token, BEiT MIM head) and linear-probe keys are
    dropped with a note; every other key must load into the timm model strictly.
    """
    import timm

    flat = flat_state(state)
    dropped = sorted(k for k in flat if k.startswith(_NOT_TIMM))
    kept = {k: v for k, v in flat.items() if not k.startswith(_NOT_TIMM)}
    name, args = timm_model_spec(metadata, kept)
    model = timm.create_model(name, pretrained=False, **args)
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit timm's {name}({_args_text(args)}): missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    notes = []
    if dropped:
        prefixes = sorted({k.split(".")[0] for k in dropped})
        notes.append(f"not in timm's {name}, left out: {', '.join(prefixes)} ({len(dropped)} keys)")
    return model.eval(), name, args, notes


def _args_text(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def export_timm(checkpoint: str | Path, folder: str | Path) -> dict[str, Any]:
    """A mimkit checkpoint (file or run directory) -> a timm folder; returns what was written.

    The result holds ``folder``, ``name``, ``model_args``, ``pretrained_cfg_overlay``, ``notes``
    and ``create_model``: the Python call that loads the folder by name.
    """
    from timm.models import save_for_hf

    from mimkit.engine.checkpoint import load_weights
    from mimkit.models.loading import find_checkpoint

    path = find_checkpoint(checkpoint)
    state, meta = load_weights(path)
    if meta.get("format") != "mimkit":
        raise ValueError(f"{path} has no mimkit metadata: not a mimkit checkpoint")
    model, name, args, notes = to_timm_model(state, meta)
    folder = Path(folder)
    data: dict[str, Any] = {"input_size": (args["in_chans"], args["img_size"], args["img_size"])}
    if meta.get("mean") is not None and meta.get("std") is not None:
        data.update(mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    provenance = {k: v for k, v in meta.items() if k not in ("model_config",)}
    model_config: dict[str, Any] = {"mimkit": {**provenance, "source_file": path.name}}
    if meta.get("classes"):
        model_config["label_names"] = list(meta["classes"])
    save_for_hf(
        model,
        str(folder),
        model_config=model_config,
        model_args=args,
        safe_serialization=True,
        data_config=data,
    )
    # num_classes: timm drops a checkpoint's head when it differs from the name's default (1000)
    overlay = {
        "file": str(folder / "model.safetensors"),
        "num_classes": args["num_classes"],
        **data,
    }
    call = (
        f"timm.create_model({name!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict({_args_text(overlay)}), {_args_text(args)})"
    )
    return {
        "folder": folder,
        "name": name,
        "model_args": args,
        "pretrained_cfg_overlay": overlay,
        "notes": notes,
        "create_model": call,
    }


def read_timm(src: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """(state dict, timm ``config.json`` or {}) of a timm folder or a bare ``.safetensors``.

    Reads safetensors only; a folder with only ``pytorch_model.bin`` is read with
    :func:`mimkit.interop.official.read_official`'s weights-only loader.
    """
    from safetensors.torch import load_file

    src = Path(src)
    config: dict[str, Any] = {}
    if src.is_dir():
        cfg_file = src / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{src}: no config.json (not a timm folder)")
        config = json.loads(cfg_file.read_text())
        if "architecture" not in config:
            raise ValueError(f"{cfg_file}: no 'architecture' field (not a timm config)")
        weights = src / "model.safetensors"
        if not weights.is_file():
            if (src / "pytorch_model.bin").is_file():
                from mimkit.interop.official import read_official

                return dict(read_official(src / "pytorch_model.bin").state), config
            raise FileNotFoundError(f"{src}: no model.safetensors or pytorch_model.bin")
        return load_file(str(weights)), config
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if src.suffix != ".safetensors":
        raise ValueError(f"{src}: a timm checkpoint is a folder or a .safetensors file")
    return load_file(str(src)), config


def _square(size: Any) -> int | None:
    """timm records ``img_size`` as an int or a pair; mimkit's models are square."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"model_args.img_size={list(size)}: mimkit takes square images only")
        size = size[0]
    return None if size is None else int(size)


def import_timm(
    src: str | Path,
    dst: str | Path,
    *,
    strict: bool = True,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> Path:
    """A timm folder or ``.safetensors`` (ViT or BEiT) -> a mimkit ``.safetensors``; returns dst.

    ``num_heads`` (a plain ViT's heads are in no tensor shape) and ``img_size`` default to the
    folder's ``config.json``, else as :func:`~mimkit.interop.official.convert_official` infers.
    """
    from mimkit.engine.checkpoint import save_weights
    from mimkit.interop.official import convert_official

    state, config = read_timm(src)
    margs = config.get("model_args") or {}
    pcfg = config.get("pretrained_cfg") or {}
    state, meta = convert_official(
        state,
        strict=strict,
        num_heads=num_heads or margs.get("num_heads"),
        img_size=img_size or _square(margs.get("img_size")),
        source=str(src),
    )
    meta["source"] = f"timm:{config.get('architecture', 'safetensors')}"
    meta.pop("official_kind", None)
    mean, std = pcfg.get("mean"), pcfg.get("std")
    if mean is not None and std is not None and len(mean) == meta["in_chans"]:
        meta["mean"], meta["std"] = list(pcfg["mean"]), list(pcfg["std"])
    if config.get("label_names") and meta.get("kind") == "classifier":
        meta["classes"] = list(config["label_names"])
    if isinstance(config.get("mimkit"), Mapping):  # a mimkit export: its provenance comes back
        for k, v in config["mimkit"].items():
            meta.setdefault(k, v)
    dst = Path(dst)
    save_weights(dst, state, meta)
    return dst


class TimmFormat(Format):
    """A timm folder (``config.json`` with ``architecture``) or a bare timm ``.safetensors``."""

    name = "timm"

    def recognise(self, path: Path) -> bool:
        """A folder whose ``config.json`` names an ``architecture``, or a ``.safetensors``
        without mimkit metadata."""
        from mimkit.engine.checkpoint import read_metadata

        if path.is_dir():
            config = folder_config(path)
            return config is not None and "architecture" in config
        return path.suffix == ".safetensors" and read_metadata(path).get("format") != "mimkit"

    def describe(self, path: Path) -> dict[str, Any]:
        """Sizes, parts, and the folder's timm config (a bare file: what an import would find)."""
        from mimkit.interop.official.to_mimkit import preview_official

        state, config = read_timm(path)
        info: dict[str, Any] = {**tensor_counts(state), **model_parts(state)}
        if config:
            info["architecture"] = config.get("architecture")
            info["num_classes"] = config.get("num_classes")
            info["model_args"] = config.get("model_args")
            pcfg = config.get("pretrained_cfg") or {}
            info.update({k: pcfg[k] for k in ("input_size", "mean", "std") if k in pcfg})
            if isinstance(config.get("mimkit"), Mapping):
                info["mimkit"] = {k: v for k, v in config["mimkit"].items() if k in SHOWN_KEYS}
        else:
            meta, _ = preview_official(state, None)
            keep = ("kind", "method", "img_size", "patch_size", "in_chans", "embed_dim", "depth")
            info.update({k: meta[k] for k in keep if k in meta})
        return info

    def to_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> list[str]:
        """:func:`import_timm` (``strict``, ``num_heads``, ``img_size``)."""
        taken = {k: v for k, v in options.items() if k in ("strict", "num_heads", "img_size")}
        import_timm(src, dst, **taken)
        return written_notes(dst)

    def from_mimkit(self, src: Path, dst: Path, options: Mapping[str, Any]) -> Exported:
        """:func:`export_timm`; the details hold the ``timm.create_model`` call."""
        result = export_timm(src, dst)
        return list(result["notes"]), {"create_model": result["create_model"]}


FORMAT = TimmFormat()
