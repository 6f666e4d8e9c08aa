import pytest
import timm
import torch
from timm.models.beit import Beit

from mimkit.masking import blockwise_mask, mask_from_bool
from mimkit.models.beit import BEiT, BEiTEncoder, mim_pixel_loss, mim_token_loss

ARGS = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3, num_heads=3)


@pytest.mark.parametrize(
    "pos",
    [
        dict(abs_pos_emb=False, shared_rel_pos_bias=True, rel_pos_bias=False),  # pretraining
        dict(abs_pos_emb=False, shared_rel_pos_bias=False, rel_pos_bias=True),  # fine-tuning
        dict(abs_pos_emb=True, shared_rel_pos_bias=False, rel_pos_bias=False),
    ],
)
def test_encoder_is_timm_beit_key_for_key(pos):
    torch.manual_seed(0)
    ours = BEiTEncoder(**ARGS, layer_scale=0.1, **pos).eval()
    with torch.no_grad():  # non-trivial relative position tables and layer scales
        for n, p in ours.named_parameters():
            if "relative_position_bias_table" in n or "gamma" in n:
                p.normal_(0, 0.5)
    ref = timm.create_model(
        "beit_base_patch16_224", pretrained=False, **ARGS, num_classes=0, use_fc_norm=False,
        init_values=0.1, use_abs_pos_emb=pos["abs_pos_emb"],
        use_shared_rel_pos_bias=pos["shared_rel_pos_bias"], use_rel_pos_bias=pos["rel_pos_bias"],
    ).eval()  # fmt: skip
    assert isinstance(ref, Beit)
    state = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_mask_token_replaces_masked_embeddings_only():
    torch.manual_seed(0)
    enc = BEiTEncoder(**ARGS)
    x = torch.randn(2, 3, 32, 32)
    m = mask_from_bool(
        torch.stack([blockwise_mask((4, 4), 6, min_block=2, rng=s) for s in (0, 1)]).flatten(1)
    )
    plain, masked = enc.embed(x), enc.embed(x, m)
    keep = torch.cat([torch.zeros(2, 1, dtype=torch.bool), m.mask], 1)
    assert torch.equal(plain[~keep], masked[~keep])
    assert torch.allclose(masked[:, 1:][m.mask], enc.mask_token.expand(2, 16, -1)[m.mask])


def test_rescale_init_and_interface():
    torch.manual_seed(0)
    enc = BEiTEncoder(**{**ARGS, "depth": 6, "embed_dim": 192})
    s0 = enc.blocks[0].attn.proj.weight.std().item()
    s5 = enc.blocks[5].attn.proj.weight.std().item()
    assert s5 / s0 == pytest.approx((1 / 6) ** 0.5, rel=0.15)  # divided by sqrt(2 * layer)
    assert "rel_pos_bias.relative_position_bias_table" in enc.no_weight_decay()
    assert enc.layer_id("blocks.3.attn.qkv.weight") == 4


def test_mim_loss_only_on_masked_positions_and_head_options():
    torch.manual_seed(0)
    enc = BEiTEncoder(**ARGS)
    model = BEiT(enc, vocab_size=32)
    x = torch.randn(2, 3, 32, 32)
    m = mask_from_bool(
        torch.stack([blockwise_mask((4, 4), 6, min_block=2, rng=s) for s in (0, 1)]).flatten(1)
    )
    out = model(x, m)
    assert out.pred.shape == (12, 32) and torch.equal(out.positions, m.mask)
    ids = torch.randint(0, 32, (2, 16))
    loss, acc = mim_token_loss(out.pred, ids, out.positions)
    changed = ids.clone()
    changed[~m.mask] = (changed[~m.mask] + 1) % 32  # targets of visible patches do not matter
    assert torch.equal(mim_token_loss(out.pred, changed, out.positions)[0], loss)
    changed = ids.clone()
    changed[m.mask] = (changed[m.mask] + 1) % 32
    assert mim_token_loss(out.pred, changed, out.positions)[0] != loss
    assert 0 <= acc <= 1
    loss.backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().sum() > 0
    all_pos = BEiT(enc, vocab_size=32, loss_on="all")(x, m)
    assert all_pos.pred.shape == (32, 32)
    pix = BEiT(enc, pixel_dim=8 * 8 * 3)(x, m)
    assert mim_pixel_loss(pix.pred, torch.randn(2, 16, 192), pix.positions).ndim == 0
    with pytest.raises(ValueError, match="exactly one"):
        BEiT(enc, vocab_size=8, pixel_dim=8)
