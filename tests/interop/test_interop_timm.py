"""timm interop: mimkit checkpoints out to timm folders, timm weights in; timm is the oracle.

Random weights, tiny models, CPU. Each export is loaded by timm itself, both ways a user would
(``local-dir:`` and ``pretrained_cfg_overlay=dict(file=...)``), and must give mimkit's features or
logits (atol 1e-5); importing it back must give the same tensors.
"""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from mimkit.config import ModelConfig
from mimkit.engine.checkpoint import load_weights, save_weights
from mimkit.interop.timm import export_timm, import_timm, timm_model_spec
from mimkit.models import build_encoder
from mimkit.models.heads import Classifier
from mimkit.models.loading import load_encoder_weights
from mimkit.models.mae import MAE, to_official_layout

D, DEPTH, HEADS, P, C, IMG, CLASSES = 32, 2, 2, 4, 3, 16, 5
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]

VARIANTS = {
    "mae": {},
    "beit-shared": {"rel_pos_bias": "shared", "layer_scale": 0.1},
    "beit-per-layer": {"rel_pos_bias": "per_layer", "layer_scale": 0.1},
    "beit-abs": {"rel_pos_bias": "none", "abs_pos_emb": True, "layer_scale": None},
}


def _mc(variant: str) -> ModelConfig:
    method = variant.split("-")[0]
    return ModelConfig(method=method, arch="custom", img_size=IMG, patch_size=P, in_chans=C,
                       embed_dim=D, depth=DEPTH, num_heads=HEADS, **VARIANTS[variant])  # fmt: skip


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _meta(mc: ModelConfig, **extra) -> dict:
    import dataclasses

    return {"format": "mimkit", "method": mc.method, "model_config": dataclasses.asdict(mc),
            "mean": MEAN, "std": STD, "img_size": IMG, **extra}  # fmt: skip


def _x() -> torch.Tensor:
    return torch.randn(3, C, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _both_ways(result) -> list[torch.nn.Module]:
    """The export loaded by timm as a user would: local-dir, and name + args + overlay file."""
    folder = result["folder"]
    a = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert result["pretrained_cfg_overlay"]["file"] == str(folder / "model.safetensors")
    b = timm.create_model(
        result["name"],
        pretrained=True,
        pretrained_cfg_overlay=result["pretrained_cfg_overlay"],
        **result["model_args"],
    )
    return [a.eval(), b.eval()]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_exports_to_timm_and_back(tmp_path, variant):
    mc = _mc(variant)
    enc = build_encoder(mc, mask_token=False).eval()
    _randomize(enc)
    src = tmp_path / "enc.safetensors"
    save_weights(src, enc.state_dict(), _meta(mc, kind="encoder"))
    result = export_timm(src, tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["model_args"]["embed_dim"] == D and cfg["mimkit"]["method"] == mc.method
    assert cfg["pretrained_cfg"]["mean"] == MEAN and cfg["pretrained_cfg"]["input_size"] == [
        C,
        IMG,
        IMG,
    ]
    x = _x()
    with torch.no_grad():
        ref = enc.forward_features(x)
        for model in _both_ways(result):
            torch.testing.assert_close(model.forward_features(x), ref, atol=1e-5, rtol=1e-5)
    back = import_timm(tmp_path / "timm", tmp_path / "back.safetensors")
    state, meta = load_weights(back)
    assert set(state) == set(enc.state_dict())
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    assert meta["source"].startswith("timm:") and meta["mean"] == MEAN
    for k in ("method", "img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        assert meta["model_config"][k] == getattr(mc, k), k


@pytest.mark.parametrize("variant", ["mae", "beit-per-layer"])
@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_classifier_logits_match_after_export_and_import(tmp_path, variant, pool):
    mc = _mc(variant)
    clf = Classifier(build_encoder(mc, fixed_pos_embed=False, mask_token=False),
                     num_classes=CLASSES, pool=pool).eval()  # fmt: skip
    _randomize(clf, 3)
    classes = [f"c{i}" for i in range(CLASSES)]
    meta = _meta(mc, kind="classifier", pool=pool, classes=classes)
    save_weights(tmp_path / "clf.safetensors", clf.timm_state_dict(), meta)
    result = export_timm(tmp_path / "clf.safetensors", tmp_path / "timm")
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["label_names"] == classes
    x = _x()
    with torch.no_grad():
        ref = clf(x)
        for model in _both_ways(result):
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    state, back = load_weights(import_timm(tmp_path / "timm", tmp_path / "back.safetensors"))
    assert back["kind"] == "classifier" and back["pool"] == pool and back["classes"] == classes
    assert all(torch.equal(state[k], v) for k, v in clf.timm_state_dict().items())


def test_full_mae_exports_its_encoder_with_a_note(tmp_path):
    mc = _mc("mae")
    mae = MAE(build_encoder(mc), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    _randomize(mae.encoder, 5)
    meta = _meta(mc, kind="pretrain", includes_decoder=True)
    save_weights(tmp_path / "full.safetensors", to_official_layout(mae.state_dict()), meta)
    result = export_timm(tmp_path / "full.safetensors", tmp_path / "timm")
    assert any("decoder_" in n and "mask_token" in n for n in result["notes"]), result["notes"]
    x = _x()
    with torch.no_grad():
        ref = mae.encoder.eval().forward_features(x)
        for model in _both_ways(result):
            torch.testing.assert_close(model.forward_features(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit", "beit"])
def test_timm_written_weights_import_into_mimkit(tmp_path, name):
    """Weights timm wrote itself (a save_for_hf folder, or a bare safetensors file) come in."""
    common = dict(img_size=IMG, patch_size=P, in_chans=C, embed_dim=D, depth=DEPTH,
                  num_heads=HEADS, num_classes=0)  # fmt: skip
    if name == "vit":
        ref = timm.create_model("vit_base_patch16_224", global_pool="token", **common)
    else:
        ref = timm.create_model("beit_base_patch16_224", global_pool="", use_fc_norm=False,
                                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                                **common)  # fmt: skip
    _randomize(ref, 7)
    ref.eval()
    save_for_hf(ref, str(tmp_path / "folder"), safe_serialization=True)
    save_file(ref.state_dict(), str(tmp_path / "bare.safetensors"))
    x = _x()
    with torch.no_grad():
        want = ref.forward_features(x)
    for src, kw in (
        (tmp_path / "folder", {}),
        (tmp_path / "bare.safetensors", {"num_heads": HEADS}),
    ):
        out = import_timm(src, tmp_path / "mimkit.safetensors", **kw)
        w = load_encoder_weights(out)
        mc = dict(w.metadata["model_config"])
        mc.pop("decoder", None)
        enc = build_encoder(ModelConfig(**mc), fixed_pos_embed=False, mask_token=False)
        enc.load_state_dict(w.encoder, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(enc.eval().forward_features(x), want, atol=1e-5, rtol=1e-5)


def test_misuse_gives_clear_errors(tmp_path):
    mc = _mc("mae")
    enc = build_encoder(mc, mask_token=False)
    state = enc.state_dict()
    with pytest.raises(ValueError, match="segmenter checkpoint has no timm counterpart"):
        timm_model_spec(_meta(mc, kind="segmenter"), state)
    with pytest.raises(ValueError, match="model_config"):
        timm_model_spec({"format": "mimkit"}, state)
    save_weights(tmp_path / "plain.safetensors", state, {"format": "pt"})
    with pytest.raises(ValueError, match="not a mimkit checkpoint"):
        export_timm(tmp_path / "plain.safetensors", tmp_path / "out")
    odd = dict(state, **{"foo.bar": torch.zeros(2)})
    save_weights(tmp_path / "odd.safetensors", odd, _meta(mc))
    with pytest.raises(ValueError, match=re.escape("unexpected ['foo.bar']")):
        export_timm(tmp_path / "odd.safetensors", tmp_path / "out")
    save_file(odd, str(tmp_path / "odd_timm.safetensors"))
    with pytest.raises(ValueError, match=r"foo\.bar"):
        import_timm(tmp_path / "odd_timm.safetensors", tmp_path / "x.safetensors", num_heads=2)
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        import_timm(tmp_path / "nocfg", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"folder or a \.safetensors"):
        (tmp_path / "w.pth").write_bytes(b"x")
        import_timm(tmp_path / "w.pth", tmp_path / "x.safetensors")
