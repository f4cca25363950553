"""Fusion at load: weights that multiply the same input, row-concatenated into one buffer.

[q; k; v] and [gate; up] read into one contiguous buffer let a decode step run one larger GEMV
instead of two or three (fewer calls, one pass over the activations). Each part stays a view of
the buffer, so code that wants the parts still has them. Row concatenation is the whole step:
a packed quantized weight (rows plus per-row scales) fuses the same way, buffer by buffer.
Each output of a projection over the fused rows is the dot product of one row, the same rows
as unfused: results are the unfused ones.
"""

from __future__ import annotations

import torch


def fused_rows(shapes, dtype: torch.dtype, alloc, read) -> tuple:
    """(buffer [sum of rows, cols], views): `read(i, view_i)` fills part i in place.
    `shapes` are 2-D with one column count; `alloc(shape, dtype)` makes the buffer."""
    cols = {s[1] for s in shapes}
    if len(cols) != 1 or any(len(s) != 2 for s in shapes):
        raise ValueError(f"fused_rows needs 2-D parts with one column count, got {list(shapes)}")
    buf = alloc((sum(s[0] for s in shapes), cols.pop()), dtype)
    views = tuple(buf.split([s[0] for s in shapes], dim=0))
    for i, view in enumerate(views):
        read(i, view)
    return buf, views


def fused_stack(n: int, shapes, dtype: torch.dtype, alloc, read) -> tuple:
    """(buffer [n, sum of rows, cols], views [n, rows_j, cols] per part j): `read(e, j, view)`
    fills part j of stack entry e. Entry e's parts are adjacent rows (one fused projection per
    entry, e.g. a routed expert's [gate; up])."""
    cols = {s[1] for s in shapes}
    if len(cols) != 1 or any(len(s) != 2 for s in shapes):
        raise ValueError(f"fused_stack needs 2-D parts with one column count, got {list(shapes)}")
    rows = [s[0] for s in shapes]
    buf = alloc((n, sum(rows), cols.pop()), dtype)
    views = tuple(buf.split(rows, dim=1))
    for e in range(n):
        for j, view in enumerate(views):
            read(e, j, view[e])
    return buf, views
