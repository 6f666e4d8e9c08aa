"""One entry point over every checkpoint format: ``mimkit convert`` and ``mimkit inspect``.

Formats (``FORMATS``) and what stands for them on disk:

- ``mimkit``: a ``.safetensors`` with mimkit provenance metadata, or a run / checkpoint directory;
- ``official``: an official MAE / BEiT ``.pth`` (read with :mod:`mimkit.interop.official`'s
  weights-only allow-list);
- ``hf``: a Hugging Face ``save_pretrained`` folder (``config.json`` with ``model_type``);
- ``timm``: a timm folder (``config.json`` with ``architecture``) or a bare timm ``.safetensors``;
- ``dalle``: OpenAI's DALL-E dVAE ``encoder.pkl`` / ``decoder.pkl`` (in only, ``trust_pickle``).

Each is a :class:`~mimkit.interop.format.Format`, found through one table; this module only
dispatches. Every conversion goes through mimkit's own format: ``X -> mimkit`` imports,
``mimkit -> Y`` exports, ``X -> Y`` does both through a temporary file. :func:`describe` says
what a file or folder is (format, method, kind, target, decoder/head, sizes, provenance) without
running any pickle: official files are read with the allow-list, DALL-E pickles are not opened.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mimkit.interop.format import Format

__all__ = ["FORMATS", "ConversionReport", "convert", "describe", "detect_format"]

# format -> the module whose FORMAT implements it, imported when first used: the command-line
# parsers read FORMATS without importing PyTorch
_FORMATS = {
    "mimkit": "mimkit.interop.format",
    "official": "mimkit.interop.official.format",
    "hf": "mimkit.interop.hf.format",
    "timm": "mimkit.interop.timm",
    "dalle": "mimkit.interop.dalle",
}
FORMATS: tuple[str, ...] = tuple(_FORMATS)


def _format(name: str) -> Format:
    return importlib.import_module(_FORMATS[name]).FORMAT


@dataclass
class ConversionReport:
    """What :func:`convert` did."""

    src: Path
    dst: Path
    src_format: str
    dst_format: str
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. timm's create_model call


def detect_format(path: str | Path) -> str:
    """The format ``path`` is in (one of :data:`FORMATS`), from its name and a safe peek."""
    p = Path(path)
    if not (p.is_dir() or p.is_file()):
        raise FileNotFoundError(f"not found: {p}")
    # mimkit's own is asked last: a folder no model format claims is a run directory
    for name in (*(n for n in FORMATS if n != "mimkit"), "mimkit"):
        if _format(name).recognise(p):
            return name
    raise ValueError(
        f"{p}: cannot tell its format from the name (a .safetensors, .pth or .pkl file, or a "
        "folder); pass the format explicitly"
    )


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
    targets = tuple(n for n in FORMATS if _format(n).one_way is None)
    if dst_format not in targets:
        raise ValueError(f"--to must be one of {targets}, got {dst_format!r}")
    if not src.exists():
        raise FileNotFoundError(f"not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input")
    reader, writer = _format(src_format), _format(dst_format)
    writer.check_output(dst)
    if reader.one_way is not None and dst_format != "mimkit":
        raise ValueError(reader.one_way)
    report = ConversionReport(src, dst, src_format, dst_format)
    if src_format == "mimkit":
        report.notes, report.details = writer.from_mimkit(src, dst, opts)
        return report
    if dst_format == "mimkit":
        report.notes = reader.to_mimkit(src, dst, opts)
        return report
    with tempfile.TemporaryDirectory(prefix="mimkit-convert-") as tmp:
        mid = Path(tmp) / "model.safetensors"
        import_opts = dict(opts)
        if dst_format == "hf":  # ``architecture`` names the HF class written, not the one read
            import_opts.pop("architecture", None)
        report.notes = reader.to_mimkit(src, mid, import_opts)
        notes, report.details = writer.from_mimkit(mid, dst, opts)
        report.notes += notes
    return report


def describe(path: str | Path, *, fmt: str = "auto") -> dict[str, Any]:
    """What a checkpoint is: format, method, kind, target, decoder/head, sizes and provenance."""
    p = Path(path)
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return {"path": str(p), "format": fmt, **_format(fmt).describe(p)}
