"""Packing examples into rows: best-fit decreasing, with per-example position ids.

Each row lists the lengths of its examples. Position ids restart at 0 for every example, which is
what makes transformers isolate them: with no attention mask and no KV cache, the attention of a
packed row is block-diagonal (causal within each example, nothing across examples).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity.

    Longest first, each into the fullest bin it still fits (fewest bins in practice, ~within 11/9
    of optimal). Deterministic: ties go to the lower index.

    Returns:
        Bins of example indices; each bin becomes one row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the row capacity {capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            remaining, b = free.pop(slot)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, b))
    return bins


def pack_within_levels(
    lengths: Sequence[int], levels: Sequence[int], capacity: int, rank: Sequence[int] | None = None
) -> list[list[int]]:
    """best_fit_decreasing within each difficulty level (data.curriculum): no bin holds examples of
    two levels. Bins come level by level, easiest first; within a level, ordered by the highest
    `rank` (difficulty rank) of their examples when given, so that the bins are in difficulty order.

    Returns:
        Bins of example indices; each bin becomes one row.
    """
    by_level: dict[int, list[int]] = {}
    for i, level in enumerate(levels):
        by_level.setdefault(int(level), []).append(i)
    bins: list[list[int]] = []
    for level in sorted(by_level):
        members = by_level[level]
        packed = [[members[j] for j in group] for group in best_fit_decreasing([lengths[i] for i in members], capacity)]
        if rank is not None:
            packed.sort(key=lambda group: max(rank[i] for i in group))
        bins += packed
    return bins


def position_ids(lengths: Sequence[int]) -> list[int]:
    """0..n-1 for each example of a row, concatenated."""
    return [p for n in lengths for p in range(n)]
