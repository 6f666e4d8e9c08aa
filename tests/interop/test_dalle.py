"""The DALL-E dVAE against OpenAI's reference package, and the safe pickle converter.

The reference is ``dall-e==0.1`` (module ``dall_e``). It imports ``attr`` without declaring the
``attrs`` distribution as a dependency, so the test extra needs both. Its validators require
``n_hid >= 64`` and ``vocab_size >= 512``; the small config below is the smallest they allow.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

try:
    import dall_e
except ImportError as e:  # fail loudly rather than skip: CI must run these tests
    raise ImportError(
        "tests/interop/test_dalle.py needs the reference dVAE: pip install 'dall-e==0.1' attrs "
        "(both are in the [test] extra)"
    ) from e

from mimkit.interop.dalle import UnsafePickleError, convert_dalle_pickle
from mimkit.models.dalle import (
    DalleDecoder,
    DalleEncoder,
    infer_dalle_config,
    load_dalle_decoder,
    load_dalle_encoder,
    map_pixels,
    unmap_pixels,
)

SMALL = {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512}
SMALL_DEC = {**SMALL, "n_init": 16}
HIDDEN = ["dall_e", "dall_e.encoder", "dall_e.decoder", "dall_e.utils", "attr"]


def _randomize_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The reference initializes biases to zero; random ones make the comparison meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def ref_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomize_biases(dall_e.Encoder(**SMALL), 1).eval()


@pytest.fixture(scope="module")
def ref_decoder() -> torch.nn.Module:
    torch.manual_seed(2)
    return _randomize_biases(dall_e.Decoder(**SMALL_DEC), 3).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """BEiT's tokenizer input: 112x112 images in [0, 1], mapped for the dVAE."""
    g = torch.Generator().manual_seed(4)
    return map_pixels(torch.rand(2, 3, 112, 112, generator=g))


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, SMALL["vocab_size"], (2, 14, 14), generator=g)


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _one_hot(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.one_hot(ids, vocab).permute(0, 3, 1, 2).float()  # (B, h, w, V) -> (B, V, h, w)


@pytest.mark.parametrize(
    ("enc_kw", "dec_kw"),
    [({}, {}), (SMALL, SMALL_DEC), ({"n_blk_per_group": 3, "n_hid": 128}, {"n_blk_per_group": 3})],
    ids=["published", "small", "three-blocks"],
)
def test_state_dict_layout_matches_reference(enc_kw, dec_kw):
    meta = torch.device("meta")  # shapes only: the published size costs no memory
    with meta:
        ours_enc, ours_dec = DalleEncoder(**enc_kw), DalleDecoder(**dec_kw)
    assert _layout(ours_enc) == _layout(dall_e.Encoder(device=meta, **enc_kw))
    assert _layout(ours_dec) == _layout(dall_e.Decoder(device=meta, **dec_kw))
    for model, kwargs in ((ours_enc, enc_kw), (ours_dec, dec_kw)):
        kind, config = infer_dalle_config(model.state_dict())
        assert kind == ("encoder" if model is ours_enc else "decoder")
        assert config == {**config, **kwargs, "group_count": 4}
        with meta:
            assert _layout(type(model)(**config)) == _layout(model)


def test_encoder_matches_reference(ref_encoder, images):
    ours = DalleEncoder(**SMALL).eval()
    ours.load_state_dict(ref_encoder.state_dict(), strict=True)
    with torch.no_grad():
        ref_logits, logits = ref_encoder(images), ours(images)
    assert logits.shape == (2, SMALL["vocab_size"], 14, 14)
    assert torch.equal(logits, ref_logits)
    ids = ours.encode(images)
    assert ids.shape == (2, 14, 14) and ids.dtype == torch.int64
    assert torch.equal(ids, ref_logits.argmax(dim=1))


def test_decoder_matches_reference(ref_decoder, token_ids):
    ours = DalleDecoder(**SMALL_DEC).eval()
    ours.load_state_dict(ref_decoder.state_dict(), strict=True)
    z = _one_hot(token_ids, SMALL["vocab_size"])
    with torch.no_grad():
        ref_stats, stats = ref_decoder(z), ours(z)
    assert stats.shape == (2, 6, 112, 112)
    assert torch.equal(stats, ref_stats)
    img = ours.decode(token_ids)
    assert img.shape == (2, 3, 112, 112)
    assert torch.equal(img, dall_e.unmap_pixels(torch.sigmoid(ref_stats[:, :3])))
    assert img.min() >= 0 and img.max() <= 1


def test_map_unmap_pixels():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    mapped = map_pixels(x)
    assert torch.equal(mapped, dall_e.map_pixels(x))
    assert mapped.min() >= 0.1 and mapped.max() <= 0.9
    assert torch.equal(unmap_pixels(mapped), dall_e.unmap_pixels(mapped))
    torch.testing.assert_close(unmap_pixels(mapped), x)
    torch.testing.assert_close(unmap_pixels(map_pixels(x, eps=0.05), eps=0.05), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped
    with pytest.raises(TypeError):
        map_pixels(torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        map_pixels(x, eps=0.5)


def _hide_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import dall_e`` / ``import attr`` fail, to prove the converter does not need them."""
    for name in HIDDEN:
        monkeypatch.setitem(sys.modules, name, None)


def test_convert_encoder_pickle(tmp_path, monkeypatch, ref_encoder, images):
    src, dst = tmp_path / "encoder.pkl", tmp_path / "out" / "encoder.safetensors"
    torch.save(ref_encoder, src)
    _hide_reference(monkeypatch)
    shapes = convert_dalle_pickle(src, dst, trust_pickle=True)
    assert shapes == dict(_layout(ref_encoder))
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["kind"] == "encoder"
    assert (meta["vocab_size"], meta["n_hid"], meta["group_count"]) == ("512", "64", "4")
    ours = load_dalle_encoder(dst)
    assert not ours.training
    with torch.no_grad():
        expected = ref_encoder(images).argmax(dim=1)
    assert torch.equal(ours.encode(images), expected)


def test_convert_decoder_pickle(tmp_path, monkeypatch, ref_decoder, token_ids):
    src, dst = tmp_path / "decoder.pkl", tmp_path / "decoder.safetensors"
    torch.save(ref_decoder, src, _use_new_zipfile_serialization=False)  # legacy format too
    _hide_reference(monkeypatch)
    shapes = convert_dalle_pickle(src, dst, trust_pickle=True)
    assert shapes == dict(_layout(ref_decoder))
    ours = load_dalle_decoder(dst)
    with torch.no_grad():
        expected = ref_decoder(_one_hot(token_ids, SMALL["vocab_size"]))
    assert torch.equal(ours(_one_hot(token_ids, SMALL["vocab_size"])), expected)
    with pytest.raises(ValueError, match="decoder"):
        load_dalle_encoder(dst)


def test_pickle_refused_without_trust(tmp_path, ref_encoder):
    src, dst = tmp_path / "encoder.pkl", tmp_path / "encoder.safetensors"
    torch.save(ref_encoder, src)
    for trust in (False, "yes"):
        with pytest.raises(PermissionError, match="trust_pickle=True"):
            convert_dalle_pickle(src, dst, trust_pickle=trust)  # type: ignore[arg-type]
    assert not dst.exists()


class _Payload:
    """A pickle that runs ``func(arg)`` when loaded."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker):
    shell = _Payload(os.system, f"touch {marker}")
    python = _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    return {
        f"{os.system.__module__}.system": shell,
        "builtins.exec": python,
    }


@pytest.mark.parametrize("container", ["zip", "legacy", "raw", "inside-encoder"])
def test_malicious_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    for global_name, payload in _payloads(marker).items():
        src, dst = tmp_path / f"{container}.pkl", tmp_path / "out.safetensors"
        if container == "raw":
            src.write_bytes(pickle.dumps(payload, protocol=2))
        elif container == "inside-encoder":
            enc = dall_e.Encoder(**SMALL)
            enc.extra = payload  # a plain attribute, pickled with the module's state
            torch.save(enc, src)
        else:
            torch.save(payload, src, _use_new_zipfile_serialization=container == "zip")
        with pytest.raises(UnsafePickleError, match=re.escape(f"'{global_name}'")):
            convert_dalle_pickle(src, dst, trust_pickle=True)
        assert not marker.exists()
        assert not dst.exists()


def test_non_dvae_pickle_is_rejected(tmp_path, ref_encoder):
    src = tmp_path / "state_dict.pkl"
    torch.save(ref_encoder.state_dict(), src)  # only allowed globals, but not a dall_e module
    with pytest.raises(ValueError, match=re.escape("dall_e.encoder.Encoder")):
        convert_dalle_pickle(src, tmp_path / "out.safetensors", trust_pickle=True)


def test_strict_load_names_keys(tmp_path):
    state = DalleEncoder(**SMALL).state_dict()
    del state["blocks.group_2.block_1.res_path.conv_3.b"]
    state["blocks.group_2.block_1.extra.w"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing keys") as err:
        load_dalle_encoder(path)
    assert "blocks.group_2.block_1.res_path.conv_3.b" in str(err.value)
    assert "blocks.group_2.block_1.extra.w" in str(err.value)
