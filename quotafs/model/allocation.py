"""Which blocks a request would newly allocate — block arithmetic, pure.

The FUSE layer asks the backing file where its data lies (SEEK_DATA/SEEK_HOLE) and hands
the extents here; everything below is arithmetic on those extents, so it is unit-tested
without a filesystem.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Extent = tuple[int, int]  # [start, end) in bytes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, block: int) -> int:
    return ceil_div(n, block) * block


def count_blocks(extents: Iterable[Extent], block: int) -> int:
    """Blocks covered by sorted, disjoint `extents`; a partly covered block counts whole."""
    total = 0
    last_block_end = 0  # first block index not yet counted
    for start, end in extents:
        if end <= start:
            continue
        first = max(start // block, last_block_end)
        stop = ceil_div(end, block)
        if stop > first:
            total += stop - first
            last_block_end = stop
    return total


def hole_blocks(start: int, end: int, extents: Sequence[Extent], block: int) -> list[int]:
    """Indices of the blocks touched by [start, end) that no data extent covers, in order."""
    if end <= start:
        return []
    first, stop = start // block, ceil_div(end, block)
    holes: list[int] = []
    cursor = first
    for ext_start, ext_end in extents:
        ext_first, ext_stop = ext_start // block, ceil_div(ext_end, block)
        if ext_stop <= cursor:
            continue
        if ext_first >= stop:
            break
        holes.extend(range(cursor, min(ext_first, stop)))
        cursor = max(cursor, ext_stop)
        if cursor >= stop:
            break
    holes.extend(range(cursor, stop))
    return holes

