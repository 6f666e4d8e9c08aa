"""One entry point over every checkpoint format: ``mimkit convert`` and ``mimkit inspect``.

Formats (``FORMATS``) and what stands for them on disk:

- ``mimkit``: a ``.safetensors`` with mimkit provenance metadata, or a run / checkpoint directory;
- ``official``: an official MAE / BEiT ``.pth`` (read with :mod:`mimkit.interop.official`'s
  weights-only allow-list);
- ``hf``: a Hugging Face ``save_pretrained`` folder (``config.json`` with ``model_type``);
- ``timm``: a timm folder (``config.json`` with ``architecture``) or a bare timm ``.safetensors``;
- ``dalle``: OpenAI's DALL-E dVAE ``encoder.pkl`` / ``decoder.pkl`` (in only, ``trust_pickle``).

Every conversion goes through mimkit's own format: ``X -> mimkit`` imports, ``mimkit -> Y``
exports, ``X -> Y`` does both through a temporary file. :func:`describe` says what a file or
folder is (format, method, kind, target, decoder/head, sizes, provenance) without running any
pickle: official files are read with the allow-list, DALL-E pickles are not opened.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "ConversionReport", "convert", "describe", "detect_format"]

FORMATS: tuple[str, ...] = ("mimkit", "official", "hf", "timm", "dalle")
_TARGETS = ("mimkit", "official", "hf", "timm")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


@dataclass
class ConversionReport:
    src: Path
    dst: Path
    src_format: str
    dst_format: str
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. timm's create_model call


def detect_format(path: str | Path) -> str:
    """The format ``path`` is in (one of :data:`FORMATS`), from its name and a safe peek."""
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg}: not valid JSON ({err})") from None
            if isinstance(data, dict) and "architecture" in data:
                return "timm"
            if isinstance(data, dict) and "model_type" in data:
                return "hf"
        from mimkit.models.loading import find_checkpoint

        find_checkpoint(p)  # raises with what a run directory should hold
        return "mimkit"
    if not p.is_file():
        raise FileNotFoundError(f"not found: {p}")
    if p.suffix == ".pkl":
        return "dalle"
    if p.suffix in _PICKLE_SUFFIXES:
        return "official"
    if p.suffix == ".safetensors":
        from mimkit.engine.checkpoint import read_metadata

        return "mimkit" if read_metadata(p).get("format") == "mimkit" else "timm"
    raise ValueError(
        f"{p}: cannot tell its format from the name (a .safetensors, .pth or .pkl file, or a "
        "folder); pass the format explicitly"
    )


def _import(src: Path, fmt: str, dst: Path, opts: Mapping[str, Any]) -> list[str]:
    from mimkit.engine.checkpoint import read_metadata

    if fmt == "official":
        from mimkit.interop.official import import_official

        import_official(
            src,
            dst,
            strict=opts.get("strict", True),
            num_heads=opts.get("num_heads"),
            decoder_num_heads=opts.get("decoder_num_heads"),
            img_size=opts.get("img_size"),
            rel_pos_bias=opts.get("rel_pos_bias", "keep"),
            probe=opts.get("probe", "keep"),
        )
    elif fmt == "hf":
        from mimkit.interop.hf import import_from_hf

        import_from_hf(src, dst, architecture=opts.get("architecture"))
    elif fmt == "timm":
        from mimkit.interop.timm import import_timm

        import_timm(
            src,
            dst,
            strict=opts.get("strict", True),
            num_heads=opts.get("num_heads"),
            img_size=opts.get("img_size"),
        )
    elif fmt == "dalle":
        from mimkit.interop.dalle import convert_dalle_pickle

        if not opts.get("trust_pickle"):
            raise PermissionError(
                f"{src} is a pickle, and loading a pickle can run arbitrary code: pass "
                "trust_pickle (--trust-pickle) only for files from a source you trust (OpenAI's "
                "published encoder.pkl/decoder.pkl)"
            )
        convert_dalle_pickle(src, dst, trust_pickle=True)
        return []
    else:
        raise ValueError(f"cannot import from {fmt!r}")
    notes = read_metadata(dst).get("notes") or []
    return [str(n) for n in notes]


def _export(src: Path, fmt: str, dst: Path, opts: Mapping[str, Any]) -> tuple[list[str], dict]:
    if fmt == "official":
        from mimkit.interop.official import export_official

        export_official(
            src, dst, kind=opts.get("kind"), include_args=opts.get("include_args", False)
        )
        return [], {}
    if fmt == "hf":
        from mimkit.interop.hf import export_to_hf

        export_to_hf(src, dst, architecture=opts.get("architecture"))
        return [], {}
    if fmt == "timm":
        from mimkit.interop.timm import export_timm

        result = export_timm(src, dst)
        return list(result["notes"]), {"create_model": result["create_model"]}
    raise ValueError(f"cannot export to {fmt!r}")


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    src_format: str = "auto",
    dst_format: str = "mimkit",
    **opts: Any,
) -> ConversionReport:
    """Convert ``src`` (in ``src_format``, "auto" to detect) to ``dst`` in ``dst_format``.

    ``opts`` go to the importer / exporter that takes them: ``strict``, ``num_heads``,
    ``decoder_num_heads``, ``img_size``, ``rel_pos_bias``, ``probe`` (official and timm in),
    ``architecture`` (the HF class written, or read when the target is not HF), ``kind`` and
    ``include_args`` (official out), ``trust_pickle`` (DALL-E in). Files are written atomically
    (safetensors, ``.pth``), folders file by file.
    """
    src, dst = Path(src), Path(dst)
    if src_format == "auto":
        src_format = detect_format(src)
    if src_format not in FORMATS:
        raise ValueError(f"--from must be one of {('auto', *FORMATS)}, got {src_format!r}")
    if dst_format not in _TARGETS:
        raise ValueError(f"--to must be one of {_TARGETS}, got {dst_format!r}")
    if not src.exists():
        raise FileNotFoundError(f"not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input")
    if dst_format == "mimkit" and dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: a mimkit checkpoint is a .safetensors file")
    if dst_format == "official" and dst.suffix not in _PICKLE_SUFFIXES:
        raise ValueError(f"{dst}: an official checkpoint is a .pth file")
    if src_format == "dalle" and dst_format != "mimkit":
        raise ValueError("a DALL-E dVAE converts to mimkit only (a tokenizer .safetensors)")
    report = ConversionReport(src, dst, src_format, dst_format)
    if src_format == dst_format == "mimkit":
        raise ValueError(f"{src} is a mimkit checkpoint already: choose --to official, hf or timm")
    if src_format == "mimkit":
        report.notes, report.details = _export(src, dst_format, dst, opts)
        return report
    if dst_format == "mimkit":
        report.notes = _import(src, src_format, dst, opts)
        return report
    with tempfile.TemporaryDirectory(prefix="mimkit-convert-") as tmp:
        mid = Path(tmp) / "model.safetensors"
        import_opts = dict(opts)
        if dst_format == "hf":  # ``architecture`` names the HF class written, not the one read
            import_opts.pop("architecture", None)
        report.notes = _import(src, src_format, mid, import_opts)
        notes, report.details = _export(mid, dst_format, dst, opts)
        report.notes += notes
    return report


# ---- inspect ----

_SHOWN = (
    "kind", "method", "layout", "target", "vocab_size", "tokenizer", "mask_strategy",
    "mask_ratio", "num_masked", "loss_on", "arch", "img_size", "patch_size", "in_chans",
    "embed_dim", "depth", "num_heads", "mlp_ratio", "includes_decoder", "num_classes", "pool",
    "classes", "mean", "std", "dataset", "epochs", "step", "epoch", "label_fraction", "init",
    "pretrain", "source", "official_kind", "created", "mimkit_version",
)  # fmt: skip


_NOT_OFFICIAL = ("num_heads", "mimkit_version", "created")  # a guess / mimkit's, not the file's


def _count(state: Mapping[str, Any]) -> tuple[int, int]:
    return len(state), int(sum(v.numel() for v in state.values()))


def _has(state: Mapping[str, Any], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in state)


def _parts(state: Mapping[str, Any]) -> dict[str, bool]:
    return {
        "has_decoder": _has(state, ("decoder_", "lm_head.")),
        "has_head": "head.weight" in state or _has(state, ("head.1.", "probe.head.")),
    }


def _peek(state: Mapping[str, Any], args: Any) -> tuple[dict[str, Any], bool]:
    """(metadata an import would record, whether heads had to be guessed): shapes only."""
    from mimkit.interop.official import convert_official

    for heads, dec_heads in ((None, None), (None, 1), (1, 1)):
        try:
            _, meta = convert_official(
                state, args=args, strict=False, num_heads=heads, decoder_num_heads=dec_heads
            )
            return meta, heads is not None
        except ValueError as err:
            if "heads" not in str(err) or heads == 1:
                raise
    raise AssertionError("unreachable")


def describe(path: str | Path, *, fmt: str = "auto") -> dict[str, Any]:
    """What a checkpoint is: format, method, kind, target, decoder/head, sizes and provenance."""
    p = Path(path)
    fmt = detect_format(p) if fmt == "auto" else fmt
    info: dict[str, Any] = {"path": str(p), "format": fmt}
    if fmt == "mimkit":
        from mimkit.engine.checkpoint import load_weights
        from mimkit.models.loading import find_checkpoint

        file = find_checkpoint(p)
        state, meta = load_weights(file)
        info["file"] = str(file)
        info["tensors"], info["parameters"] = _count(state)
        info.update(_parts(state))
        info.update({k: meta[k] for k in _SHOWN if k in meta})
        info["metadata"] = meta
    elif fmt == "official":
        from mimkit.interop.official import read_official

        ck = read_official(p)
        info["tensors"], info["parameters"] = _count(ck.state)
        info.update(_parts(ck.state))
        meta, guessed = _peek(ck.state, ck.args)
        skip = _NOT_OFFICIAL if guessed else _NOT_OFFICIAL[1:]
        info.update({k: meta[k] for k in _SHOWN if k in meta and k not in skip})
        info["entry"], info["other_entries"] = ck.entry, ck.extras
        if ck.args:
            info["args"] = ck.args
    elif fmt == "timm":
        from mimkit.interop.timm import read_timm

        state, config = read_timm(p)
        info["tensors"], info["parameters"] = _count(state)
        info.update(_parts(state))
        if config:
            info["architecture"] = config.get("architecture")
            info["num_classes"] = config.get("num_classes")
            info["model_args"] = config.get("model_args")
            pcfg = config.get("pretrained_cfg") or {}
            info.update({k: pcfg[k] for k in ("input_size", "mean", "std") if k in pcfg})
            if isinstance(config.get("mimkit"), Mapping):
                info["mimkit"] = {k: v for k, v in config["mimkit"].items() if k in _SHOWN}
        else:
            meta, _ = _peek(state, None)
            keep = ("kind", "method", "img_size", "patch_size", "in_chans", "embed_dim", "depth")
            info.update({k: meta[k] for k in keep if k in meta})
    elif fmt == "hf":
        from mimkit.interop.hf import load_hf_folder

        state, config = load_hf_folder(p)
        info["tensors"], info["parameters"] = _count(state)
        arch = (config.get("architectures") or [None])[0]
        info["architecture"], info["model_type"] = arch, config.get("model_type")
        names = {
            "image_size": "img_size", "patch_size": "patch_size", "num_channels": "in_chans",
            "hidden_size": "embed_dim", "num_hidden_layers": "depth",
            "num_attention_heads": "num_heads", "mask_ratio": "mask_ratio",
            "norm_pix_loss": "norm_pix_loss", "vocab_size": "vocab_size",
        }  # fmt: skip
        info.update({ours: config[hf] for hf, ours in names.items() if hf in config})
        info["has_decoder"] = arch in ("ViTMAEForPreTraining", "BeitForMaskedImageModeling")
        info["has_head"] = bool(arch and arch.endswith("ForImageClassification"))
        if arch and arch.endswith("ForImageClassification"):
            info["num_classes"] = len(config.get("id2label") or {}) or None
    elif fmt == "dalle":
        info["note"] = (
            "a pickle (OpenAI's DALL-E dVAE?): not opened, unpickling can run code; convert it "
            "with `mimkit convert --from dalle --trust-pickle IN OUT.safetensors` if you trust it"
        )
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return info
