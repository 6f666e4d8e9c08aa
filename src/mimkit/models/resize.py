"""Resizing position information of an encoder state dict to a new patch grid (resolution).

Fine-tuning at a higher resolution than pretraining (BEiT, MAE) changes the patch grid, so the
absolute position embeddings and the relative position bias tables no longer fit. Both are
resampled bicubically (``align_corners=False``, no anti-aliasing), as the MAE fine-tuning code
does for ``pos_embed``. (The official BEiT code resamples the relative tables with a scipy
interpolation over geometrically spaced offsets; bicubic over the offset grid is the plain-torch
alternative that timm also offers.)

Shapes: D width, (h, w) the old patch grid or window, (h', w') the new one, H heads,
R = (2h-1)*(2w-1) + 3 rows of a relative position bias table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "expand_shared_rel_pos_bias",
    "resize_abs_pos_embed",
    "resize_encoder_state",
    "resize_rel_pos_bias_table",
]

SHARED_REL_POS_KEY = "rel_pos_bias.relative_position_bias_table"
REL_POS_SUFFIX = "relative_position_bias_table"
NUM_REL_POS_EXTRA = 3  # cls->token, token->cls, cls->cls


def _pair(size: tuple[int, int] | list[int]) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"grid sizes must be positive, got {tuple(size)}")
    return h, w


def _bicubic(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w) -> (1, C, h', w'), bicubic in float32 (or float64), back to the input dtype."""
    work = grid if grid.dtype in (torch.float32, torch.float64) else grid.float()
    out = F.interpolate(work, size=size, mode="bicubic", align_corners=False)
    return out.to(grid.dtype)


def resize_abs_pos_embed(
    pos_embed: torch.Tensor,
    *,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample absolute position embeddings to a new patch grid.

    pos_embed: (1, prefix + h*w, D), patch tokens in row-major grid order (as ``PatchEmbed``
    flattens them). Returns (1, prefix + h'*w', D): the prefix (cls) rows unchanged, the grid part
    reshaped to (1, D, h, w), resized bicubically and flattened back row-major. The same grid
    returns ``pos_embed`` itself (exact identity, no copy).
    """
    h, w = _pair(old_grid)
    nh, nw = _pair(new_grid)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    if tokens != num_prefix_tokens + h * w:
        raise ValueError(
            f"pos_embed has {tokens} tokens, but {num_prefix_tokens} prefix + {h}x{w} grid = "
            f"{num_prefix_tokens + h * w} were expected from old_grid={(h, w)}"
        )
    if (h, w) == (nh, nw):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, h, w, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = _bicubic(grid, (nh, nw))  # (1, D, h', w')
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, dim)  # (1, h'*w', D) row-major
    return torch.cat([prefix, grid], dim=1)  # (1, prefix + h'*w', D)


def resize_rel_pos_bias_table(
    table: torch.Tensor, *, old_window: tuple[int, int], new_window: tuple[int, int]
) -> torch.Tensor:
    """Resample a BEiT / timm relative position bias table to a new window (patch grid).

    table: ((2h-1)*(2w-1) + 3, H). The first (2h-1)*(2w-1) rows are a (2h-1, 2w-1) grid of
    offsets per head, row-major; the last 3 rows are the cls->token, token->cls and cls->cls biases
    and are kept as they are. Returns ((2h'-1)*(2w'-1) + 3, H); the same window returns ``table``
    itself (exact identity).
    """
    h, w = _pair(old_window)
    nh, nw = _pair(new_window)
    if table.ndim != 2:
        raise ValueError(f"the table must be (offsets + 3, heads), got {tuple(table.shape)}")
    rows, heads = table.shape
    gh, gw = 2 * h - 1, 2 * w - 1
    if rows != gh * gw + NUM_REL_POS_EXTRA:
        raise ValueError(
            f"the table has {rows} rows, but old_window={(h, w)} gives "
            f"(2*{h}-1)*(2*{w}-1) + {NUM_REL_POS_EXTRA} = {gh * gw + NUM_REL_POS_EXTRA}"
        )
    if (h, w) == (nh, nw):
        return table
    ngh, ngw = 2 * nh - 1, 2 * nw - 1
    grid, extra = table[: gh * gw], table[gh * gw :]  # (gh*gw, H), (3, H)
    # timm's gen_relative_position_index (the official BEiT code) indexes a pair of patches (query
    # i, key j) by (dh + h - 1) * (2w - 1) + (dw + w - 1), dh = row_i - row_j, dw = col_i - col_j:
    # the row offset is the slow axis (times 2w-1) and the column offset the fast one, so the rows
    # of the table are a row-major (2h-1, 2w-1) grid of (dh, dw), dh = -(h-1) at grid row 0.
    grid = grid.t().reshape(1, heads, gh, gw)  # (1, H, 2h-1, 2w-1)
    grid = _bicubic(grid, (ngh, ngw))  # (1, H, 2h'-1, 2w'-1)
    grid = grid.reshape(heads, ngh * ngw).t()  # ((2h'-1)*(2w'-1), H)
    return torch.cat([grid, extra], dim=0)  # ((2h'-1)*(2w'-1) + 3, H)


def resize_encoder_state(
    state: dict[str, torch.Tensor], *, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """A new state dict with ``pos_embed`` and every relative position bias table resized.

    Covers ``pos_embed`` (one cls token) and every key ending in ``relative_position_bias_table``
    (the shared ``rel_pos_bias.relative_position_bias_table`` and the per-block
    ``blocks.{i}.attn.relative_position_bias_table``). Other entries are the same tensors.
    """
    out = dict(state)
    for key, value in state.items():
        if key == "pos_embed":
            out[key] = resize_abs_pos_embed(value, old_grid=old_grid, new_grid=new_grid)
        elif key.endswith(REL_POS_SUFFIX):
            out[key] = resize_rel_pos_bias_table(value, old_window=old_grid, new_window=new_grid)
    return out


def expand_shared_rel_pos_bias(
    state: dict[str, torch.Tensor], depth: int
) -> dict[str, torch.Tensor]:
    """BEiT fine-tuning: the shared relative position bias table becomes one table per block.

    Removes ``rel_pos_bias.relative_position_bias_table`` and adds a clone of it as
    ``blocks.{i}.attn.relative_position_bias_table`` for i in range(depth), the layout of an
    encoder built with ``shared_rel_pos_bias=False, rel_pos_bias=True``.
    """
    if SHARED_REL_POS_KEY not in state:
        raise ValueError(
            f"the state dict has no shared relative position bias {SHARED_REL_POS_KEY!r}"
        )
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    clash = [k for k in state if k.startswith("blocks.") and k.endswith(REL_POS_SUFFIX)]
    if clash:
        raise ValueError(f"the state dict already has per-block tables: {clash[:3]}")
    out = dict(state)
    shared = out.pop(SHARED_REL_POS_KEY)
    for i in range(depth):
        out[f"blocks.{i}.attn.{REL_POS_SUFFIX}"] = shared.clone()
    return out
