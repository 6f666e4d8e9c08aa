"""Property tests (hypothesis): any bytes given to the image decoder give a valid image or a
counted skip, and any YAML given to the config loader gives a valid config or a one-line
ConfigError; never another exception."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mimkit.config import ConfigError, load_config
from mimkit.data import BadImagePolicy
from mimkit.data.datasets import _DECODE_ERRORS, load_image

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    out = []
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "L"), ("GIF", "P"), ("BMP", "RGB")):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _decode_or_skip(data: bytes, channels: int, policy: BadImagePolicy) -> torch.Tensor | None:
    try:
        t = load_image(io.BytesIO(data), channels=channels)
    except _DECODE_ERRORS as err:
        policy.handle("fuzzed", err)  # what ImageFolder does: counted, never raised (limit high)
        return None
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == channels
    assert t.shape[1] >= 1 and t.shape[2] >= 1
    return t


@FUZZ
@given(data=st.binary(max_size=4096), channels=st.sampled_from([1, 3]))
def test_any_bytes_decode_or_are_skipped(data, channels):
    _decode_or_skip(data, channels, BadImagePolicy("skip", 10**9))


@FUZZ
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_damaged_real_images_decode_or_are_skipped(seed, edits, cut):
    data = bytearray(SEEDS[seed])
    for pos, value in edits:  # bytes overwritten anywhere: headers, chunk lengths, pixel data
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_skip(bytes(data), 3, BadImagePolicy("skip", 10**9))


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True),
    st.text(max_size=12),
)  # fmt: skip
_keys = st.sampled_from([
    "run", "data", "model", "mask", "target", "tokenizer", "optim", "train", "eval", "name",
    "dir", "seed", "root", "arch", "img_size", "patch_size", "ratio", "strategy", "epochs",
    "batch_size", "lr", "base_lr", "decoder", "knn", "precision", "mean", "crop_scale", "x",
])  # fmt: skip
_trees = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=20,
)


@FUZZ
@given(tree=st.dictionaries(_keys, _trees, max_size=6))
def test_any_yaml_mapping_gives_a_config_or_a_clear_error(tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        cfg = load_config(path, ["run.dir=/tmp/mimkit-fuzz", "data.name=synthetic"])
    except ConfigError as err:
        assert str(err) and "\n" not in str(err).strip()
        return
    assert cfg.model.img_size % cfg.model.patch_size == 0


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text_gives_a_config_or_a_clear_error(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, ["run.dir=/tmp/mimkit-fuzz", "data.name=synthetic"])
    except ConfigError as err:
        assert str(err)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']",
                                 "!!python/name:os.system", "!!binary aGk="])  # fmt: skip
def test_tagged_yaml_is_a_clear_error(tag, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(f"run: {tag}\n")
    with pytest.raises(ConfigError):
        load_config(path, [])
