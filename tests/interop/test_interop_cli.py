"""``mimkit convert`` and ``mimkit inspect`` over every format, from the command line.

The official fixtures are those of test_interop_official (documented key names, an
``argparse.Namespace`` inside); the oracles are timm and transformers loading the outputs.
"""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from mimkit.cli import main
from mimkit.engine.checkpoint import load_weights, read_metadata
from mimkit.interop.convert import convert, describe, detect_format
from tests.interop.test_interop_official import (
    HEADS,
    MAE_ARGS,
    TouchFile,
    _materialize,
    _vit,
    _x,
    fixture,
    mae_layout,
)
from tests.interop.test_interop_official import vit_filter as official_vit_filter

transformers = pytest.importorskip("transformers")

KW = ["--num-heads", str(HEADS), "--decoder-num-heads", str(HEADS)]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_official_classifier_to_timm_from_the_cli(tmp_path, capsys):
    src, official = fixture(tmp_path, "mae-classifier")
    rc, out, err = _run(capsys, "convert", src, tmp_path / "timm", "--to", "timm", *KW)
    assert rc == 0, err
    assert "(official -> timm)" in out and "local-dir:" in out and "pretrained_cfg_overlay" in out
    ref = _vit(num_classes=5, global_pool="avg", fc_norm=True)
    ref.load_state_dict(official_vit_filter(official, ref), strict=True)
    got = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(got(_x()), ref(_x()), atol=1e-5, rtol=1e-5)


def test_official_full_mae_to_hf_loads_with_from_pretrained(tmp_path, capsys):
    src, first = fixture(tmp_path, "mae-pretrain")
    out_dir = tmp_path / "hf"
    rc, _, err = _run(capsys, "convert", "--from", "official", "--to", "hf", src, out_dir, *KW)
    assert rc == 0, err
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(
        out_dir, output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert model.config.norm_pix_loss is True and model.config.mask_ratio == 0.75
    # and back: the official file's tensors, unchanged
    rc, _, err = _run(capsys, "convert", out_dir, tmp_path / "back.pth", "--to", "official")
    assert rc == 0, err
    back = torch.load(tmp_path / "back.pth", map_location="cpu", weights_only=True)["model"]
    assert set(back) == set(first) and all(torch.equal(back[k], first[k]) for k in first)


def test_mimkit_timm_mimkit_round_trip_and_inspect_every_format(tmp_path, capsys):
    src, _ = fixture(tmp_path, "beit-pretrain")
    mim = tmp_path / "beit.safetensors"
    assert _run(capsys, "convert", src, mim, *KW)[0] == 0
    assert detect_format(mim) == "mimkit" and detect_format(src) == "official"
    assert _run(capsys, "convert", mim, tmp_path / "timm", "--to", "timm")[0] == 0
    assert _run(capsys, "convert", mim, tmp_path / "hf", "--to", "hf")[0] == 0
    assert detect_format(tmp_path / "timm") == "timm" and detect_format(tmp_path / "hf") == "hf"
    assert _run(capsys, "convert", tmp_path / "timm", tmp_path / "back.safetensors")[0] == 0
    a, _ = load_weights(mim)
    b, meta = load_weights(tmp_path / "back.safetensors")
    encoder = {k: v for k, v in a.items() if not k.startswith(("lm_head", "mask_token"))}
    assert set(b) == set(encoder) and all(torch.equal(b[k], v) for k, v in encoder.items())
    assert meta["source"] == "timm:beit_base_patch16_224"
    expect = {
        src: ("official", "official_kind:     beit-pretrain"),
        mim: ("mimkit", "target:            visual_tokens"),
        tmp_path / "timm": ("timm", "architecture:      beit_base_patch16_224"),
        tmp_path / "hf": ("hf", "architecture:      BeitForMaskedImageModeling"),
    }
    for path, (fmt, line) in expect.items():
        rc, out, err = _run(capsys, "inspect", path)
        assert rc == 0, err
        assert f"format:            {fmt}" in out and line in out, out
        rc, out, _ = _run(capsys, "inspect", "--json", path)
        info = json.loads(out)
        assert info["format"] == fmt and info["parameters"] > 0
        assert info["has_decoder"] is (fmt != "timm"), (fmt, info["has_decoder"])
    assert describe(mim)["metadata"]["vocab_size"] == read_metadata(mim)["vocab_size"]


def test_dalle_pickles_are_not_opened_without_trust(tmp_path, capsys):
    target = tmp_path / "pwned"
    torch.save({"x": TouchFile(target)}, tmp_path / "encoder.pkl")
    out_file = tmp_path / "enc.safetensors"
    for argv in (["convert", "dalle", tmp_path / "encoder.pkl", out_file],
                 ["convert", tmp_path / "encoder.pkl", out_file]):  # fmt: skip
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and "--trust-pickle" in err
    rc, out, _ = _run(capsys, "inspect", tmp_path / "encoder.pkl")
    assert rc == 0 and "not opened" in out
    rc, _, err = _run(capsys, "convert", "--trust-pickle", tmp_path / "encoder.pkl", out_file)
    assert rc == 2 and "refused" in err  # the allow-list stops it
    assert not target.exists() and not out_file.exists()


def test_a_malicious_official_file_is_refused_by_convert_and_inspect(tmp_path, capsys):
    target = tmp_path / "pwned"
    model = _materialize(mae_layout("encoder"), 0)
    obj = {"model": model, "args": argparse.Namespace(**MAE_ARGS, hook=TouchFile(target))}
    torch.save(obj, tmp_path / "evil.pth")
    for argv in (["convert", tmp_path / "evil.pth", tmp_path / "out.safetensors", *KW],
                 ["inspect", tmp_path / "evil.pth"]):  # fmt: skip
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and "refused" in err, err
    assert not target.exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_misuse_names_the_problem(tmp_path, capsys):
    src, _ = fixture(tmp_path, "mae-encoder")
    mim = tmp_path / "m.safetensors"
    assert _run(capsys, "convert", src, mim, *KW)[0] == 0
    cases = {
        (mim, tmp_path / "again.safetensors"): "is a mimkit checkpoint already",
        (mim, tmp_path / "x.bin"): None,  # --to mimkit by default: a .safetensors
        (src, tmp_path / "x.safetensors"): "--num-heads",  # heads in no shape, no preset
        (tmp_path / "absent.pth", tmp_path / "y.safetensors"): "not found",
        (mim, mim): "overwrite the input",
    }
    for (a, b), needle in cases.items():
        rc, _, err = _run(capsys, "convert", a, b)
        assert rc == 2, (a, b)
        assert needle is None or needle in err, err
    rc, _, err = _run(capsys, "convert", mim, tmp_path / "o.txt", "--to", "official")
    assert rc == 2 and ".pth" in err
    rc, _, err = _run(capsys, "convert", src)
    assert rc == 2 and "IN and OUT" in err
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="format"):
        convert(tmp_path / "weights.npz", tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="--to must be"):
        convert(src, tmp_path / "z.safetensors", dst_format="onnx")
