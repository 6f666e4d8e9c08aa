"""WebDataset tar shards: write an image folder as shards, stream them, verify images.

Layout (:func:`write_shards`): ``OUT/shard-000000.tar``, ``shard-000001.tar`` ... and
``OUT/manifest.json`` (format, source, sample count, classes, and per shard its name, sample count
and sha256). A sample is the members ``KEY.EXT``, the original encoded image bytes (never
re-encoded), and ``KEY.cls``, the label as decimal text (labeled folders only). ``KEY`` is the
zero-padded index of the image in ``ImageFolder(src, max_samples=...)`` order, so a streamed
sample seeds its augmentation with ``sample_seed(seed, epoch, index)`` exactly like the folder
dataset under :class:`~mimkit.data.views.AugmentedView`, whatever shard it was written to.

Streaming (:class:`ShardStream`): the epoch's shard order is a seeded permutation of
(seed, epoch); the samples, concatenated in that order, are cut into ``world_size`` equal
contiguous ranges (the tail of ``total % world_size`` dropped, like ``DistributedSampler``), and a
rank's range into one contiguous part per DataLoader worker. Every sample is read once per epoch
by exactly one worker of one rank, every rank gets the same number of samples, and a worker reads
only the shards its part overlaps (local tar files are read with seeks past skipped members). A
seeded shuffle buffer (encoded bytes, decoded after it) mixes each part.

Safety: nothing is extracted to disk; images are decoded only by
:func:`~mimkit.data.datasets.load_image` (raster formats only, explicit L/RGB), never by
WebDataset's decoders; pickle-bearing members (``.pyd``, ``.pickle``, ``.pth`` ...) are skipped
unread and counted; ``pipe:`` URLs run a shell command and are refused without
``allow_pipe=True``; other URL schemes are refused.

Pretraining (``data.name: shards``, ``data.root``: the shard directory) builds a
``ShardStream`` in place of the folder's ``AugmentedView``; the trainer builds its DataLoader
without a sampler (each worker batches its own part), calls ``set_epoch`` every epoch and takes
:meth:`ShardStream.batches_per_epoch` as the epoch's length. A run resumed mid-epoch re-reads the
epoch and drops the batches it already trained on (the order is a function of seed and epoch,
so it continues exactly). Skip counts live in the process that decodes (a worker's counts stay
in the worker; every skip is logged).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from mimkit.data.datasets import IMAGE_SUFFIXES, BadImagePolicy, ImageFolder, load_image
from mimkit.data.views import sample_seed
from mimkit.ranks import rank as current_rank
from mimkit.ranks import world_size as current_world_size

__all__ = ["MANIFEST", "Shard", "ShardStream", "resolve_shards", "verify", "write_shards"]

MANIFEST = "manifest.json"
FORMAT, VERSION = "mimkit-shards", 1
IMAGE_EXTS = frozenset(s[1:] for s in IMAGE_SUFFIXES)
LABEL_EXTS = ("cls", "cls.txt")
# members whose decoding means unpickling: never read
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt"})
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str  # a local path, or a ``pipe:`` command
    samples: int
    sha256: str | None = None


def write_shards(
    src_folder: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    max_samples: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> Path:
    """Write the images of a folder (``ImageFolder`` rules) as tar shards plus ``manifest.json``.

    ``shard_size`` images per shard, in a seeded random order (``shuffle``) so that every shard
    mixes the classes. Each shard is written under a temporary name and renamed when complete;
    the manifest is written last, so a directory with a manifest is complete. ``out_dir`` must
    not exist or be empty. Returns ``out_dir``.
    """
    from webdataset import TarWriter

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = ImageFolder(src_folder, max_samples=max_samples)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; refusing to write")
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(folder)))
    if shuffle:
        random.Random(seed).shuffle(order)
    width = max(6, len(str(len(order) - 1)))
    shards: list[dict[str, Any]] = []
    created: list[Path] = []
    try:
        for start in range(0, len(order), shard_size):
            name = f"shard-{len(shards):06d}.tar"
            tmp, final = out / f".{name}.tmp", out / name
            created += [tmp, final]
            chunk = order[start : start + shard_size]
            with open(tmp, "wb") as f:
                # mtime 0 and raw bytes (no encoder): the same folder gives byte-identical shards
                with TarWriter(f, encoder=False, mtime=0, user="mimkit", group="mimkit") as tw:
                    for i in chunk:
                        path, label = folder.samples[i]
                        ext = path.suffix[1:].lower()
                        sample = {"__key__": f"{i:0{width}d}", ext: path.read_bytes()}
                        if label >= 0:
                            sample["cls"] = str(label).encode()
                        tw.write(sample)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            shards.append({"name": name, "samples": len(chunk), "sha256": _sha256(final)})
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": str(Path(src_folder).resolve()),
            "num_samples": len(order),
            "classes": list(folder.classes),
            "shuffled": shuffle,
            "seed": seed,
            "shards": shards,
        }
        created += [out / f".{MANIFEST}.tmp", out / MANIFEST]
        _write_json(out / MANIFEST, manifest)
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        raise
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def resolve_shards(
    source: str | Path | Sequence[str | Path],
    *,
    allow_pipe: bool = False,
    counts: Sequence[int] | None = None,
) -> tuple[list[Shard], dict[str, Any]]:
    """The shards of ``source`` and its manifest (``{}`` without one).

    ``source``: a shard directory or its ``manifest.json``; a ``.tar`` path or brace pattern
    (``data/shard-{000000..000009}.tar``); or a list of those. Sample counts come from the
    manifest, from ``counts``, or from the tar headers of local files (``pipe:`` sources need
    ``counts``).
    """
    if isinstance(source, (str, Path)) and not str(source).startswith("pipe:"):
        path = Path(source)
        if path.is_dir() or path.name == MANIFEST:
            return _from_manifest(path / MANIFEST if path.is_dir() else path)
    items = [source] if isinstance(source, (str, Path)) else list(source)
    urls = [_check_url(u, allow_pipe) for item in items for u in braceexpand(str(item))]
    if not urls:
        raise ValueError(f"no shards in {source!r}")
    if counts is None:
        if any(u.startswith("pipe:") for u in urls):
            raise ValueError("pipe: shards need counts= (e.g. from their manifest.json)")
        counts = [sum(1 for _ in _read_shard(u, load=False)) for u in urls]
    if len(counts) != len(urls):
        raise ValueError(f"{len(counts)} counts for {len(urls)} shards")
    return [Shard(u, int(n)) for u, n in zip(urls, counts, strict=True)], {}


def _from_manifest(path: Path) -> tuple[list[Shard], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (write shards with write_shards)")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} manifest")
        shards = []
        for s in manifest["shards"]:
            name = str(s["name"])
            if Path(name).name != name or name.startswith("."):  # never outside the directory
                raise ValueError(f"bad shard name {name!r}")
            shards.append(Shard(str(path.parent / name), int(s["samples"]), s.get("sha256")))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad manifest: {err}") from None
    return shards, manifest


def _check_url(url: str, allow_pipe: bool) -> str:
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", url)
    if scheme is None:
        path = url
    elif scheme.group(1) == "file":
        path = url[len("file://") :] if url.startswith("file://") else url[len("file:") :]
    elif scheme.group(1) == "pipe":
        if not allow_pipe:
            raise ValueError(f"{url!r}: refused: pipe: runs a shell command; pass allow_pipe=True")
        return url
    else:
        raise ValueError(f"{url!r}: unsupported URL scheme (local files, or pipe: with allow_pipe)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    return path


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    if url.startswith("pipe:"):  # only after _check_url(allow_pipe=True)
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                yield tar
        finally:
            stream.close()
    else:
        with tarfile.open(url, mode="r:*") as tar:  # random access: skipped members are seeked
            yield tar


def _split_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """``dir/key.ext.ext2`` -> (``dir/key``, ``ext.ext2``), WebDataset's rule; meta files: None."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    if m is None or m.group(1).rsplit("/", 1)[-1].startswith("__"):
        return None, None
    return m.group(1), m.group(2).lower()


def _unsafe_member(info: tarfile.TarInfo) -> bool:
    """A link, or a name that is absolute or climbs out (``..``): never read. (Shards are never
    extracted to disk, but such members have no business in a dataset.)"""
    parts = info.name.replace("\\", "/").split("/")
    return info.issym() or info.islnk() or info.name.startswith("/") or ".." in parts


@dataclass
class _Record:
    key: str
    members: dict[str, bytes]  # image and label members only
    unsafe: int  # pickle-bearing members skipped unread


def _read_shard(
    url: str, start: int = 0, stop: int | None = None, *, load: bool = True
) -> Iterator[_Record]:
    """The samples ``start <= ordinal < stop`` of one shard, in tar order (consecutive members
    with one key form a sample). ``load=False`` reads headers only (counting)."""
    stop = float("inf") if stop is None else stop
    ordinal, rec = -1, None
    with _open_tar(url) as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # TarFile keeps every header otherwise
            key, ext = _split_name(info.name)
            if key is None or not (info.isreg() or info.issym() or info.islnk()):
                continue  # directories, devices, WebDataset's __meta__ files
            if rec is None or key != rec.key:
                if rec is not None and ordinal >= start:
                    yield rec
                ordinal += 1
                if ordinal >= stop:
                    return
                rec = _Record(key, {}, 0)
            if ordinal < start or not load:
                continue
            if _unsafe_member(info) or ext.rsplit(".", 1)[-1] in UNSAFE_EXTS:
                rec.unsafe += 1  # never read
            elif ext in IMAGE_EXTS or ext in LABEL_EXTS:
                rec.members[ext] = tar.extractfile(info).read()
    if rec is not None and ordinal >= start:
        yield rec


class _BadSample(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _decode(rec: _Record, channels: int) -> tuple[torch.Tensor, int]:
    """(uint8 image (C, H, W), label) of a record; raises _BadSample."""
    ext = next((e for e in rec.members if e in IMAGE_EXTS), None)
    if ext is None:
        raise _BadSample("no_image", "no image member")
    try:
        img = load_image(io.BytesIO(rec.members[ext]), channels=channels, suffix=ext)
    except Exception as err:  # untrusted bytes: Pillow raises many types
        raise _BadSample("corrupt", f"{rec.key}.{ext}: {type(err).__name__}: {err}") from None
    raw = next((rec.members[e] for e in LABEL_EXTS if e in rec.members), None)
    try:
        label = -1 if raw is None else int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise _BadSample("bad_label", f"{rec.key}: label {raw[:20]!r}") from None
    return img, label


def key_index(key: str) -> int:
    """The sample index of a key: the number itself for mimkit's keys, else a stable hash."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """``(image, label)`` streamed from tar shards, split over ranks and DataLoader workers.

    ``image`` is uint8 (C, H, W) as :class:`~mimkit.data.datasets.ImageFolder` gives it, or
    ``transform(image, generator)`` with the generator seeded by ``sample_seed(seed, epoch,
    index)`` (``index`` from the sample's key), as :class:`~mimkit.data.views.AugmentedView`
    does. ``rank``/``world_size`` default to :mod:`mimkit.ranks`'s
    (``current_rank()``, ``current_world_size()`` here), read when the stream is built.
    ``skipped`` counts skipped samples by cause (``corrupt``, ``no_image``, ``bad_label``,
    ``bad_shard``) and pickle members left unread (``unsafe``). ``policy`` (a
    :class:`~mimkit.data.datasets.BadImagePolicy`) also lists undecodable images as
    ``SHARD:KEY`` in its report, and stops the stream in strict mode or over its limit."""

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        channels: int = 3,
        transform: Callable[[torch.Tensor, torch.Generator], Any] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        allow_pipe: bool = False,
        counts: Sequence[int] | None = None,
        policy: BadImagePolicy | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.shards, self.manifest = resolve_shards(source, allow_pipe=allow_pipe, counts=counts)
        self.classes = tuple(self.manifest.get("classes", ()))
        self.total = sum(s.samples for s in self.shards)
        self.rank = current_rank() if rank is None else rank
        self.world_size = current_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.total < self.world_size:
            raise ValueError(f"{self.total} samples for world size {self.world_size}")
        self.channels, self.transform, self.seed = channels, transform, seed
        self.shuffle, self.buffer_size, self.epoch = shuffle, buffer_size, 0
        self.skipped: Counter[str] = Counter()
        self.policy = policy

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples of this rank per epoch (fewer if some are skipped)."""
        return self.total // self.world_size

    def batches_per_epoch(self, batch_size: int, num_workers: int = 0) -> int:
        """Full batches a DataLoader with ``num_workers`` forms from this rank's part per epoch
        (each worker batches its own part; its last partial batch is dropped)."""
        workers = max(num_workers, 1)
        per_rank = len(self)
        parts = [per_rank * (w + 1) // workers - per_rank * w // workers for w in range(workers)]
        return sum(p // batch_size for p in parts)

    def plan(self, worker: int = 0, num_workers: int = 1) -> list[tuple[Shard, int, int]]:
        """This epoch's ``(shard, start, stop)`` sample ranges for one worker of this rank."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        per_rank = len(self)
        lo = self.rank * per_rank + per_rank * worker // num_workers
        hi = self.rank * per_rank + per_rank * (worker + 1) // num_workers
        pieces, offset = [], 0
        for i in order:  # the epoch's samples, shard after shard: keep [lo, hi)
            n = self.shards[i].samples
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                pieces.append((self.shards[i], a - offset, b - offset))
            offset += n
        return pieces

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        records = self._records(self.plan(worker, num_workers))
        if self.shuffle and self.buffer_size > 1:
            part = self.rank * num_workers + worker
            rng = random.Random(sample_seed(self.seed, self.epoch, part) ^ 0x5EED)
            records = _shuffled(records, self.buffer_size, rng)
        for shard, rec in records:
            try:
                img, label = _decode(rec, self.channels)
            except _BadSample as bad:
                self._skip(bad.kind, shard, rec.key, str(bad))
                if self.policy is not None and bad.kind == "corrupt":
                    self.policy.handle(f"{shard}:{rec.key}", bad)
                continue
            if self.transform is not None:
                index = key_index(rec.key)
                g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
                img = self.transform(img, g)
            yield img, label

    def _records(self, pieces: list[tuple[Shard, int, int]]) -> Iterator[tuple[str, _Record]]:
        for shard, start, stop in pieces:
            name = Path(shard.url).name if not shard.url.startswith("pipe:") else shard.url
            try:
                for rec in _read_shard(shard.url, start, stop):
                    if rec.unsafe:
                        self._skip(
                            "unsafe",
                            name,
                            rec.key,
                            "pickle, link or out-of-tree members unread",
                            rec.unsafe,
                        )
                    yield name, rec
            except (tarfile.TarError, OSError, EOFError) as err:
                self._skip("bad_shard", name, "-", f"unreadable: {err}")

    def _skip(self, kind: str, shard: str, key: str, detail: str, n: int = 1) -> None:
        self.skipped[kind] += n
        _log.warning("%s: sample %s (%s): %s", shard, key, kind, detail)


def verify(path: str | Path, *, report: str | Path | None = None) -> dict[str, Any]:
    """Decode every image of an image folder or a shard directory once.

    Returns ``{"path", "kind" (folder | shards), "images", "ok", "bad", "bad_shards", "unsafe",
    "problems"}``: ``bad`` images, ``bad_shards`` shard-level problems (unreadable tar, sha256 or
    sample count differing from the manifest), ``unsafe`` pickle members left unread;
    ``problems`` lists each bad file (``path``) or sample (``shard``, ``key``; ``-`` for the
    shard itself) with its error. ``report``: also write that as JSON.
    """
    path = Path(path)
    problems: list[dict[str, str]] = []
    images = unsafe = 0
    if (path.is_dir() and (path / MANIFEST).is_file()) or path.suffix == ".tar":
        kind = "shards"
        shards, _ = resolve_shards(path)
        for shard in shards:
            name = Path(shard.url).name
            if shard.sha256 and _sha256(Path(shard.url)) != shard.sha256:
                problems.append({"shard": name, "key": "-", "error": "sha256 != manifest's"})
            found = 0
            try:
                for rec in _read_shard(shard.url):
                    found, unsafe, images = found + 1, unsafe + rec.unsafe, images + 1
                    try:
                        _decode(rec, 3)
                    except _BadSample as bad:
                        problems.append({"shard": name, "key": rec.key, "error": str(bad)})
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append({"shard": name, "key": "-", "error": f"unreadable: {err}"})
            if found != shard.samples:
                msg = f"{found} samples, the manifest says {shard.samples}"
                problems.append({"shard": name, "key": "-", "error": msg})
    else:
        kind = "folder"
        for file, _label in ImageFolder(path).samples:
            images += 1
            try:
                load_image(file, channels=3)
            except Exception as err:  # untrusted bytes: Pillow raises many types
                problems.append({"path": str(file), "error": f"{type(err).__name__}: {err}"})
    bad_shards = sum(p.get("key") == "-" for p in problems)
    bad = len(problems) - bad_shards
    result = {"path": str(path), "kind": kind, "images": images, "ok": images - bad, "bad": bad}
    result.update(bad_shards=bad_shards, unsafe=unsafe, problems=problems)
    if report is not None:
        _write_json(Path(report), result)
    return result
