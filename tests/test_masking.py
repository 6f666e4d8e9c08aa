import pytest
import torch

from mimkit.masking import num_visible, random_masking


@pytest.mark.parametrize(("n", "ratio"), [(196, 0.75), (49, 0.75), (16, 0.4), (10, 0.9)])
def test_visible_count_and_no_duplicates(n, ratio):
    m = random_masking(5, n, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(n * (1 - ratio))
    assert num_visible(n, ratio) == keep
    assert m.ids_keep.shape == (5, keep)
    assert (m.mask.sum(1) == n - keep).all()
    for row_keep, row_mask in zip(m.ids_keep, m.mask, strict=True):
        assert len(set(row_keep.tolist())) == keep  # no duplicates
        assert not row_mask[row_keep].any()  # kept patches are exactly the unmasked ones


def test_restore_inverts_shuffle():
    m = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 49, 3)
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, 3))
    restored = torch.gather(shuffled, 1, m.ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored, x)
    assert torch.equal(ids_shuffle[:, : m.ids_keep.shape[1]], m.ids_keep)


def test_same_noise_same_mask_and_seeded_generator():
    noise = torch.rand(3, 49)
    a, b = random_masking(3, 49, 0.75, noise=noise), random_masking(3, 49, 0.75, noise=noise)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(7))
    d = random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(7))
    assert torch.equal(c.mask, d.mask)
    assert not torch.equal(c.mask, random_masking(3, 49, 0.75).mask)  # per-sample, random


def test_masks_differ_across_samples():
    m = random_masking(8, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in m.mask}) == 8


def test_bad_inputs():
    with pytest.raises(ValueError, match="ratio"):
        random_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match="shape"):
        random_masking(2, 16, 0.5, noise=torch.rand(2, 15))
