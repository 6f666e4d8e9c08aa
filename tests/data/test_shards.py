import io
import json
import logging
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mimkit.data import AugmentedView, ImageFolder
from mimkit.data import shards as shards_mod
from mimkit.data.shards import ShardStream, verify, write_shards


def _image_bytes(rng: np.random.Generator, fmt: str, size: int = 16) -> bytes:
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """24 images (PNG and JPEG) in two class subfolders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            ext, fmt = ("png", "PNG") if (i + c) % 3 else ("jpg", "JPEG")
            (root / cls / f"{i:02d}.{ext}").write_bytes(_image_bytes(rng, fmt))
    return root


def _key(img: torch.Tensor) -> bytes:
    return img.numpy().tobytes()


def _collect(stream) -> list[tuple[torch.Tensor, int]]:
    return [(img, label) for img, label in stream]


def test_streamed_shards_give_the_folder_once_per_epoch(folder, tmp_path):
    out = write_shards(folder, tmp_path / "shards", shard_size=5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 24 and manifest["classes"] == ["cat", "dog"]
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 4]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        *(f"shard-{i:06d}.tar" for i in range(5)),
    ]
    # raw bytes, fixed mtime: the same folder gives byte-identical shards
    again = json.loads((write_shards(folder, tmp_path / "again", shard_size=5) / "manifest.json")
                       .read_text())  # fmt: skip
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]

    ref = ImageFolder(folder)
    expected = {_key(img): label for img, label in (ref[i] for i in range(len(ref)))}
    assert len(expected) == 24
    stream = ShardStream(out, buffer_size=8, seed=3)
    assert len(stream) == 24 and stream.classes == ("cat", "dog")
    epoch0 = _collect(stream)
    assert len(epoch0) == 24
    assert {_key(img): label for img, label in epoch0} == expected  # pixel-equal, each once
    assert all(img.dtype == torch.uint8 and img.shape == (3, 16, 16) for img, _ in epoch0)
    same = _collect(stream)
    stream.set_epoch(1)
    epoch1 = _collect(stream)
    assert [_key(i) for i, _ in same] == [_key(i) for i, _ in epoch0]  # deterministic
    assert [_key(i) for i, _ in epoch1] != [_key(i) for i, _ in epoch0]  # reshuffled
    assert {_key(img): label for img, label in epoch1} == expected
    assert sum(stream.skipped.values()) == 0


def test_transform_is_seeded_like_augmented_view(folder, tmp_path):
    def transform(img, g):  # the image, and a draw from the sample's generator
        return img, int(torch.randint(1 << 30, (1,), generator=g))

    out = write_shards(folder, tmp_path / "shards", shard_size=7, max_samples=20)
    view = AugmentedView(ImageFolder(folder, max_samples=20), transform, seed=5)
    stream = ShardStream(out, transform=transform, seed=5, buffer_size=4)
    for epoch in (0, 2):
        view.set_epoch(epoch)
        stream.set_epoch(epoch)
        expected = {_key(img): (draw, label) for (img, draw), label in view}
        got = {_key(img): (draw, label) for (img, draw), label in stream}
        assert got == expected and len(got) == 20


def test_ranks_and_workers_split_disjoint_and_complete(folder, tmp_path, monkeypatch):
    out = write_shards(folder, tmp_path / "shards", shard_size=5)
    parts = []
    for r in range(2):
        monkeypatch.setattr(shards_mod, "current_rank", lambda r=r: r)
        monkeypatch.setattr(shards_mod, "current_world_size", lambda: 2)
        stream = ShardStream(out, buffer_size=6)
        assert (stream.rank, stream.world_size, len(stream)) == (r, 2, 12)
        parts.append({_key(img) for img, _ in stream})
    assert len(parts[0]) == len(parts[1]) == 12 and not parts[0] & parts[1]
    everything = {_key(img) for img, _ in ShardStream(out, rank=0, world_size=1)}
    assert parts[0] | parts[1] == everything and len(everything) == 24

    # 2 ranks x 3 workers: the sample ranges of the plan tile the epoch exactly
    ranges = []
    for r in range(2):
        stream = ShardStream(out, rank=r, world_size=2)
        stream.set_epoch(4)
        for w in range(3):
            ranges += [(s.url, i) for s, a, b in stream.plan(w, 3) for i in range(a, b)]
    assert len(ranges) == len(set(ranges)) == 24


def test_dataloader_workers_split_the_shards(folder, tmp_path):
    out = write_shards(folder, tmp_path / "shards", shard_size=5)
    stream = ShardStream(out, buffer_size=4)
    stream.set_epoch(1)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    keys = [_key(img) for img, _ in loader]
    assert len(keys) == len(set(keys)) == 24
    assert set(keys) == {_key(img) for img, _ in stream}


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class _Touch:  # unpickling this creates a file
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_corrupt_members_skipped_and_pickles_never_loaded(tmp_path, caplog):
    rng = np.random.default_rng(1)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe))).close()
    assert probe.exists()  # the payload does what it says when unpickled
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Touch(marker))
    shard = tmp_path / "foreign.tar"
    _tar(shard, [
        ("000000.png", _image_bytes(rng, "PNG")), ("000000.cls", b"1"),
        ("000001.png", b"\x89PNG\r\n\x1a\n garbage"), ("000001.cls", b"0"),
        ("000002.png", _image_bytes(rng, "PNG")), ("000002.pyd", payload),
        ("000003.pyd", payload), ("000003.pickle", payload),
        ("000004.jpg", _image_bytes(rng, "JPEG")), ("000004.cls", b"2"),
    ])  # fmt: skip
    stream = ShardStream(str(shard), shuffle=False)
    assert len(stream) == 5  # counted from the tar headers
    with caplog.at_level(logging.WARNING, logger="mimkit.data.shards"):
        got = _collect(stream)
    assert [label for _, label in got] == [1, -1, 2]
    assert stream.skipped == {"corrupt": 1, "no_image": 1, "unsafe": 3}
    assert "foreign.tar: sample 000001 (corrupt)" in caplog.text
    assert not marker.exists()
    # with a bad-image policy: listed in its report; strict mode stops at the first
    from mimkit.data import BadImageError, BadImagePolicy

    report = tmp_path / "skipped_images.jsonl"
    _collect(ShardStream(str(shard), shuffle=False, policy=BadImagePolicy("skip", 5, report)))
    assert [json.loads(x)["path"] for x in report.read_text().splitlines()] == [
        "foreign.tar:000001"]  # fmt: skip
    with pytest.raises(BadImageError, match=r"foreign\.tar:000001: cannot decode"):
        _collect(ShardStream(str(shard), shuffle=False, policy=BadImagePolicy("error")))

    res = verify(shard)
    assert (res["images"], res["ok"], res["bad"], res["unsafe"]) == (5, 3, 2, 3)
    assert {p["key"] for p in res["problems"]} == {"000001", "000003"}
    assert not marker.exists()


def test_pipe_and_remote_urls_refused(folder, tmp_path):
    out = write_shards(folder, tmp_path / "shards", shard_size=30)
    tar = out / "shard-000000.tar"
    with pytest.raises(ValueError, match="allow_pipe"):
        ShardStream(f"pipe:cat {tar}")
    with pytest.raises(ValueError, match="allow_pipe"):
        ShardStream([str(tar), f"pipe:cat {tar}"], counts=[24, 24])
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        ShardStream("https://example.com/shard-{000000..000001}.tar")
    with pytest.raises(ValueError, match="counts="):
        ShardStream(f"pipe:cat {tar}", allow_pipe=True)
    piped = ShardStream(f"pipe:cat {tar}", allow_pipe=True, counts=[24], buffer_size=1)
    assert len(_collect(piped)) == 24
    braces = ShardStream(str(out / "shard-{000000..000000}.tar"))
    assert len(braces) == 24


def test_verify_finds_truncated_and_empty_files(folder, tmp_path):
    png = (folder / "cat" / "01.png").read_bytes()
    (folder / "dog" / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "dog" / "empty.png").write_bytes(b"")
    report = tmp_path / "report.json"
    res = verify(folder, report=report)
    assert (res["kind"], res["images"], res["ok"], res["bad"]) == ("folder", 26, 24, 2)
    written = json.loads(report.read_text())
    assert {p["path"].rsplit("/", 1)[-1] for p in written["problems"]} == {
        "truncated.png",
        "empty.png",
    }

    out = write_shards(folder, tmp_path / "shards", shard_size=10)
    res = verify(out)
    assert (res["kind"], res["images"], res["bad"], res["bad_shards"]) == ("shards", 26, 2, 0)
    with open(out / "shard-000001.tar", "r+b") as f:  # flip a byte: sha256 no longer matches
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify(out)["bad_shards"] >= 1


def test_cli_shard_and_verify(folder, tmp_path, capsys):
    from mimkit.cli import main

    out = tmp_path / "shards"
    assert main(["data", "shard", str(folder), str(out), "--shard-size", "10"]) == 0
    assert "24 images in 3 shard(s), 2 classes" in capsys.readouterr().out
    assert main(["data", "shard", str(folder), str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    report = tmp_path / "r.json"
    assert main(["data", "verify", str(out), "--report", str(report)]) == 0
    assert "24 images, 24 ok, 0 bad" in capsys.readouterr().out
    assert json.loads(report.read_text())["bad"] == 0
    (folder / "cat" / "empty.png").write_bytes(b"")
    assert main(["data", "verify", str(folder)]) == 1
    assert "25 images, 24 ok, 1 bad" in capsys.readouterr().out
    assert main(["data", "shard", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert main(["data", "shard", str(folder), str(tmp_path / "o3"), "--shard-size", "0"]) == 2
    assert "shard_size" in capsys.readouterr().err


def test_flat_folder_is_unlabeled(tmp_path):
    rng = np.random.default_rng(2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        (flat / f"{i}.png").write_bytes(_image_bytes(rng, "PNG", size=8))
    out = write_shards(flat, tmp_path / "shards", shard_size=4, shuffle=False)
    assert json.loads((out / "manifest.json").read_text())["classes"] == []
    got = _collect(ShardStream(out, channels=1, shuffle=False))
    ref = ImageFolder(flat, channels=1)
    assert [_key(img) for img, _ in got] == [_key(ref[i][0]) for i in range(6)]
    assert {label for _, label in got} == {-1}


# ---- pretraining from shards (data.name=shards) ----


def _shard_cfg(run, shards, **extra):
    from mimkit.config import load_config
    from tests.conftest import DEMO, tiny_overrides

    args = [a for a in tiny_overrides(run) if not a.startswith("data.")]
    values = {"data.name": "shards", "data.root": str(shards), "data.mean": "[0.5,0.5,0.5]",
              "data.std": "[0.25,0.25,0.25]", "data.shuffle_buffer": 6,
              "mask.strategy": "blockwise", "mask.num_masked": 10, "mask.min_block": 2,
              "train.batch_size": 4, **extra}  # fmt: skip
    return load_config(DEMO, args + [f"{k}={v}" for k, v in values.items()])


def test_pretraining_streams_shards_and_resumes_mid_epoch_exactly(folder, tmp_path):
    from mimkit.engine import checkpoint as ckpt
    from mimkit.tasks.pretrain import run_pretrain

    out = write_shards(folder, tmp_path / "shards", shard_size=5)
    res = run_pretrain(_shard_cfg(tmp_path / "a", out))
    assert res.train.step == 2 * (24 // 4) and (tmp_path / "a" / "encoder.safetensors").is_file()
    assert (tmp_path / "a" / "figures" / "reconstruction.png").is_file()
    run_pretrain(_shard_cfg(tmp_path / "b", out, **{"train.max_steps": 4}))  # mid-epoch 0
    resumed = run_pretrain(_shard_cfg(tmp_path / "b", out), resume=True)
    assert resumed.train.step == res.train.step
    a = ckpt.load_weights(tmp_path / "a" / "encoder.safetensors")[0]
    b = ckpt.load_weights(tmp_path / "b" / "encoder.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shard_config_errors_name_the_key(folder, tmp_path):
    from mimkit.config import ConfigError

    out = write_shards(folder, tmp_path / "shards", shard_size=5)
    with pytest.raises(ConfigError, match=r"data\.root"):
        _shard_cfg(tmp_path / "r", folder)  # a folder, not shards
    with pytest.raises(ConfigError, match=r"data\.mean"):
        _shard_cfg(tmp_path / "r", out, **{"data.mean": "null"})
    with pytest.raises(ConfigError, match=r"data\.max_samples"):
        _shard_cfg(tmp_path / "r", out, **{"data.max_samples": 8})
