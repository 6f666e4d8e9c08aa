import torch

from mimkit.losses import masked_mse
from mimkit.masking import random_masking
from mimkit.models.mae import mae_loss
from mimkit.targets import (
    denormalize_patches,
    normalize_patches,
    patchify,
    pixel_target,
    unpatchify,
)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, 4)
    assert p.shape == (2, 4 * 6, 4 * 4 * 3)
    assert torch.equal(unpatchify(p, 4, 3, (4, 6)), x)
    # official MAE layout: patch (row 1, col 2) flattened as (p, p, C)
    expected = x[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[0, 1 * 6 + 2], expected)


def test_square_unpatchify_default_grid():
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(unpatchify(patchify(x, 7), 7, 1), x)


def test_norm_pix_target_and_inverse():
    x = torch.rand(2, 3, 8, 8)
    t = pixel_target(x, 4, norm_pix=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 4), atol=1e-5)
    patches = patchify(x, 4)
    normed, _, _ = normalize_patches(patches)
    assert torch.allclose(denormalize_patches(normed, patches), patches, atol=1e-5)
    assert torch.equal(pixel_target(x, 4, norm_pix=False), patches)


def test_loss_depends_only_on_masked_patches():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16)
    mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(2, 16, 48)
    base = mae_loss(pred, imgs, mask, 4, norm_pix=True)
    visible = ~mask.mask
    changed = pred.clone()
    changed[visible] += 100.0  # visible predictions are not part of the loss
    assert torch.equal(mae_loss(changed, imgs, mask, 4, norm_pix=True), base)
    changed = pred.clone()
    changed[mask.mask] += 1.0
    assert mae_loss(changed, imgs, mask, 4, norm_pix=True) != base


def test_masked_mse_value():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])
    assert masked_mse(pred, target, torch.tensor([[True, False]])).item() == 1.0
    assert masked_mse(pred, target, torch.tensor([[True, True]])).item() == 5.0
