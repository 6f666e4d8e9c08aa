import numpy as np
import pytest
import timm
import torch

from mimkit.models import MAE, VisionTransformer, build_mae
from mimkit.models.mae import from_official_layout, to_official_layout
from mimkit.models.pos_embed import sincos_2d


def _official_sincos(dim, grid_size):
    """The official MAE numpy construction (util/pos_embed.py), restated as an oracle."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_official_layout():
    ours = sincos_2d(64, (7, 7), cls_token=True).numpy()
    assert np.allclose(ours, _official_sincos(64, 7), atol=1e-6)


def _vit(**kw):
    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3, num_heads=3)
    return VisionTransformer(**{**args, **kw})


def test_state_dict_is_timm_vit_and_features_match():
    torch.manual_seed(0)
    ours = _vit().eval()
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0,
        img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3, num_heads=3,
    ).eval()  # fmt: skip
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), ref.forward_features(x), atol=1e-6)
        ref_mid = ref.forward_intermediates(x, indices=[0, 2], intermediates_only=True,
                                            output_fmt="NLC", norm=False)  # fmt: skip
        ours_mid = ours.forward_intermediates(x, [0, 2])
    for a, b in zip(ours_mid, ref_mid, strict=True):
        assert torch.allclose(a[:, 1:], b, atol=1e-5)


def test_masked_features_equal_gathered_tokens_of_first_layer():
    torch.manual_seed(0)
    enc = _vit(depth=1).eval()
    mae = MAE(enc, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    mask = mae.mask(2, noise=torch.rand(2, enc.num_patches))
    tokens = enc.embed(torch.randn(2, 3, 32, 32), mask)
    assert tokens.shape == (2, 1 + mask.ids_keep.shape[1], 48)


def test_interface():
    enc = _vit()
    assert enc.no_weight_decay() == {"pos_embed", "cls_token"}
    assert enc.layer_id("patch_embed.proj.weight") == 0
    assert enc.layer_id("blocks.2.mlp.fc1.weight") == 3
    assert enc.layer_id("norm.weight") == enc.num_layers - 1
    assert not enc.pos_embed.requires_grad  # MAE's fixed sin-cos
    t = torch.randn(2, 5, 48)
    assert torch.equal(enc.pool(t, "cls"), t[:, 0])
    assert torch.allclose(enc.pool(t, "avg"), t[:, 1:].mean(1))
    with pytest.raises(ValueError):
        enc.pool(t, "max")


def test_mae_shapes_noise_and_official_keys(tiny_cfg):
    torch.manual_seed(0)
    model = build_mae(tiny_cfg).eval()
    x = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        a, b = model(x, noise=noise), model(x, noise=noise)
    assert a.pred.shape == (3, 16, 4 * 4 * 3)
    assert a.latent.shape == (3, 1 + 4, 32)
    assert torch.equal(a.pred, b.pred)
    keys = set(to_official_layout(model.state_dict()))
    assert {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "decoder_pred.weight",
            "decoder_embed.weight", "decoder_norm.weight", "norm.weight"} <= keys  # fmt: skip
    assert from_official_layout(to_official_layout(model.state_dict())).keys() == (
        model.state_dict().keys()
    )


def test_overfit_one_batch(tiny_cfg):
    torch.manual_seed(0)
    model = build_mae(tiny_cfg)
    x = torch.randn(8, 3, 16, 16)
    noise = torch.rand(8, 16)  # a fixed batch with a fixed mask
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        out = model(x, noise=noise)
        loss = model.loss(x, out)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_mae_takes_a_given_mask(tiny_cfg):
    from mimkit.masking import blockwise_mask, mask_from_bool

    torch.manual_seed(0)
    model = build_mae(tiny_cfg).eval()
    bools = torch.stack(
        [blockwise_mask((4, 4), 12, min_block=2, rng=s).flatten() for s in range(3)]
    )
    with torch.no_grad():
        out = model(torch.randn(3, 3, 16, 16), mask=mask_from_bool(bools))
    assert torch.equal(out.mask.mask, bools) and out.latent.shape == (3, 1 + 4, 32)


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    """model.grad_checkpointing recomputes activations in backward: same loss and gradients
    (drop path on: its RNG is replayed)."""
    from mimkit.config import load_config
    from mimkit.masking import MaskSampler, mask_from_bool
    from mimkit.models import build_beit, build_mae
    from tests.conftest import DEMO, tiny_overrides

    extra = ["model.drop_path=0.2", "model.decoder.depth=2"]
    if method == "beit":
        extra += ["model.method=beit", "target.kind=pixels", "mask.strategy=blockwise",
                  "mask.num_masked=6", "mask.min_block=2"]  # fmt: skip
    grads = []
    for ckpt_on in (False, True):
        cfg = load_config(DEMO, [*tiny_overrides("/tmp/unused"), *extra,
                                 f"model.grad_checkpointing={ckpt_on}"])  # fmt: skip
        torch.manual_seed(0)
        model = build_mae(cfg) if method == "mae" else build_beit(cfg, vocab_size=None)
        assert model.encoder.grad_checkpointing is ckpt_on
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        if method == "mae":
            out = model(x)
            loss = model.loss(x, out)
        else:
            g = torch.Generator().manual_seed(3)
            sampler = MaskSampler("blockwise", (4, 4), 6, min_block=2)
            mask = mask_from_bool(torch.stack([sampler(g) for _ in range(4)]))
            loss = model(x, mask).pred.square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)
