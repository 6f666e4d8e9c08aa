"""mimkit <-> Hugging Face transformers conversion, with transformers itself as the oracle.

Tiny models with random weights (nothing is downloaded); every comparison runs both the mimkit
model and the HF model built from the converted weights, starting from either side.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimkit.config import DecoderConfig, ModelConfig  # noqa: E402
from mimkit.engine.checkpoint import load_weights, save_weights  # noqa: E402
from mimkit.interop.hf import (  # noqa: E402
    HF_ARCHITECTURES,
    export_to_hf,
    from_hf,
    import_from_hf,
    load_hf_folder,
    save_hf_folder,
    to_hf,
)
from mimkit.masking import mask_from_bool, random_masking  # noqa: E402
from mimkit.models import build_encoder  # noqa: E402
from mimkit.models.beit import BEiT  # noqa: E402
from mimkit.models.heads import Classifier  # noqa: E402
from mimkit.models.loading import checkpoint_model_config, load_encoder_weights  # noqa: E402
from mimkit.models.mae import MAE, from_official_layout, to_official_layout  # noqa: E402
from mimkit.models.pos_embed import sincos_2d  # noqa: E402

ATOL = 1e-5
# the key names of HF modules' state_dict(): transformers 5 renamed them, files keep the hub's
MODULES = "v5" if int(transformers.__version__.split(".")[0]) >= 5 else "hub"
TINY = dict(
    arch="custom", img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2
)
MAE_CFG = dict(method="mae", **TINY, decoder=dict(embed_dim=32, depth=1, num_heads=2))
BEIT_POS = {  # mimkit model_config keys, and the same model in HF BeitConfig terms
    "shared": (
        dict(rel_pos_bias="shared", abs_pos_emb=False, layer_scale=0.1),
        dict(use_shared_relative_position_bias=True),
    ),
    "per_layer_abs": (
        dict(rel_pos_bias="per_layer", abs_pos_emb=True, layer_scale=0.1),
        dict(use_relative_position_bias=True, use_absolute_position_embeddings=True),
    ),
    "abs_no_layer_scale": (
        dict(rel_pos_bias="none", abs_pos_emb=True, layer_scale=None),
        dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.0),
    ),
}
HF_TINY = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    layer_norm_eps=1e-6,
)
HF_DECODER = dict(
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=128,
)
CONFIG_CLASSES = {
    "vit": transformers.ViTConfig,
    "vit_mae": transformers.ViTMAEConfig,
    "beit": transformers.BeitConfig,
}


def beit_cfg(pos: str = "shared") -> dict:
    return dict(method="beit", **TINY, **BEIT_POS[pos][0])


def model_config(cfg: dict) -> ModelConfig:
    cfg = dict(cfg)
    decoder = DecoderConfig(**cfg.pop("decoder", {}))
    return ModelConfig(**cfg, decoder=decoder)


def full(cfg: dict) -> dict:
    """What from_hf returns for ``cfg``: the complete ModelConfig dict."""
    return dataclasses.asdict(model_config(cfg))


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random offsets on every parameter (zero-initialized tables, biases, layer scales too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def flat(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}


def mae(cfg: dict, *, norm_pix: bool = True, mask_ratio: float = 0.75) -> MAE:
    mc = model_config(cfg)
    return MAE(
        build_encoder(mc),
        decoder_embed_dim=mc.decoder.embed_dim,
        decoder_depth=mc.decoder.depth,
        decoder_num_heads=mc.decoder.num_heads,
        mlp_ratio=mc.mlp_ratio,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix,
    )


def classifier(cfg: dict, *, pool: str, num_classes: int = 5) -> Classifier:
    encoder = build_encoder(model_config(cfg), fixed_pos_embed=False, mask_token=False)
    return Classifier(encoder, num_classes=num_classes, pool=pool)


def hf_model(state: dict, config: dict) -> torch.nn.Module:
    """The HF model of ``config`` holding ``state`` (module key names), strictly."""
    cls = getattr(transformers, config["architectures"][0])
    kwargs = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
    model = cls(CONFIG_CLASSES[config["model_type"]].from_dict(config), **kwargs).eval()
    model.load_state_dict(state, strict=True)
    return model


def random_hf(arch: str, **config) -> torch.nn.Module:
    cls = getattr(transformers, arch)
    torch.manual_seed(0)
    model = cls(CONFIG_CLASSES[cls.config_class.model_type](**HF_TINY, **config))
    return perturb(model, seed=1)


def bool_mask(num_masked: int = 6, batch: int = 2, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(batch, n, generator=g).argsort(dim=1) < num_masked  # (B, N) bool


def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- features, predictions, logits: mimkit and HF agree ----


@torch.no_grad()
def test_vit_encoder_matches_vitmodel_both_ways():
    x = images()
    ours = perturb(build_encoder(model_config(MAE_CFG)))
    state, config = to_hf(flat(ours), model_config=MAE_CFG, layout=MODULES)
    assert config["architectures"] == ["ViTModel"] and config["layer_norm_eps"] == 1e-6
    ref = hf_model(state, config)
    assert_close(ours.forward_features(x), ref(pixel_values=x).last_hidden_state)  # final norm

    ref = random_hf("ViTModel")  # has a pooler, which mimkit drops
    with pytest.warns(UserWarning, match="pooler"):
        state, mc = from_hf(ref.state_dict(), ref.config)
    assert mc == full(dict(method="mae", **TINY))  # no decoder in a ViT config: the defaults
    ours = build_encoder(model_config(mc)).eval()
    ours.load_state_dict(state, strict=True)
    assert_close(ours.forward_features(x), ref(pixel_values=x).last_hidden_state)


@torch.no_grad()
def test_vit_encoder_matches_vitmaemodel_with_the_same_noise():
    x, noise = images(), torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    ours = perturb(build_encoder(model_config(MAE_CFG)))
    state, config = to_hf(
        flat(ours), model_config=MAE_CFG, architecture="ViTMAEModel", mask_ratio=0.5, layout=MODULES
    )
    out = hf_model(state, config)(pixel_values=x, noise=noise)
    mask = random_masking(2, 16, 0.5, noise=noise)
    assert torch.equal(out.mask.bool(), mask.mask) and torch.equal(
        out.ids_restore, mask.ids_restore
    )
    assert_close(ours.forward_features(x, mask), out.last_hidden_state)  # (B, 1 + 8, D)


@pytest.mark.parametrize("pos", list(BEIT_POS))
@torch.no_grad()
def test_beit_encoder_matches_beitmodel_both_ways(pos):
    x, m = images(), bool_mask()
    ours = perturb(build_encoder(model_config(beit_cfg(pos))))
    state, config = to_hf(flat(ours), model_config=beit_cfg(pos), layout=MODULES)
    assert config["use_mask_token"] and not config["use_mean_pooling"]
    ref = hf_model(state, config)
    assert_close(ours.forward_features(x), ref(pixel_values=x).last_hidden_state)
    assert_close(
        ours.forward_features(x, mask_from_bool(m)),
        ref(pixel_values=x, bool_masked_pos=m).last_hidden_state,
    )

    ref = random_hf("BeitModel", use_mask_token=True, use_mean_pooling=False, **BEIT_POS[pos][1])
    state, mc = from_hf(ref.state_dict(), ref.config.to_dict())
    assert mc == full({**beit_cfg(pos), "drop_path": 0.1})  # HF's default drop_path_rate
    ours = build_encoder(model_config(mc)).eval()
    ours.load_state_dict(state, strict=True)
    assert_close(ours.forward_features(x), ref(pixel_values=x).last_hidden_state)
    assert_close(
        ours.forward_features(x, mask_from_bool(m)),
        ref(pixel_values=x, bool_masked_pos=m).last_hidden_state,
    )


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("start", ["mimkit", "hf"])
@torch.no_grad()
def test_mae_matches_vitmae_for_pretraining(start, norm_pix):
    x, noise = images(), torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    if start == "mimkit":
        ours = perturb(mae(MAE_CFG, norm_pix=norm_pix))
        state, config = to_hf(
            to_official_layout(ours.state_dict()),
            model_config=MAE_CFG,
            norm_pix_loss=norm_pix,
            layout=MODULES,
        )
        assert config["norm_pix_loss"] is norm_pix and config["mask_ratio"] == 0.75
        ref = hf_model(state, config)
    else:
        ref = random_hf("ViTMAEForPreTraining", **HF_DECODER, norm_pix_loss=norm_pix)
        state, mc = from_hf(ref.state_dict(), ref.config)
        assert mc == full(MAE_CFG)
        ours = mae(mc, norm_pix=ref.config.norm_pix_loss, mask_ratio=ref.config.mask_ratio).eval()
        ours.load_state_dict(from_official_layout(state), strict=True)
    out, hf_out = ours(x, noise=noise), ref(pixel_values=x, noise=noise)
    assert torch.equal(out.mask.mask, hf_out.mask.bool())  # same noise -> same mask
    assert_close(out.pred, hf_out.logits)  # (B, N, p*p*C)
    assert_close(ours.loss(x, out), hf_out.loss)


def test_hf_sincos_position_embeddings_have_mimkit_layout():
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    build = vit_mae.build_2d_sinusoidal_position_embedding  # transformers >= 5 (test extras)
    pos = build(4, 4, embed_dim=32, cls_token=True)
    # as ViTMAEEmbeddings.initialize_weights: halves swapped to the original MAE layout
    pos = torch.cat([pos[..., 16:], pos[..., :16]], dim=-1)
    assert_close(pos, sincos_2d(32, (4, 4), cls_token=True))


@pytest.mark.parametrize("start", ["mimkit", "hf"])
@torch.no_grad()
def test_beit_mim_logits_match_beit_for_masked_image_modeling(start):
    x, m = images(), bool_mask()
    if start == "mimkit":
        ours = perturb(BEiT(build_encoder(model_config(beit_cfg())), vocab_size=24))
        state = to_official_layout(ours.state_dict())
        state, config = to_hf(state, model_config=beit_cfg(), layout=MODULES)
        # mimkit's norm is the top-level layernorm; beit.layernorm must be an identity
        assert config["vocab_size"] == 24 and config["use_mean_pooling"]
        ref = hf_model(state, config)
    else:
        ref = random_hf(
            "BeitForMaskedImageModeling",
            use_mask_token=True,
            use_shared_relative_position_bias=True,
            vocab_size=24,
        )
        state, mc = from_hf(ref.state_dict(), ref.config)
        ours = BEiT(build_encoder(model_config(mc)), vocab_size=24).eval()
        keyed = {(k if k.startswith("lm_head.") else f"encoder.{k}"): v for k, v in state.items()}
        ours.load_state_dict(keyed, strict=True)
    out = ours(x, mask_from_bool(m))  # logits at the masked positions only
    logits = ref(pixel_values=x, bool_masked_pos=m).logits  # (B, N, V)
    assert_close(out.pred, logits[m])


@pytest.mark.parametrize(
    "method,pool", [("mae", "cls"), ("beit", "avg"), ("beit", "cls")], ids=lambda v: v
)
@pytest.mark.parametrize("start", ["mimkit", "hf"])
@torch.no_grad()
def test_classifier_logits_match(start, method, pool):
    x = images()
    cfg = MAE_CFG if method == "mae" else beit_cfg("per_layer_abs")  # the fine-tuning layout
    if start == "mimkit":
        ours = perturb(classifier(cfg, pool=pool))
        state, config = to_hf(
            ours.timm_state_dict(), model_config=cfg, labels=list("abcde"), layout=MODULES
        )
        assert config["id2label"]["0"] == "a" and config["label2id"]["e"] == 4
        ref = hf_model(state, config)
    else:
        if method == "mae":
            ref = random_hf("ViTForImageClassification", num_labels=5)
        else:
            ref = random_hf(
                "BeitForImageClassification",
                num_labels=5,
                use_mean_pooling=pool == "avg",
                **BEIT_POS["per_layer_abs"][1],
            )
        state, mc = from_hf(ref.state_dict(), ref.config)
        assert ("fc_norm.weight" in state) == (pool == "avg")
        ours = classifier(mc, pool=pool).eval()
        ours.load_timm_state_dict(state, strict=True)
    assert_close(ours(x), ref(pixel_values=x).logits)


def test_mean_pooled_vit_classifier_is_refused():
    ours = classifier(MAE_CFG, pool="avg")
    with pytest.raises(ValueError, match=r"fc_norm\.weight"):
        to_hf(ours.timm_state_dict(), model_config=MAE_CFG)


# ---- lossless round trips ----


def _case(name: str):
    """(mimkit state, model_config, to_hf kwargs) of each supported kind."""
    torch.manual_seed(0)
    if name == "mae_encoder":
        return flat(perturb(build_encoder(model_config(MAE_CFG)))), MAE_CFG, {}
    if name == "mae_encoder_vitmae":
        state = flat(perturb(build_encoder(model_config(MAE_CFG))))
        return state, MAE_CFG, {"architecture": "ViTMAEModel"}
    if name == "mae_full":
        state = to_official_layout(perturb(mae(MAE_CFG)).state_dict())
        return state, MAE_CFG, {"norm_pix_loss": False, "mask_ratio": 0.6}
    if name == "mae_cls_classifier":
        return perturb(classifier(MAE_CFG, pool="cls")).timm_state_dict(), MAE_CFG, {}
    if name.startswith("beit_encoder_"):  # without a mask token: encoder.safetensors
        pos = name.removeprefix("beit_encoder_")
        enc = perturb(build_encoder(model_config(beit_cfg(pos)), mask_token=False))
        return flat(enc), beit_cfg(pos), {}
    if name == "beit_full":
        state = to_official_layout(
            perturb(BEiT(build_encoder(model_config(beit_cfg())), vocab_size=24)).state_dict()
        )
        return state, beit_cfg(), {}
    if name.startswith("beit_classifier_"):
        pool = name.removeprefix("beit_classifier_")
        ours = perturb(classifier(beit_cfg("per_layer_abs"), pool=pool))
        return ours.timm_state_dict(), beit_cfg("per_layer_abs"), {"labels": list("vwxyz")}
    raise KeyError(name)


CASES = [
    "mae_encoder",
    "mae_encoder_vitmae",
    "mae_full",
    "mae_cls_classifier",
    *(f"beit_encoder_{pos}" for pos in BEIT_POS),
    "beit_full",
    "beit_classifier_avg",
    "beit_classifier_cls",
]


@pytest.mark.parametrize("layout", ["hub", "v5"])
@pytest.mark.parametrize("case", CASES)
def test_round_trips_are_lossless(case, layout):
    state, cfg, kwargs = _case(case)
    hf_state, config = to_hf(state, model_config=cfg, layout=layout, **kwargs)
    k = next(iter(state))
    assert hf_state and all(v.data_ptr() != state[k].data_ptr() for v in hf_state.values())
    back, mc = from_hf(hf_state, json.loads(json.dumps(config)))  # as read from config.json
    assert_same_tensors(back, state)
    assert mc == full(cfg)
    # HF -> mimkit -> HF is the identity too
    again, config_again = to_hf(back, model_config=mc, layout=layout, **kwargs)
    assert_same_tensors(again, hf_state)
    assert config_again == config


def test_round_trip_keeps_dtype_and_accepts_module_state_dicts():
    ours = perturb(mae(MAE_CFG)).to(torch.bfloat16)
    hf_state, config = to_hf(ours.state_dict(), model_config=model_config(MAE_CFG))
    assert {v.dtype for v in hf_state.values()} == {torch.bfloat16}
    back, _ = from_hf(hf_state, config)
    assert_same_tensors(back, to_official_layout(ours.state_dict()))


# ---- HF folders ----


FOLDER_CASES = [
    "mae_encoder",
    "mae_full",
    "mae_cls_classifier",
    "beit_encoder_per_layer_abs",
    "beit_full",
    "beit_classifier_avg",
]


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_saved_folder_loads_with_from_pretrained(case, tmp_path):
    state, cfg, kwargs = _case(case)
    hf_state, config = to_hf(state, model_config=cfg, **kwargs)
    folder = save_hf_folder(tmp_path / "hf", hf_state, config)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cls = getattr(transformers, config["architectures"][0])
    extra = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
    model, info = cls.from_pretrained(folder, output_loading_info=True, **extra)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    # every tensor arrives as exported: nothing (e.g. a fixed sin-cos table) re-initialized
    modules, _ = to_hf(state, model_config=cfg, layout=MODULES, **kwargs)
    assert_same_tensors(dict(model.state_dict()), modules)
    # either layout is written with the checkpoint-file (hub) names
    save_hf_folder(
        tmp_path / "v5", to_hf(state, model_config=cfg, layout="v5", **kwargs)[0], config
    )
    assert_same_tensors(load_hf_folder(tmp_path / "v5")[0], hf_state)
    # what transformers' own save_pretrained writes reads back to the same mimkit weights
    model.save_pretrained(tmp_path / "again")
    back, mc = from_hf(*load_hf_folder(tmp_path / "again"))
    assert_same_tensors(back, state)
    assert mc == full(cfg)


def test_load_hf_folder_reads_safetensors_only(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        load_hf_folder(tmp_path)
    # sharded safetensors are read; shard names must stay inside the folder
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-2.safetensors"))
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state, config = load_hf_folder(tmp_path)
    assert sorted(state) == ["a", "b"] and config == {"model_type": "vit"}
    index["weight_map"]["c"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard name"):
        load_hf_folder(tmp_path)


def test_whole_checkpoints_export_and_import(tmp_path):
    ours = perturb(mae(MAE_CFG))
    meta = {
        "format": "mimkit",
        "method": "mae",
        "mask_ratio": 0.75,
        "target": "norm_pixels",
        "layout": "official-mae",
        "model_config": MAE_CFG,
    }
    state = to_official_layout(ours.state_dict())
    save_weights(tmp_path / "mae.safetensors", state, meta)
    folder = export_to_hf(tmp_path / "mae.safetensors", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTMAEForPreTraining"] and config["norm_pix_loss"] is True
    path = import_from_hf(folder, tmp_path / "back.safetensors")
    back, back_meta = load_weights(path)
    assert_same_tensors(back, state)
    assert back_meta["layout"] == "official-mae" and back_meta["target"] == "norm_pixels"
    assert checkpoint_model_config(path) == full(MAE_CFG)
    assert set(load_encoder_weights(path).encoder) == set(flat(ours.encoder))
    # no recorded target (an official file without args, e.g. mae_visualize_*): raw pixels
    del meta["target"], meta["mask_ratio"]
    save_weights(tmp_path / "bare.safetensors", state, meta)
    folder = export_to_hf(tmp_path / "bare.safetensors", tmp_path / "hf_bare")
    config = json.loads((folder / "config.json").read_text())
    assert config["norm_pix_loss"] is False and config["mask_ratio"] == 0.75

    ours = perturb(classifier(beit_cfg("per_layer_abs"), pool="avg"))
    labels = ["cat", "dog", "emu", "fox", "gnu"]
    hf_state, config = to_hf(
        ours.timm_state_dict(), model_config=beit_cfg("per_layer_abs"), labels=labels
    )
    path = import_from_hf(save_hf_folder(tmp_path / "cls", hf_state, config), tmp_path / "c.st")
    back_meta = load_weights(path)[1]
    assert back_meta["kind"] == "classifier" and back_meta["pool"] == "avg"
    assert back_meta["num_classes"] == 5 and back_meta["classes"][1] == "dog"


# ---- user errors ----


def test_bad_mimkit_inputs_name_the_key():
    state, cfg, _ = _case("mae_encoder")
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"missing key 'blocks\.1\.attn\.qkv\.weight'"):
        to_hf(missing, model_config=cfg)
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        to_hf({**state, "extra.weight": torch.zeros(1)}, model_config=cfg)
    with pytest.raises(ValueError, match=r"'norm\.weight' has shape \(5,\)"):
        to_hf({**state, "norm.weight": torch.zeros(5)}, model_config=cfg)
    with pytest.raises(ValueError, match=r"missing key 'blocks\.2\."):
        to_hf(state, model_config={**cfg, "depth": 3})
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        to_hf(state, model_config={**cfg, "bogus": 1})
    with pytest.raises(ValueError, match="cannot hold"):
        to_hf(state, model_config=cfg, architecture="ViTMAEForPreTraining")
    with pytest.raises(ValueError, match="not supported"):
        to_hf(state, model_config=cfg, architecture="SwinModel")
    with pytest.raises(ValueError, match="layout"):
        to_hf(state, model_config=cfg, layout="v4")
    with pytest.raises(ValueError, match="img_size"):
        to_hf(state, model_config={**cfg, "img_size": 18})


def test_bad_hf_inputs_name_the_key_or_field():
    state, cfg, _ = _case("mae_encoder")
    for layout, key in [
        ("hub", "encoder.layer.0.attention.attention.key.weight"),
        ("v5", "layers.0.attention.k_proj.weight"),
    ]:
        hf_state, config = to_hf(state, model_config=cfg, layout=layout)
        del hf_state[key]
        with pytest.raises(ValueError, match=f"missing key '{re.escape(key)}'"):
            from_hf(hf_state, config)
    hf_state, config = to_hf(state, model_config=cfg)
    bad = [
        ({"image_size": [16, 32]}, "image_size"),
        ({"patch_size": [4, 8]}, "patch_size"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"qkv_bias": False}, "qkv_bias"),
        ({"model_type": "beit"}, "model_type"),
        ({"architectures": ["ViTForMaskedImageModeling"]}, "not supported"),
        ({"num_attention_heads": 3}, "'hidden_size'=32 is not divisible"),
        ({"hidden_size": 48}, r"'embeddings\.cls_token' has shape \(1, 1, 32\)"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            from_hf(hf_state, {**config, **change})
    with pytest.warns(UserWarning, match="layer_norm_eps"):
        from_hf(hf_state, {**config, "layer_norm_eps": 1e-12})

    state, cfg, _ = _case("beit_full")
    hf_state, config = to_hf(state, model_config=cfg)
    with pytest.raises(ValueError, match="use_shared_relative_position_bias"):
        from_hf(hf_state, {**config, "use_relative_position_bias": True})
    with pytest.raises(ValueError, match="use_mean_pooling"):
        from_hf(hf_state, {**config, "use_mean_pooling": False})


def test_hub_style_configs_without_default_values_read_the_same():
    """Hub config.json files leave out values equal to the class defaults (use_diff=True)."""
    from mimkit.interop.hf.layout import HF_DEFAULTS

    for model_type, cls in CONFIG_CLASSES.items():
        defaults = cls().to_dict()
        for k, v in HF_DEFAULTS[model_type].items():
            assert defaults[k] == v, (model_type, k)
    for case in ("beit_full", "mae_full"):
        state, cfg, kwargs = _case(case)
        hf_state, config = to_hf(state, model_config=cfg, **kwargs)
        defaults = CONFIG_CLASSES[config["model_type"]]().to_dict()
        diff = {k: v for k, v in config.items() if k not in defaults or defaults[k] != v}
        assert len(diff) < len(config)
        assert from_hf(hf_state, diff)[1] == from_hf(hf_state, config)[1]


def test_every_architecture_is_covered():
    """Each supported HF class appears in the round-trip cases above."""
    covered = {"ViTModel", "ViTMAEModel", "ViTMAEForPreTraining", "ViTForImageClassification"}
    covered |= {"BeitModel", "BeitForMaskedImageModeling", "BeitForImageClassification"}
    assert set(HF_ARCHITECTURES) == covered


def test_a_round_trip_keeps_the_preset_name_of_a_resized_preset():
    """The Fashion-MNIST recipes say ``arch: vit_tiny`` with ``depth: 6``: still vit_tiny after
    HF and back; an HF config without mimkit's note is named by its dimensions."""
    from mimkit.config import load_config, to_dict
    from mimkit.models import build_encoder
    from tests.conftest import DEMO

    mc = to_dict(load_config(DEMO).model)
    assert (mc["arch"], mc["depth"]) == ("vit_tiny", 6)
    enc = build_encoder(load_config(DEMO).model, fixed_pos_embed=False, mask_token=False)
    hf_state, hf_config = to_hf(enc.state_dict(), model_config=mc)
    _, back = from_hf(hf_state, hf_config)
    assert (back["arch"], back["depth"], back["embed_dim"]) == ("vit_tiny", 6, 192)
    bare = {k: v for k, v in hf_config.items() if k != "mimkit"}
    assert from_hf(hf_state, bare)[1]["arch"] == "custom"
