"""Blockwise masking (BEiT Algorithm 1) against a plain reference written here."""

import math
import random
from collections import Counter

import pytest
import torch

from mimkit.masking import blockwise_mask, mask_from_bool


def reference_blockwise(h, w, num_masked, min_block, rng, min_aspect=0.3):
    """A literal transcription of Algorithm 1 with the official acceptance rule and top-up."""
    grid = [[0] * w for _ in range(h)]
    count = 0
    while count < num_masked:
        budget = num_masked - count
        delta = 0
        for _ in range(10):
            s = rng.uniform(min_block, budget)
            r = math.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
            a, b = round(math.sqrt(s * r)), round(math.sqrt(s / r))
            if a < h and b < w:
                top, left = rng.randint(0, h - a), rng.randint(0, w - b)
                cells = [(i, j) for i in range(top, top + a) for j in range(left, left + b)]
                new = sum(1 for i, j in cells if not grid[i][j])
                if 0 < new <= budget:
                    for i, j in cells:
                        grid[i][j] = 1
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    if count < num_masked:
        free = [(i, j) for i in range(h) for j in range(w) if not grid[i][j]]
        for i, j in rng.sample(free, num_masked - count):
            grid[i][j] = 1
    return torch.tensor(grid, dtype=torch.bool)


@pytest.mark.parametrize(
    ("grid", "n", "min_block"), [((14, 14), 75, 16), ((7, 7), 20, 4), ((4, 6), 10, 2)]
)
def test_exact_count_and_determinism(grid, n, min_block):
    for seed in range(50):
        m = blockwise_mask(grid, n, min_block=min_block, rng=seed)
        assert m.shape == grid and int(m.sum()) == n
        assert torch.equal(m, blockwise_mask(grid, n, min_block=min_block, rng=seed))


def test_matches_the_reference_exactly_for_the_same_random_stream():
    for seed in range(200):
        ours = blockwise_mask((14, 14), 75, min_block=16, rng=random.Random(seed))
        ref = reference_blockwise(14, 14, 75, 16, random.Random(seed))
        assert torch.equal(ours, ref)


def test_every_position_reachable_and_masks_are_blocky():
    hits = torch.zeros(14, 14)
    neighbours = []
    for seed in range(400):
        m = blockwise_mask((14, 14), 75, min_block=16, rng=seed)
        hits += m
        # blockwise: a masked patch usually has a masked 4-neighbour (random masking: ~40%)
        mf = m.float()
        nb = torch.zeros_like(mf)
        nb[1:] += mf[:-1]
        nb[:-1] += mf[1:]
        nb[:, 1:] += mf[:, :-1]
        nb[:, :-1] += mf[:, 1:]
        neighbours.append(((nb > 0) & m).sum() / m.sum())
    assert (hits > 0).all()
    assert torch.stack(neighbours).mean() > 0.9


def test_count_distribution_and_block_shapes_match_reference():
    # masked count before top-up and first-block shape statistics agree in distribution
    ours = Counter(int(blockwise_mask((7, 7), 20, min_block=4, rng=s)[0].sum()) for s in range(300))
    ref = Counter(
        int(reference_blockwise(7, 7, 20, 4, random.Random(s))[0].sum()) for s in range(300)
    )
    assert ours == ref


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_masked"):
        blockwise_mask((4, 4), 16)
    with pytest.raises(ValueError, match="min_block"):
        blockwise_mask((4, 4), 5, min_block=0)


def test_mask_from_bool():
    m = torch.tensor([[True, False, True, False], [False, False, True, True]])
    mk = mask_from_bool(m)
    assert mk.ids_keep.tolist() == [[1, 3], [0, 1]]
    x = torch.arange(8).view(2, 4)
    shuffled = torch.gather(x, 1, torch.argsort(mk.ids_restore, dim=1))
    assert torch.equal(torch.gather(shuffled, 1, mk.ids_restore), x)
    with pytest.raises(ValueError, match="same number"):
        mask_from_bool(torch.tensor([[True, False], [True, True]]))


def test_blocks_inside_the_grid_with_bounded_aspect_and_area():
    log_aspects = []
    for seed in range(300):
        blocks = []
        m = blockwise_mask((14, 14), 75, min_block=16, rng=seed, blocks=blocks)
        assert blocks
        cover = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, a, b in blocks:
            assert top >= 0 and left >= 0 and top + a <= 14 and left + b <= 14
            assert a < 14 and b < 14  # strictly smaller than the grid, as the official code
            # r in [0.3, 1/0.3] before each side is rounded (sides >= 2 since area >= 16)
            assert 0.3 / 2 <= a / b <= 2 / 0.3
            log_aspects.append(math.log(a / b))
            cover[top : top + a, left : left + b] = True
        assert torch.equal(cover | m, m)  # every block is masked; the rest is the top-up
    mean = sum(log_aspects) / len(log_aspects)
    assert abs(mean) < 0.1  # log-uniform aspect ratios: tall and wide blocks alike
