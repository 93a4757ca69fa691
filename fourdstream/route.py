"""Which rank handles which scan position: one rule for every stage.

**Streaming and counting** (:func:`owner`): positions are dealt to ranks
round-robin in chunks of ``chunk`` consecutive positions (scan order), so rank
``r`` owns positions ``p`` with ``(p // chunk) % n_ranks == r``. The detector
scans positions in order, so within any ``chunk * n_ranks`` consecutive positions
every rank receives frames: all ranks receive and count at once, all through a
scan. Every frame at one position goes to the same rank (the sectors of a frame,
and the several frames of a position, meet there). Senders, the gateway, the
receiver and the offline count all use this function.

**The file** (:func:`slab_bounds`): for the collective write, rank ``r`` owns one
contiguous slab of positions, so that each rank writes one hyperslab. The
writer moves the counted events (about 80x smaller than the raw frames) from
their counting rank to their slab owner with one ``Alltoallv``.

The default chunk, :data:`DEFAULT_CHUNK` positions, hands every rank frames
within a fraction of a millisecond of detector time (16 frames at 87,000
frames/s is 0.18 ms), so ranks stay busy even where sender queues are shallow.
Measured on a 2-core machine (128x128 scan, 4 ranks, senders' default queues),
chunks of 1, 4, 16, 64 and 256 positions all gave 1,690-1,850 frames/s with every
rank busy 90-97 % of the scan; the harness's scaling stage measures rank
concurrency with the default (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import numpy as np

#: Positions per routing chunk (see the module docstring).
DEFAULT_CHUNK = 16


def check_chunk(chunk: int) -> int:
    """``chunk`` as an int, or a ValueError saying what is wrong with it."""
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"the routing chunk must be a whole number of positions >= 1, got {chunk}")
    return int(chunk)


def owner(position, n_ranks: int, chunk: int = DEFAULT_CHUNK):
    """Rank that receives and counts the frames of ``position`` (an int, as senders route each
    message without numpy's per-call cost, or an integer array)."""
    return (position // chunk) % n_ranks


def slab_bounds(n_positions: int, n_ranks: int) -> np.ndarray:
    """Bounds (n_ranks + 1,) of the contiguous position slabs the ranks write.

    Rank ``r`` writes positions ``bounds[r] <= p < bounds[r + 1]``; slabs differ in
    size by at most one position.
    """
    return (np.arange(n_ranks + 1, dtype=np.int64) * n_positions) // n_ranks


def slab_owner(position, n_positions: int, n_ranks: int):
    """Rank writing ``position`` (scalar or array) under :func:`slab_bounds`."""
    bounds = slab_bounds(n_positions, n_ranks)
    return np.searchsorted(bounds, position, side="right") - 1
