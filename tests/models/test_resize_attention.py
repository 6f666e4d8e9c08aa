"""Resizing position information to a new patch grid, and explicit attention probabilities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import gen_relative_position_index

from mimkit.models.attention import attention_maps
from mimkit.models.beit import BEiTEncoder
from mimkit.models.pos_embed import sincos_1d, sincos_2d
from mimkit.models.resize import (
    expand_shared_rel_pos_bias,
    resize_abs_pos_embed,
    resize_encoder_state,
    resize_rel_pos_bias_table,
)
from mimkit.models.vit import VisionTransformer
from mimkit.viz import save_attention_figure

TINY = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
BEIT_KINDS = {
    "beit_shared": {"shared_rel_pos_bias": True},
    "beit_per_layer": {"shared_rel_pos_bias": False, "rel_pos_bias": True, "layer_scale": 0.5},
    "beit_abs": {"shared_rel_pos_bias": False, "abs_pos_emb": True},
}
KINDS = ["vit", *BEIT_KINDS]


def build(kind: str, img_size: int = 16, **extra):
    torch.manual_seed(0)
    if kind == "vit":
        return VisionTransformer(img_size=img_size, **TINY, **extra)
    return BEiTEncoder(img_size=img_size, **TINY, **BEIT_KINDS[kind], **extra)


def scramble(encoder) -> None:
    """Large random weights, so attention is far from uniform and every bias matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(("qkv.weight", "relative_position_bias_table", "q_bias", "v_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "qkv" in name else 1.0))
            elif name.endswith(("pos_embed", "qkv.bias")):
                p.copy_(torch.randn(p.shape, generator=g))


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def sincos_at(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 2-D sin-cos embedding (as sincos_2d) at fractional grid positions, (R*C, dim)."""
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], 1)
    return emb.float()


# ---- absolute position embeddings ----


def test_pos_embed_same_grid_is_identity():
    pe = torch.randn(1, 1 + 6 * 8, 16)
    assert resize_abs_pos_embed(pe, old_grid=(6, 8), new_grid=(6, 8)) is pe


def test_pos_embed_shapes_and_prefix():
    pe = torch.randn(1, 1 + 4 * 4, 16)
    out = resize_abs_pos_embed(pe, old_grid=(4, 4), new_grid=(6, 8))
    assert out.shape == (1, 1 + 6 * 8, 16)
    assert torch.equal(out[:, :1], pe[:, :1])  # cls kept
    pe2 = torch.randn(1, 2 + 3 * 5, 8)
    out2 = resize_abs_pos_embed(pe2, old_grid=(3, 5), new_grid=(5, 2), num_prefix_tokens=2)
    assert out2.shape == (1, 2 + 5 * 2, 8) and torch.equal(out2[:, :2], pe2[:, :2])
    with pytest.raises(ValueError, match="tokens"):
        resize_abs_pos_embed(pe, old_grid=(4, 5), new_grid=(6, 6))


def test_pos_embed_linear_ramp_stays_monotone_and_rows_cols_not_mixed():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    grid = torch.stack([rows, cols, rows + 0.5 * cols], -1).reshape(1, 16, 3)  # (1, 16, 3)
    pe = torch.cat([torch.zeros(1, 1, 3), grid], 1)
    out = resize_abs_pos_embed(pe, old_grid=(4, 4), new_grid=(6, 8))[0, 1:].reshape(6, 8, 3)
    # channel 0 (the row) varies along rows only, channel 1 (the column) along columns only
    assert torch.allclose(out[..., 0], out[:, :1, 0].expand(6, 8), atol=1e-6)
    assert torch.allclose(out[..., 1], out[:1, :, 1].expand(6, 8), atol=1e-6)
    assert (out[1:, :, 0] - out[:-1, :, 0]).min() > 0
    assert (out[:, 1:, 1] - out[:, :-1, 1]).min() > 0
    assert (out[1:, :, 2] - out[:-1, :, 2]).min() > 0
    assert (out[:, 1:, 2] - out[:, :-1, 2]).min() > 0


def test_pos_embed_sincos_resize_is_sensible():
    dim = 32
    pe7 = sincos_2d(dim, (7, 7), cls_token=True)[None]  # (1, 50, D)
    pe14 = resize_abs_pos_embed(pe7, old_grid=(7, 7), new_grid=(14, 14))
    # with align_corners=False, new cell i sits at old coordinate (i + 0.5) * 7/14 - 0.5, so the
    # resized table should be the sin-cos function sampled there (measured mean error ~0.007;
    # shuffling the tokens gives ~0.18). NB: it is *not* sincos_2d built at 14x14, which encodes
    # positions 0..13 (mean error ~0.22 there, worse than shuffled).
    pos = torch.arange(14) / 2 - 0.25
    err = (pe14[0, 1:] - sincos_at(dim, pos, pos)).abs()
    assert err.mean() < 0.02
    shuffled = pe14[0, 1:][torch.randperm(196, generator=torch.Generator().manual_seed(0))]
    assert (pe14[0, 1:] - shuffled).abs().mean() > 5 * err.mean()
    back = resize_abs_pos_embed(pe14, old_grid=(14, 14), new_grid=(7, 7))
    assert (back - pe7).abs().mean() < 0.01  # measured ~0.0013
    assert torch.equal(pe14[:, 0], pe7[:, 0])


# ---- relative position bias tables ----


def table_of(f, window: tuple[int, int], extra=(7.0, 8.0, 9.0)) -> torch.Tensor:
    """A (offsets + 3, 2) table laid out as documented: row-major (2h-1, 2w-1) grid of (dh, dw).

    Head 0 holds f(dh, dw), head 1 holds -f(dh, dw); the 3 extra rows hold ``extra``.
    """
    h, w = window
    dh = torch.arange(2 * h - 1.0) - (h - 1)
    dw = torch.arange(2 * w - 1.0) - (w - 1)
    grid = f(dh[:, None], dw[None, :]).reshape(-1, 1)  # ((2h-1)*(2w-1), 1)
    tail = torch.tensor(extra)[:, None]
    return torch.cat([torch.cat([grid, -grid], 1), torch.cat([tail, -tail], 1)])


def pair_offsets(window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N) row and column offsets of query i minus key j, patches row-major."""
    rows, cols = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]


def ramp(dh, dw):
    return 0.1 * dh + 0.05 * dw


def lookup(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """timm's lookup: (T, T, heads) biases from the table and gen_relative_position_index."""
    idx = gen_relative_position_index(window)
    return table[idx.view(-1)].view(*idx.shape, -1)


def test_table_layout_matches_timm_index():
    window = (3, 5)  # non-square, so swapped axes would show
    bias = lookup(table_of(ramp, window), window)  # (T, T, 2)
    dh, dw = pair_offsets(window)
    assert torch.allclose(bias[1:, 1:, 0], ramp(dh, dw).float())
    assert torch.allclose(bias[1:, 1:, 1], -ramp(dh, dw).float())
    assert (bias[0, 1:, 0] == 7).all() and (bias[1:, 0, 0] == 8).all() and bias[0, 0, 0] == 9


def test_rel_table_identity_shape_and_validation():
    t = torch.randn(7 * 7 + 3, 4)
    assert resize_rel_pos_bias_table(t, old_window=(4, 4), new_window=(4, 4)) is t
    out = resize_rel_pos_bias_table(t, old_window=(4, 4), new_window=(3, 6))
    assert out.shape == (5 * 11 + 3, 4)
    assert torch.equal(out[-3:], t[-3:])
    with pytest.raises(ValueError, match="rows"):
        resize_rel_pos_bias_table(t, old_window=(4, 5), new_window=(6, 6))
    with pytest.raises(ValueError):
        resize_rel_pos_bias_table(t[:, 0], old_window=(4, 4), new_window=(6, 6))


@pytest.mark.parametrize(("old", "new"), [((4, 4), (6, 6)), ((3, 5), (4, 6)), ((6, 6), (4, 4))])
def test_rel_table_resize_keeps_a_smooth_bias_sensible(old, new):
    """A bias linear in (dh, dw), resized and looked up the timm way at the new window.

    Bicubic resizing of the offset grid *stretches* it: the new offset dh' takes the old table's
    value at dh' * (2h-1)/(2h'-1) (same for dw). So the zero offset stays 0, the order of offsets
    is kept, and the values follow the stretched ramp (measured max error ~0.014, at the border).
    """
    table = resize_rel_pos_bias_table(table_of(ramp, old), old_window=old, new_window=new)
    bias = lookup(table, new)  # (T', T', 2)
    dh, dw = pair_offsets(new)
    sh, sw = (2 * old[0] - 1) / (2 * new[0] - 1), (2 * old[1] - 1) / (2 * new[1] - 1)
    got = bias[1:, 1:, 0]
    assert torch.allclose(got, ramp(dh * sh, dw * sw).float(), atol=0.02)
    assert torch.allclose(bias[1:, 1:, 1], -got)  # heads resized independently
    assert got[(dh == 0) & (dw == 0)].abs().max() < 1e-5  # zero offset stays (exactly) zero
    # order kept: the (2h'-1, 2w'-1) grid increases strictly along both offset axes
    grid = table[:-3, 0].reshape(2 * new[0] - 1, 2 * new[1] - 1)
    assert (grid[1:] - grid[:-1]).min() > 0 and (grid[:, 1:] - grid[:, :-1]).min() > 0
    assert (bias[0, 1:, 0] == 7).all() and (bias[1:, 0, 0] == 8).all() and bias[0, 0, 0] == 9


# ---- whole encoder states ----


@pytest.mark.parametrize("kind", KINDS)
def test_resized_state_loads_strictly_and_runs(kind):
    small = build(kind, 16)
    scramble(small)
    original = small.state_dict()
    state = resize_encoder_state(original, old_grid=(4, 4), new_grid=(6, 6))
    big = build(kind, 24)
    big.load_state_dict(state, strict=True)
    assert big.forward_features(images(2, 24)).shape == (2, 1 + 36, 32)
    resized = [k for k in state if k == "pos_embed" or k.endswith("relative_position_bias_table")]
    assert resized  # every kind has a pos_embed or a relative table
    assert set(state) == set(original)
    for k, v in original.items():
        if k not in resized:
            assert state[k] is v


def test_resize_encoder_state_leaves_input_untouched():
    enc = build("beit_shared")
    state = enc.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    out = resize_encoder_state(state, old_grid=(4, 4), new_grid=(5, 7))
    assert out["rel_pos_bias.relative_position_bias_table"].shape == (9 * 13 + 3, 2)
    assert set(state) == set(before)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_expand_shared_rel_pos_bias_same_features():
    shared = build("beit_shared")
    scramble(shared)
    state = expand_shared_rel_pos_bias(shared.state_dict(), depth=2)
    assert "rel_pos_bias.relative_position_bias_table" not in state
    per_layer = BEiTEncoder(img_size=16, **TINY, shared_rel_pos_bias=False, rel_pos_bias=True)
    per_layer.load_state_dict(state, strict=True)
    t0 = state["blocks.0.attn.relative_position_bias_table"]
    assert t0.data_ptr() != state["blocks.1.attn.relative_position_bias_table"].data_ptr()
    x = images()
    shared.eval(), per_layer.eval()
    with torch.no_grad():
        assert torch.allclose(shared(x), per_layer(x), atol=1e-5)
    # the fine-tuning recipe: expand, then resize to a larger grid
    big = BEiTEncoder(img_size=24, **TINY, shared_rel_pos_bias=False, rel_pos_bias=True)
    big.load_state_dict(resize_encoder_state(state, old_grid=(4, 4), new_grid=(6, 6)))
    with pytest.raises(ValueError, match="shared"):
        expand_shared_rel_pos_bias(state, depth=2)


# ---- attention probabilities ----


def block_input(encoder, x: torch.Tensor, block: int) -> torch.Tensor:
    return encoder.embed(x) if block == 0 else encoder.forward_intermediates(x, [block - 1])[0]


@pytest.mark.parametrize("block", [0, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_attention_reproduces_block_output(kind, block):
    """probs @ v, heads merged, through attn.proj == the real (fused) attention of the block."""
    enc = build(kind)
    scramble(enc)
    enc.eval()
    x = images()
    probs = attention_maps(enc, x, block=block)
    t = 1 + enc.num_patches
    assert probs.shape == (2, 2, t, t)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, t), atol=1e-6)
    assert probs.amax(-1).mean() > 3 / t  # far from uniform, so the check below has teeth
    blk = enc.blocks[block]
    attn = blk.attn
    with torch.no_grad():
        h = blk.norm1(block_input(enc, x, block % enc.depth))  # (B, T, D)
        if kind == "vit":
            qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
            expected = attn(h)
        else:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
            qkv = F.linear(h, attn.qkv.weight, bias)
            shared = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
            expected = attn(h, shared_rel_pos_bias=shared)
        v = qkv.reshape(2, t, 3, 2, -1)[:, :, 2].transpose(1, 2)  # (B, H, T, hd)
        out = attn.proj((probs @ v).transpose(1, 2).reshape(2, t, -1))  # (B, T, D)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_matches_timm_unfused_probabilities(kind):
    """With timm's unfused path, the probabilities it computes inside the real forward pass."""
    enc = build(kind)
    scramble(enc)
    enc.eval()
    seen = []
    for blk in enc.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out))
    x = images()
    with torch.no_grad():
        enc(x)
    for i in range(enc.depth):
        assert torch.allclose(attention_maps(enc, x, block=i), seen[i], atol=1e-6)


def test_attention_eval_semantics_and_train_flag_restored():
    enc = build("beit_per_layer", drop_path=0.5)
    scramble(enc)
    enc.train()
    x = images()
    a, b = attention_maps(enc, x), attention_maps(enc, x)
    assert torch.equal(a, b)  # no drop path
    assert all(m.training for m in enc.modules())
    enc.eval()
    assert torch.equal(attention_maps(enc, x), a)
    with pytest.raises(IndexError):
        attention_maps(enc, x, block=2)


def test_save_attention_figure(tmp_path):
    enc = build("beit_shared")
    scramble(enc)
    x = images(1)
    probs = attention_maps(enc, x)
    path = save_attention_figure(
        probs,
        x,
        tmp_path / "figs" / "attention.png",
        patches=[(0, 0), (2, 3), "cls"],
        grid=enc.grid_size,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        title="attention",
    )
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="outside"):
        save_attention_figure(
            probs[0], x[0], tmp_path / "x.png", patches=[(4, 0)], grid=(4, 4), mean=[0], std=[1]
        )
