"""A hand-built counted scan with known content (no MPI import: usable anywhere)."""

import numpy as np

from fourdstream.detector import ScanGeometry
from fourdstream.sparse import CountedFrames

GEOMETRY = ScanGeometry(7, 5, frames_per_position=2, flyback=True)
DROPPED = 17          # this frame is never delivered: its slot stays empty
NO_EVENTS = 3         # this frame arrives with no events
PARTIAL = 5           # this frame lacks sector 3


def expected_frames() -> CountedFrames:
    """Frames ``k`` at position ``k // 2`` (frame numbers ``100 + k``), one dropped."""
    rng = np.random.default_rng(5)
    n = GEOMETRY.n_frames
    counts = rng.poisson(30, n)
    counts[NO_EVENTS] = 0
    events = np.concatenate([np.sort(rng.choice(331776, c, replace=False)) for c in counts])
    mask = np.full(n, 0b1111, np.uint8)
    mask[PARTIAL] = 0b0111
    frames = CountedFrames(events.astype(np.uint32), np.concatenate([[0], np.cumsum(counts)]),
                           np.arange(n, dtype=np.uint32) + 100, np.arange(n) // 2, mask)
    return frames.take(np.flatnonzero(np.arange(n) != DROPPED))
