"""Official MAE / BEiT .pth files: safe import, conversion checked against timm, lossless export.

The fixtures are written here, key by key, in the layouts of facebookresearch/mae (models_mae.py,
models_vit.py, main_linprobe.py) and microsoft/unilm beit (modeling_pretrain.py,
modeling_finetune.py), with an ``argparse.Namespace`` under ``'args'`` as their training scripts
save. The oracles are timm's ViT / Beit loaded with those official keys (through timm's own
checkpoint filters) and, for the full MAE, the official forward pass written out on timm blocks.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import re
import zipfile
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.beit import Beit
from timm.models.beit import checkpoint_filter_fn as beit_filter
from timm.models.vision_transformer import Block
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter
from torch import nn

from mimkit.config import DecoderConfig, ModelConfig
from mimkit.engine.checkpoint import read_metadata
from mimkit.interop.official import (
    SAFE_GLOBALS,
    UnsafeCheckpointError,
    convert_official,
    export_official,
    import_official,
    load_official,
    read_official,
    save_official,
)
from mimkit.masking import mask_from_bool
from mimkit.models import build_encoder
from mimkit.models.beit import BEiT
from mimkit.models.heads import Classifier
from mimkit.models.loading import checkpoint_model_config, load_encoder_weights
from mimkit.models.mae import MAE, from_official_layout

D, DEPTH, HEADS, P, C, HIDDEN = 32, 2, 2, 4, 3, 128
E, DEC_DEPTH, DEC_HEADS = 32, 1, 2  # a tiny MAE decoder
CLASSES, VOCAB = 5, 24


# ---- official layouts, written out ----


def official_relative_position_index(g: int) -> torch.Tensor:
    """unilm beit's RelativePositionBias / Attention buffer, as the official code computes it."""
    wh = ww = g
    num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += wh - 1
    relative_coords[:, :, 1] += ww - 1
    relative_coords[:, :, 0] *= 2 * ww - 1
    index = torch.zeros(size=(wh * ww + 1,) * 2, dtype=relative_coords.dtype)
    index[1:, 1:] = relative_coords.sum(-1)
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


def _block(prefix: str, d: int, hidden: int, *, beit: bool, g: int | None = None) -> dict:
    """Key -> shape of one block (an int64 tensor for a relative position index)."""
    out: dict = {}
    if beit:
        out |= {f"{prefix}gamma_1": (d,), f"{prefix}gamma_2": (d,)}
    out |= {f"{prefix}norm1.weight": (d,), f"{prefix}norm1.bias": (d,)}
    if beit:
        out |= {f"{prefix}attn.q_bias": (d,), f"{prefix}attn.v_bias": (d,)}
        if g is not None:
            out[f"{prefix}attn.relative_position_bias_table"] = ((2 * g - 1) ** 2 + 3, HEADS)
            out[f"{prefix}attn.relative_position_index"] = official_relative_position_index(g)
        out[f"{prefix}attn.qkv.weight"] = (3 * d, d)
    else:
        out |= {f"{prefix}attn.qkv.weight": (3 * d, d), f"{prefix}attn.qkv.bias": (3 * d,)}
    out |= {f"{prefix}attn.proj.weight": (d, d), f"{prefix}attn.proj.bias": (d,)}
    out |= {f"{prefix}norm2.weight": (d,), f"{prefix}norm2.bias": (d,)}
    out |= {f"{prefix}mlp.fc1.weight": (hidden, d), f"{prefix}mlp.fc1.bias": (hidden,)}
    out |= {f"{prefix}mlp.fc2.weight": (d, hidden), f"{prefix}mlp.fc2.bias": (d,)}
    return out


def _materialize(layout: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in layout.items():
        if isinstance(s, torch.Tensor):
            out[k] = s
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith(("running_var",)):
            out[k] = torch.rand(s, generator=g) + 0.5
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            out[k] = 1 + 0.1 * torch.randn(s, generator=g)
        else:
            out[k] = 0.3 * torch.randn(s, generator=g)
    return out


def _patch(n: int, d: int = D) -> dict:
    return {"patch_embed.proj.weight": (d, C, P, P), "patch_embed.proj.bias": (d,)}


def mae_layout(kind: str, img: int = 16, pool: str = "avg") -> dict:
    n = (img // P) ** 2
    out = {"cls_token": (1, 1, D), "pos_embed": (1, n + 1, D), **_patch(n)}
    for i in range(DEPTH):
        out |= _block(f"blocks.{i}.", D, HIDDEN, beit=False)
    head_pool = kind in ("classifier", "linprobe")
    if not head_pool or pool == "cls":
        out |= {"norm.weight": (D,), "norm.bias": (D,)}
    if head_pool and pool == "avg":
        out |= {"fc_norm.weight": (D,), "fc_norm.bias": (D,)}  # models_vit: global_pool
    if kind == "pretrain":
        out |= {"mask_token": (1, 1, E), "decoder_pos_embed": (1, n + 1, E)}
        out |= {"decoder_embed.weight": (E, D), "decoder_embed.bias": (E,)}
        for i in range(DEC_DEPTH):
            out |= _block(f"decoder_blocks.{i}.", E, 4 * E, beit=False)
        out |= {"decoder_norm.weight": (E,), "decoder_norm.bias": (E,)}
        out |= {"decoder_pred.weight": (P * P * C, E), "decoder_pred.bias": (P * P * C,)}
    if kind == "classifier":
        out |= {"head.weight": (CLASSES, D), "head.bias": (CLASSES,)}
    if kind == "linprobe":  # main_linprobe.py: head = Sequential(BatchNorm1d(affine=False), head)
        out |= {"head.0.running_mean": (D,), "head.0.running_var": (D,)}
        out |= {"head.0.num_batches_tracked": ()}
        out |= {"head.1.weight": (CLASSES, D), "head.1.bias": (CLASSES,)}
    return out


def beit_layout(kind: str, img: int = 16, pool: str = "avg") -> dict:
    g = img // P
    out = {"cls_token": (1, 1, D)}
    if kind == "pretrain":
        out["mask_token"] = (1, 1, D)
    out |= _patch(g * g)
    if kind == "pretrain":  # the shared table of BEiT pretraining
        out["rel_pos_bias.relative_position_bias_table"] = ((2 * g - 1) ** 2 + 3, HEADS)
        out["rel_pos_bias.relative_position_index"] = official_relative_position_index(g)
    for i in range(DEPTH):
        out |= _block(f"blocks.{i}.", D, HIDDEN, beit=True, g=None if kind == "pretrain" else g)
    if kind == "pretrain" or pool == "cls":
        out |= {"norm.weight": (D,), "norm.bias": (D,)}
    else:  # use_mean_pooling: norm is an Identity, fc_norm after pooling
        out |= {"fc_norm.weight": (D,), "fc_norm.bias": (D,)}
    if kind == "pretrain":
        out |= {"lm_head.weight": (VOCAB, D), "lm_head.bias": (VOCAB,)}
    else:
        out |= {"head.weight": (CLASSES, D), "head.bias": (CLASSES,)}
    return out


MAE_ARGS = dict(model="mae_vit_tiny_custom", input_size=16, mask_ratio=0.75, norm_pix_loss=True,
                epochs=800, blr=1.5e-4, lr=None, output_dir="./out", data_path="/x")  # fmt: skip
BEIT_ARGS = dict(model="beit_tiny_custom", input_size=16, layer_scale_init_value=0.1,
                 rel_pos_bias=True, abs_pos_emb=False, num_mask_patches=6,
                 second_input_size=8, discrete_vae_type="dall-e", output_dir="")  # fmt: skip

FIXTURES = {
    "mae-encoder": (partial(mae_layout, "encoder"), MAE_ARGS),
    "mae-pretrain": (partial(mae_layout, "pretrain"), MAE_ARGS),
    "mae-classifier": (partial(mae_layout, "classifier"), {**MAE_ARGS, "global_pool": True}),
    "mae-linprobe": (partial(mae_layout, "linprobe", pool="cls"), MAE_ARGS),
    "beit-pretrain": (partial(beit_layout, "pretrain"), BEIT_ARGS),
    "beit-classifier": (partial(beit_layout, "classifier"), {**BEIT_ARGS, "nb_classes": 5}),
}
KW = dict(num_heads=HEADS, decoder_num_heads=DEC_HEADS)


def write_official(path, model: dict, args: dict | None, *, entry="model", extras=True):
    obj = {entry: model}
    if extras:  # what misc.save_model writes beside the weights
        obj |= {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "epoch": 7, "scaler": {"scale": 65536.0, "_growth_tracker": 3}}  # fmt: skip
    if args is not None:
        obj["args"] = argparse.Namespace(**args)
    torch.save(obj, path)
    return path


def fixture(tmp_path, kind: str, seed: int = 0, **layout_kw):
    layout, args = FIXTURES[kind]
    model = _materialize(layout(**layout_kw), seed)
    return write_official(tmp_path / f"{kind}.pth", model, args), model


def _cfg(meta) -> ModelConfig:
    mc = dict(meta["model_config"])
    mc["decoder"] = DecoderConfig(**mc.get("decoder", {}))
    return ModelConfig(**mc)


def _x(img: int = 16, n: int = 3) -> torch.Tensor:
    return torch.randn(n, C, img, img, generator=torch.Generator().manual_seed(1))


def _vit(img=16, **kw) -> nn.Module:
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=img, patch_size=P, embed_dim=D,
        depth=DEPTH, num_heads=HEADS, **kw,
    ).eval()  # fmt: skip


def _beit(img=16, **kw) -> Beit:
    return Beit(
        img_size=img, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS, init_values=0.1,
        use_abs_pos_emb=False, **kw,
    ).eval()  # fmt: skip


# ---- MAE ----


def test_mae_encoder_matches_timm(tmp_path):
    path, official = fixture(tmp_path, "mae-encoder")
    state, meta = load_official(path, num_heads=HEADS)
    assert meta["official_kind"] == "mae-encoder" and meta["layout"] == "timm-vit"
    assert meta["source"] == "official-mae" and meta["format"] == "mimkit"
    assert meta["includes_decoder"] is False and meta["official_entry"] == "model"
    assert meta["official_extras"] == ["epoch", "optimizer", "scaler"]
    assert meta["args"]["mask_ratio"] == 0.75 and "data_path" not in meta["args"]
    mc = meta["model_config"]
    assert (mc["img_size"], mc["patch_size"], mc["embed_dim"], mc["depth"]) == (16, P, D, DEPTH)
    assert (mc["num_heads"], mc["mlp_ratio"], mc["arch"]) == (HEADS, 4.0, "custom")
    ref = _vit(num_classes=0, global_pool="token")
    ref.load_state_dict(vit_filter({"model": official}, ref), strict=True)
    torch.manual_seed(5)
    enc = build_encoder(_cfg(meta)).eval()
    enc.load_state_dict(state, strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_mae_finetuned_classifier_matches_timm(tmp_path, pool):
    model = _materialize(mae_layout("classifier", pool=pool), 1)
    path = write_official(tmp_path / "ft.pth", model, {**MAE_ARGS, "global_pool": pool == "avg"})
    state, meta = load_official(path, num_heads=HEADS)
    assert meta["kind"] == "classifier" and meta["layout"] == "timm-classifier"
    assert meta["pool"] == pool and meta["num_classes"] == CLASSES
    assert "decoder" not in meta["model_config"]
    ref = _vit(num_classes=CLASSES, global_pool="avg" if pool == "avg" else "token",
               fc_norm=pool == "avg")  # fmt: skip
    ref.load_state_dict(vit_filter(model, ref), strict=True)
    clf = Classifier(build_encoder(_cfg(meta), fixed_pos_embed=False), num_classes=CLASSES,
                     pool=meta["pool"]).eval()  # fmt: skip
    clf.load_timm_state_dict(state, strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_mae_linear_probe_kept_or_folded_matches_the_official_probe(tmp_path, pool):
    model = _materialize(mae_layout("linprobe", pool=pool), 2)
    path = write_official(tmp_path / "lp.pth", model, {**MAE_ARGS, "global_pool": pool == "avg"})
    # the official model: timm ViT, head = BatchNorm1d(affine=False, eps=1e-6) + Linear
    ref = _vit(num_classes=CLASSES, global_pool="avg" if pool == "avg" else "token",
               fc_norm=pool == "avg")  # fmt: skip
    ref.head = nn.Sequential(nn.BatchNorm1d(D, affine=False, eps=1e-6), nn.Linear(D, CLASSES))
    ref.load_state_dict(model, strict=True)
    ref.eval()
    x = _x()
    with torch.no_grad():
        want = ref(x)

    state, meta = load_official(path, num_heads=HEADS)
    assert meta["kind"] == "linear_probe" and meta["pool"] == pool
    assert meta["probe_num_batches_tracked"] == 1234
    probe = {k.removeprefix("probe."): v for k, v in state.items() if k.startswith("probe.")}
    assert sorted(probe) == ["bn.running_mean", "bn.running_var", "head.bias", "head.weight"]
    clf = Classifier(build_encoder(_cfg(meta), fixed_pos_embed=False), num_classes=CLASSES,
                     pool=pool).eval()  # fmt: skip
    missing, unexpected = clf.load_timm_state_dict(
        {k: v for k, v in state.items() if not k.startswith("probe.")}, strict=False
    )
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    with torch.no_grad():
        pooled = clf.fc_norm(clf.encoder.pool(clf.forward_features(x), pool))
        bn = F.batch_norm(pooled, probe["bn.running_mean"], probe["bn.running_var"], eps=1e-6)
        torch.testing.assert_close(F.linear(bn, probe["head.weight"], probe["head.bias"]), want,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip

    folded, fmeta = load_official(path, num_heads=HEADS, probe="fold")
    assert fmeta["kind"] == "classifier" and fmeta["official_kind"] == "mae-classifier"
    assert fmeta["folded_from"] == "mae-linprobe"
    clf.load_timm_state_dict(folded, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), want, atol=1e-5, rtol=1e-5)


class OfficialMAE(nn.Module):
    """models_mae.MaskedAutoencoderViT's forward pass (official attribute names), timm blocks."""

    def __init__(self, *, img, norm_pix_loss):
        super().__init__()
        ln = partial(nn.LayerNorm, eps=1e-6)
        self.p, self.norm_pix_loss = P, norm_pix_loss
        self.patch_embed = PatchEmbed(img, P, C, D)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(D, HEADS, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(DEPTH)
        )
        self.norm = ln(D)
        self.decoder_embed = nn.Linear(D, E)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, E))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, E), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(E, DEC_HEADS, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(DEC_DEPTH)
        )
        self.decoder_norm = ln(E)
        self.decoder_pred = nn.Linear(E, P * P * C)

    def patchify(self, imgs):
        p = self.p
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p**2 * 3)

    def random_masking(self, x, mask_ratio, noise):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length])
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_full_model_gives_the_official_loss_and_predictions(tmp_path, norm_pix):
    model = _materialize(mae_layout("pretrain"), 3)
    path = write_official(tmp_path / "ck.pth", model, {**MAE_ARGS, "norm_pix_loss": norm_pix})
    state, meta = load_official(path, **KW)
    assert meta["official_kind"] == "mae-pretrain" and meta["layout"] == "official-mae"
    assert meta["includes_decoder"] is True and meta["mask_ratio"] == 0.75
    assert meta["target"] == ("norm_pixels" if norm_pix else "pixels")
    assert meta["model_config"]["decoder"] == {"embed_dim": E, "depth": DEC_DEPTH,
                                               "num_heads": DEC_HEADS}  # fmt: skip
    assert set(state) == set(model)  # the official layout is mimkit's
    ref = OfficialMAE(img=16, norm_pix_loss=norm_pix).eval()
    ref.load_state_dict(model, strict=True)
    torch.manual_seed(9)
    mc = _cfg(meta)
    mae = MAE(
        build_encoder(mc),
        decoder_embed_dim=mc.decoder.embed_dim,
        decoder_depth=mc.decoder.depth,
        decoder_num_heads=mc.decoder.num_heads,
        mask_ratio=meta["mask_ratio"],
        norm_pix_loss=meta["target"] == "norm_pixels",
    ).eval()
    mae.load_state_dict(from_official_layout(state), strict=True)
    x = _x()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = mae(x, noise=noise)
        loss = mae.loss(x, out)
        ref_loss, ref_pred, ref_mask = ref(x, 0.75, noise)
    torch.testing.assert_close(out.pred, ref_pred, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.mask.mask.float(), ref_mask)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_heads_are_needed_when_no_shape_or_preset_says(tmp_path):
    path, _ = fixture(tmp_path, "mae-encoder")
    with pytest.raises(ValueError, match="num_heads="):
        load_official(path)
    path, _ = fixture(tmp_path, "mae-pretrain")
    with pytest.raises(ValueError, match="decoder_num_heads="):
        load_official(path, num_heads=HEADS)


def _expanded(layout: dict) -> dict[str, torch.Tensor]:
    """Full-size shapes with one stored element each (torch.save keeps the 1-element storage)."""
    one = torch.zeros(())
    return {k: v if isinstance(v, torch.Tensor) else one.expand(v) for k, v in layout.items()}


def test_full_size_official_shapes_are_recognised(tmp_path):
    # mae_visualize_vit_base-like: 224px, patch 16, ViT-B encoder, 512x8 decoder (heads inferred)
    d, depth, n = 768, 12, 196
    layout = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d),
              "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, 512),
              "decoder_pos_embed": (1, n + 1, 512), "decoder_embed.weight": (512, d),
              "decoder_embed.bias": (512,), "decoder_norm.weight": (512,),
              "decoder_norm.bias": (512,), "decoder_pred.weight": (768, 512),
              "decoder_pred.bias": (768,)}  # fmt: skip
    for i in range(depth):
        layout |= _block(f"blocks.{i}.", d, 4 * d, beit=False)
    for i in range(8):
        layout |= _block(f"decoder_blocks.{i}.", 512, 2048, beit=False)
    model = _expanded(layout)
    path = write_official(tmp_path / "mae_visualize_vit_base.pth", model, None, extras=False)
    state, meta = load_official(path)
    mc = meta["model_config"]
    assert (mc["arch"], mc["num_heads"], mc["img_size"], mc["patch_size"]) == (
        "vit_base", 12, 224, 16)  # fmt: skip
    assert mc["decoder"] == {"embed_dim": 512, "depth": 8, "num_heads": 16}
    assert "target" not in meta and "args" not in meta  # no args: the loss target is unknown
    out = save_official(state, meta, tmp_path / "back.pth")
    back = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert set(back) == set(model)


# ---- BEiT ----


def test_beit_pretrained_matches_timm_and_the_official_mim_head(tmp_path):
    path, official = fixture(tmp_path, "beit-pretrain")
    state, meta = load_official(path)  # heads from the relative position table
    assert meta["official_kind"] == "beit-pretrain" and meta["layout"] == "official-beit"
    assert meta["source"] == "official-beit" and meta["vocab_size"] == VOCAB
    assert meta["target"] == "visual_tokens" and meta["num_masked"] == 6
    assert meta["mean"] == [0.5, 0.5, 0.5]  # BEiT's default (Inception) normalization
    mc = meta["model_config"]
    assert (mc["num_heads"], mc["rel_pos_bias"], mc["abs_pos_emb"], mc["layer_scale"]) == (
        HEADS, "shared", False, 0.1)  # fmt: skip
    assert not any("relative_position_index" in k for k in state)
    ref = _beit(num_classes=0, use_shared_rel_pos_bias=True, use_fc_norm=False)
    enc_keys = {k: v for k, v in official.items() if not k.startswith(("lm_head", "mask_token"))}
    ref.load_state_dict(beit_filter(enc_keys, ref), strict=True)
    torch.manual_seed(3)
    model = BEiT(build_encoder(_cfg(meta)), vocab_size=meta["vocab_size"]).eval()
    model.load_state_dict(
        {(k if k.startswith("lm_head") else f"encoder.{k}"): v for k, v in state.items()},
        strict=True,
    )
    x = _x()
    g = torch.Generator().manual_seed(2)
    m = mask_from_bool(torch.stack([torch.randperm(16, generator=g) < 6 for _ in range(3)]))
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(x), ref.forward_features(x),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        out = model(x, m)
        # the official forward: masked patch embeddings become mask_token, shared bias, lm_head
        t = ref.patch_embed(x)
        w = m.mask.unsqueeze(-1).float()
        t = t * (1 - w) + official["mask_token"] * w
        t = torch.cat([ref.cls_token.expand(3, -1, -1), t], dim=1)
        bias = ref.rel_pos_bias()
        for blk in ref.blocks:
            t = blk(t, shared_rel_pos_bias=bias)
        t = ref.norm(t)[:, 1:]
        want = F.linear(t[m.mask], official["lm_head.weight"], official["lm_head.bias"])
    torch.testing.assert_close(out.pred, want, atol=1e-5, rtol=1e-5)


def test_beit_shared_table_can_become_per_layer_tables(tmp_path):
    path, official = fixture(tmp_path, "beit-pretrain")
    state, meta = load_official(path, rel_pos_bias="per_layer")
    assert meta["model_config"]["rel_pos_bias"] == "per_layer"
    assert "rel_pos_bias.relative_position_bias_table" not in state
    shared = official["rel_pos_bias.relative_position_bias_table"]
    for i in range(DEPTH):
        assert torch.equal(state[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    assert any("copied into 2 blocks" in n for n in meta["notes"])
    enc = build_encoder(_cfg(meta)).eval()
    enc.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"
                         and k != "lm_head.bias"}, strict=True)  # fmt: skip
    ref = _beit(num_classes=0, use_shared_rel_pos_bias=True, use_fc_norm=False)
    enc_keys = {k: v for k, v in official.items() if not k.startswith(("lm_head", "mask_token"))}
    ref.load_state_dict(beit_filter(enc_keys, ref), strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(("img", "pool"), [(16, "avg"), (24, "avg"), (32, "cls")])
def test_beit_finetuned_classifier_matches_timm(tmp_path, img, pool):
    """Per-block tables and indices (as at 224 / 384 / 512px), mean pooling or the cls token."""
    model = _materialize(beit_layout("classifier", img=img, pool=pool), 4)
    args = {**BEIT_ARGS, "input_size": img, "use_mean_pooling": pool == "avg"}
    path = write_official(tmp_path / "ft.pth", model, args, entry="module")
    state, meta = load_official(path)
    assert meta["official_entry"] == "module" and meta["img_size"] == img
    assert meta["kind"] == "classifier" and meta["pool"] == pool
    assert meta["model_config"]["rel_pos_bias"] == "per_layer"
    assert not any("relative_position_index" in k for k in state)
    ref = _beit(img, num_classes=CLASSES, use_rel_pos_bias=True,
                global_pool="avg" if pool == "avg" else "token")  # fmt: skip
    ref.load_state_dict(beit_filter({"module": model}, ref), strict=True)
    clf = Classifier(build_encoder(_cfg(meta), mask_token=False), num_classes=CLASSES,
                     pool=meta["pool"]).eval()  # fmt: skip
    clf.load_timm_state_dict(state, strict=True)
    x = _x(img)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref(x), atol=1e-5, rtol=1e-5)


def test_full_size_beit_large_512_is_recognised(tmp_path):
    d, g = 1024, 32
    index = official_relative_position_index(g)
    layout = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, 3, 16, 16),
              "patch_embed.proj.bias": (d,), "fc_norm.weight": (d,), "fc_norm.bias": (d,),
              "head.weight": (1000, d), "head.bias": (1000,)}  # fmt: skip
    for i in range(24):
        block = _block(f"blocks.{i}.", d, 4 * d, beit=True, g=None)
        block[f"blocks.{i}.attn.relative_position_bias_table"] = ((2 * g - 1) ** 2 + 3, 16)
        block[f"blocks.{i}.attn.relative_position_index"] = index
        layout |= block
    path = write_official(tmp_path / "beit_large_512.pth", _expanded(layout), None, extras=False)
    _, meta = load_official(path)
    mc = meta["model_config"]
    assert (mc["arch"], mc["img_size"], mc["num_heads"], mc["rel_pos_bias"]) == (
        "vit_large", 512, 16, "per_layer")  # fmt: skip


# ---- lossless round trips, whole files, native exports ----


@pytest.mark.parametrize("kind", sorted(FIXTURES))
def test_official_to_mimkit_to_official_is_lossless(tmp_path, kind):
    path, official = fixture(tmp_path, kind, seed=7)
    state, meta = load_official(path, **KW)
    out = save_official(state, meta, tmp_path / "back.pth")
    back = torch.load(out, map_location="cpu", weights_only=True)  # no allow-list needed
    assert list(back) == ["model"]
    assert set(back["model"]) == set(official)
    for k, v in official.items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k


def test_args_can_be_written_back_and_read_safely(tmp_path):
    path, _ = fixture(tmp_path, "mae-pretrain")
    state, meta = load_official(path, **KW)
    out = save_official(state, meta, tmp_path / "back.pth", include_args=True, entry="module")
    ck = read_official(out)
    assert ck.entry == "module" and ck.args == meta["args"] and ck.extras == []
    with pytest.raises(pickle.UnpicklingError):  # why include_args is off by default
        torch.load(out, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("kind", ["beit-classifier", "mae-pretrain"])
def test_import_to_safetensors_and_export_back(tmp_path, kind):
    path, official = fixture(tmp_path, kind, seed=8)
    dst = import_official(path, tmp_path / "model.safetensors", **KW)
    meta = read_metadata(dst)
    assert meta["format"] == "mimkit" and meta["official_kind"] == kind
    assert checkpoint_model_config(dst)["embed_dim"] == D
    w = load_encoder_weights(dst)  # mimkit's downstream loader takes it
    assert "blocks.1.mlp.fc2.weight" in w.encoder
    assert ("head.weight" in w.head) == (kind == "beit-classifier")
    out = export_official(dst, tmp_path / "back.pth")
    back = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert set(back) == set(official)
    assert all(torch.equal(back[k], v) for k, v in official.items())


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_native_mimkit_classifier_exports_to_an_official_file_timm_loads(tmp_path, method):
    extra = {"rel_pos_bias": "per_layer", "layer_scale": 0.1} if method == "beit" else {}
    mc = ModelConfig(method=method, arch="custom", img_size=16, patch_size=P, in_chans=C,
                     embed_dim=D, depth=DEPTH, num_heads=HEADS, **extra)  # fmt: skip
    torch.manual_seed(0)
    clf = Classifier(build_encoder(mc, fixed_pos_embed=False, mask_token=False),
                     num_classes=CLASSES, pool="avg", head_init_std=0.02).eval()  # fmt: skip
    with torch.no_grad():
        for n, p in clf.named_parameters():
            if "relative_position_bias_table" in n or "gamma" in n:
                p.normal_(0, 0.5)
    meta = {"format": "mimkit", "method": method, "model_config": {"num_heads": HEADS}}
    out = save_official(clf.state_dict(), meta, tmp_path / "native.pth")
    official = torch.load(out, map_location="cpu", weights_only=True)["model"]
    if method == "beit":
        assert torch.equal(
            official["blocks.0.attn.relative_position_index"], official_relative_position_index(4)
        )
        ref = _beit(num_classes=CLASSES, use_rel_pos_bias=True)
        ref.load_state_dict(beit_filter(official, ref), strict=True)
    else:
        ref = _vit(num_classes=CLASSES, global_pool="avg", fc_norm=True)
        ref.load_state_dict(vit_filter(official, ref), strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mae-pretrain"):
        save_official(clf.state_dict(), meta, tmp_path / "x.pth", kind="mae-pretrain")


# ---- strictness ----


def test_strict_lists_unexpected_missing_and_mismatched_keys_in_one_error(tmp_path):
    model = _materialize(mae_layout("encoder"), 0)
    model["foo.bar"] = torch.zeros(3)
    del model["blocks.1.norm1.weight"]
    model["norm.bias"] = torch.zeros(D + 1)
    path = write_official(tmp_path / "bad.pth", model, MAE_ARGS)
    with pytest.raises(ValueError) as err:
        load_official(path, num_heads=HEADS)
    msg = str(err.value)
    assert "unexpected keys (1): ['foo.bar']" in msg
    assert "missing keys (1): ['blocks.1.norm1.weight']" in msg
    assert "mismatched keys (1): ['norm.bias (33,) != (32,)']" in msg
    assert str(path) in msg and "strict=False" in msg
    state, meta = load_official(path, num_heads=HEADS, strict=False)
    assert meta["unexpected_keys"] == ["foo.bar"]
    assert meta["missing_keys"] == ["blocks.1.norm1.weight"]
    assert meta["mismatched_keys"] == ["norm.bias (33,) != (32,)"]
    assert "foo.bar" not in state and "norm.bias" not in state and "norm.weight" in state
    enc = build_encoder(_cfg(meta))
    missing, unexpected = enc.load_state_dict(state, strict=False)
    assert sorted(missing) == ["blocks.1.norm1.weight", "norm.bias"] and not unexpected


def test_a_wrong_relative_position_index_is_refused(tmp_path):
    model = _materialize(beit_layout("classifier"), 0)
    model["blocks.1.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    path = write_official(tmp_path / "idx.pth", model, BEIT_ARGS)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.relative_position_index differs"):
        load_official(path)
    _, meta = load_official(path, strict=False)
    assert meta["mismatched_keys"] == [
        "blocks.1.attn.relative_position_index differs from the standard relative position index"
    ]
    model["blocks.1.attn.relative_position_index"] = torch.zeros(5, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape("index (5, 5) != (17, 17)")):
        convert_official(model)
    # files without the buffers (e.g. filtered by timm) are fine: mimkit recomputes them
    plain = {k: v for k, v in model.items() if "relative_position_index" not in k}
    state, meta = convert_official(plain)
    assert any("no relative_position_index" in n for n in meta["notes"])
    assert set(state) == set(load_official(path, strict=False)[0])


def test_conversion_leaves_the_global_rng_alone(tmp_path):
    model = _materialize(beit_layout("classifier", img=20), 0)  # a spec no other test builds
    path = write_official(tmp_path / "rng.pth", model, BEIT_ARGS)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    load_official(path)
    assert torch.equal(torch.get_rng_state(), before)


def test_in_memory_conversion_and_bad_options():
    model = _materialize(beit_layout("pretrain"), 0)
    state, meta = convert_official(
        {f"module.{k}": v for k, v in model.items()}, args=argparse.Namespace(**BEIT_ARGS)
    )
    assert meta["official_kind"] == "beit-pretrain" and state["cls_token"] is model["cls_token"]
    assert any("'module.' key prefix" in n for n in meta["notes"])
    with pytest.raises(ValueError, match="rel_pos_bias must be"):
        convert_official(model, rel_pos_bias="shared")
    with pytest.raises(ValueError, match=r"no 'patch_embed\.proj\.weight'"):
        convert_official({"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="img_size=24 does not match"):
        convert_official(model, img_size=24)


# ---- hostile files ----


class TouchFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


class RunShell:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_safe_globals_is_the_namespace_only():
    assert tuple(SAFE_GLOBALS) == (argparse.Namespace,)


def _pickle_bytes(path) -> bytes:
    """The pickle stream of a torch.save file (zip archive, or the legacy format)."""
    if not zipfile.is_zipfile(path):
        return pathlib.Path(path).read_bytes()
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("where", ["args", "model", "extra"])
@pytest.mark.parametrize("payload", [TouchFile, RunShell])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, where, payload, legacy):
    target = tmp_path / "pwned"
    model = _materialize(mae_layout("encoder"), 0)
    obj = {"model": model, "args": argparse.Namespace(**MAE_ARGS)}
    evil = payload(target)
    if where == "model":
        model["blocks.0.norm1.weight"] = evil
    elif where == "args":
        obj["args"] = argparse.Namespace(**MAE_ARGS, hook=evil)
    else:
        obj["epoch"] = evil
    torch.save(obj, tmp_path / "evil.pth", _use_new_zipfile_serialization=not legacy)
    raw = _pickle_bytes(tmp_path / "evil.pth")  # the payload is really in there
    assert (b"touch" in raw) and (b"system" in raw or b"pathlib" in raw)
    assert not target.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as err:
        load_official(tmp_path / "evil.pth", num_heads=HEADS)
    assert isinstance(err.value, ValueError) and "nothing in the file was run" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        read_official(tmp_path / "evil.pth")
    assert not target.exists()


def test_args_holding_other_objects_are_refused_too(tmp_path):
    model = _materialize(mae_layout("encoder"), 0)
    args = argparse.Namespace(**{**MAE_ARGS, "output_dir": pathlib.PosixPath("/tmp/x")})
    torch.save({"model": model, "args": args}, tmp_path / "p.pth")
    with pytest.raises(UnsafeCheckpointError, match="PosixPath"):
        load_official(tmp_path / "p.pth", num_heads=HEADS)


def test_garbage_and_non_checkpoints_are_value_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_official(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="no 'model' or 'module' entry"):
        load_official(tmp_path / "odd.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "nt.pth")
    with pytest.raises(ValueError, match="non-tensor values"):
        load_official(tmp_path / "nt.pth")
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "absent.pth")
