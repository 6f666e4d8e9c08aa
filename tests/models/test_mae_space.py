"""MAE's ablations as options of one model (MAE Table 1c-d, Fig. 6, Sec. 4): the loss on every
patch, visual-token targets, the mask token in the encoder, grid-wise sampling."""

import pytest
import torch

from mimkit.masking import MaskSampler, grid_mask, grid_step, mask_from_bool, random_masking
from mimkit.models import MAE, VisionTransformer
from mimkit.models.mae import from_official_layout, to_official_layout


def _mae(**kw):
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                            num_heads=2)  # fmt: skip
    return MAE(enc, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **kw)


def _batch(b=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 16, 16, generator=g), random_masking(b, 16, 0.75, generator=g)


def test_the_default_is_the_paper_pixel_loss_on_masked_patches():
    imgs, mask = _batch()
    model = _mae()
    out = model(imgs, mask=mask)
    t = imgs.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(3, 16, 16)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.pred - t) ** 2).mean(-1)
    want = per_patch[mask.mask].mean()
    assert torch.allclose(model.loss(imgs, out), want, atol=1e-5)


def test_loss_on_all_patches_averages_every_patch():
    imgs, mask = _batch()
    masked, every = _mae(), _mae(loss_on="all")
    out = every(imgs, mask=mask)
    assert torch.equal(out.pred, masked(imgs, mask=mask).pred)  # the same model, other loss
    full = mask._replace(mask=torch.ones_like(mask.mask))
    assert torch.allclose(every.loss(imgs, out), masked.loss(imgs, out._replace(mask=full)))
    assert not torch.allclose(every.loss(imgs, out), masked.loss(imgs, out))
    with pytest.raises(ValueError, match="loss_on"):
        _mae(loss_on="visible")


def test_visual_token_targets_are_a_cross_entropy_over_the_vocabulary():
    imgs, mask = _batch()
    model = _mae(vocab_size=50)
    out = model(imgs, mask=mask)
    assert out.pred.shape == (3, 16, 50)
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    want = torch.nn.functional.cross_entropy(out.pred[mask.mask], ids[mask.mask])
    assert torch.allclose(model.loss(imgs, out, ids), want)
    with pytest.raises(ValueError, match="target_ids"):
        model.loss(imgs, out)
    model.loss(imgs, out, ids).backward()
    assert model.decoder_pred.weight.grad is not None


def test_the_mask_token_in_the_encoder_sees_every_position():
    imgs, mask = _batch()
    model = _mae(mask_token_in_encoder=True)
    out = model(imgs, mask=mask)
    assert out.latent.shape == (3, 17, 32) and out.pred.shape == (3, 16, 16)
    # the masked positions' content does not reach the encoder: only the token does
    changed = imgs.clone()
    hidden = mask.mask[0].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    changed[0, 0][hidden] += 5.0
    assert torch.allclose(model(changed, mask=mask).latent, out.latent, atol=1e-5)
    model.loss(imgs, out).backward()
    assert model.encoder_mask_token.grad is not None and model.mask_token.grad is None
    # a pretraining-only key, beside the decoder's, in the official layout and back
    state = to_official_layout(model.state_dict())
    assert "encoder_mask_token" in state and "mask_token" in state
    assert from_official_layout(state).keys() == model.state_dict().keys()
    assert "encoder_mask_token" in {n for n, _ in model.named_parameters()}
    assert "encoder_mask_token" in model.no_weight_decay()


def test_grid_wise_sampling_keeps_one_patch_of_every_cell():
    assert grid_step(0.75) == 2 and grid_step(8 / 9) == 3
    m = grid_mask((4, 4), 0.75)
    assert (~m).nonzero().tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert int(grid_mask((7, 7), 0.75).sum()) == 33  # 16 kept: a side of 7 keeps 4 per row
    with pytest.raises(ValueError, match="1 - 1/s"):
        grid_step(0.6)
    sampler = MaskSampler("grid", (4, 4), 12, ratio=0.75)
    a = sampler(torch.Generator().manual_seed(0))
    assert torch.equal(a, sampler(torch.Generator().manual_seed(1)))  # no randomness
    mask = mask_from_bool(torch.stack([a, a]), num_masked=12)
    imgs = torch.randn(2, 1, 16, 16)
    out = _mae()(imgs, mask=mask)
    assert out.latent.shape == (2, 5, 32)  # cls + 4 kept patches
    with pytest.raises(ValueError, match="grid pattern masks"):
        MaskSampler("grid", (4, 4), 10, ratio=0.75)


@pytest.mark.parametrize(
    "switch",
    [
        {"target.loss_on": "all"},
        {"model.mask_token_in_encoder": True},
        {"mask.strategy": "grid", "mask.ratio": 0.75},
        {"mask.strategy": "blockwise"},
    ],
    ids=["loss-on-all", "mask-token-in-encoder", "grid", "blockwise"],
)
def test_every_mae_switch_pretrains_from_a_recipe(tmp_path, switch):
    from mimkit.config import load_config
    from mimkit.tasks.pretrain import run_pretrain
    from mimkit.weights import read_metadata
    from tests.conftest import DEMO, tiny_overrides

    over = tiny_overrides(tmp_path / "run", **{"train.max_steps": 2, **switch})
    res = run_pretrain(load_config(DEMO, over))
    assert res.train.step == 2 and torch.isfinite(torch.tensor(res.train.loss))
    meta = read_metadata(res.encoder_path)
    assert meta["mask_strategy"] == switch.get("mask.strategy", "random")
    assert meta["model_config"]["mask_token_in_encoder"] == switch.get(
        "model.mask_token_in_encoder", False
    )


def test_grid_masking_needs_a_ratio_it_can_draw(tmp_path):
    from mimkit.config import ConfigError, load_config
    from tests.conftest import DEMO, tiny_overrides

    with pytest.raises(ConfigError, match=r"mask\.ratio=0\.6 is not allowed: grid masking"):
        load_config(DEMO, tiny_overrides(tmp_path, **{"mask.strategy": "grid", "mask.ratio": 0.6}))
    with pytest.raises(ConfigError, match=r"model\.mask_token_in_encoder=True .*MAE only"):
        beit = {"model.method": "beit", "model.mask_token_in_encoder": True}
        load_config(DEMO, tiny_overrides(tmp_path, **beit))
