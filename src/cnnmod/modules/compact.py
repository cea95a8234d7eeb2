"""Exact compact forms of a module's constant maps (added constants and fills), for its file.

A constant map (C, H, W) often repeats itself: a per-channel constant is the same in every row
and column, and what a 3x3 convolution with padding adds for a per-channel constant input
differs only on the borders (3 distinct rows, 3 distinct columns). Such a map is stored as its
distinct rows and columns, ``values`` (C, R, K), and an index per row (H,) and per column (W,):

    full = values[:, rows][:, :, cols]  # bit for bit the original (-0.0 stays -0.0)

Rows and columns are compared as bits, not as floats, so the form is exact by construction;
a map with no repetition (every row or column distinct) stays whole.
"""

from __future__ import annotations

import torch

INDEX_DTYPE = torch.int32


@torch.no_grad()
def compact_map(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Return (values (C, R, K), rows (H,), cols (W,)) of a float32 map (C, H, W), or None when
    the compact form would not be smaller."""
    if full.dtype != torch.float32 or full.dim() != 3 or full.numel() == 0:
        return None
    bits = full.detach().cpu().contiguous().view(torch.int32)  # compare bits: 0.0 and -0.0 differ
    c, h, w = bits.shape
    by_row, rows = torch.unique(bits.permute(1, 0, 2).reshape(h, c * w), dim=0, return_inverse=True)
    kept = by_row.reshape(-1, c, w).permute(1, 0, 2)  # (C, R, W)
    r = kept.shape[1]
    by_col, cols = torch.unique(kept.permute(2, 0, 1).reshape(w, c * r), dim=0, return_inverse=True)
    values = by_col.reshape(-1, c, r).permute(1, 2, 0).contiguous()  # (C, R, K)
    index_bytes = (h + w) * INDEX_DTYPE.itemsize
    if values.numel() * 4 + index_bytes >= full.numel() * 4:
        return None
    rows, cols = rows.to(INDEX_DTYPE), cols.to(INDEX_DTYPE)
    if not torch.equal(values[:, rows.long()][:, :, cols.long()], bits):  # cannot happen; never store a guess
        return None
    return values.view(torch.float32), rows, cols


def expand_map(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Return the full map (C, H, W) of a compact form; ValueError says what is wrong with one."""
    if values.dim() != 3 or values.dtype != torch.float32:
        raise ValueError(f"expected float32 values (C, R, K), found {values.dtype} of shape {tuple(values.shape)}")
    for name, index, bound in (("row", rows, values.shape[1]), ("column", cols, values.shape[2])):
        if index.dim() != 1 or index.dtype != INDEX_DTYPE:
            raise ValueError(f"expected a {INDEX_DTYPE} {name} index (1-D), found {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < bound):
            raise ValueError(f"expected {name} indices in [0, {bound}), found {int(index.min())}..{int(index.max())}")
    return values[:, rows.long()][:, :, cols.long()].contiguous()
