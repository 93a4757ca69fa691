"""The routing rule: every rank busy all through a scan, frames of a position together."""

import numpy as np
import pytest

from fourdstream import route
from fourdstream.detector import ScanGeometry
from fourdstream.send import Router


@pytest.mark.parametrize("width,height", [(13, 8), (257, 256), (65, 3), (1, 40), (1000, 1)])
@pytest.mark.parametrize("n_ranks", range(1, 9))
@pytest.mark.parametrize("chunk", [1, 4, route.DEFAULT_CHUNK])
def test_every_window_of_chunk_times_ranks_positions_reaches_every_rank(width, height, n_ranks,
                                                                        chunk):
    n = width * height
    owners = route.owner(np.arange(n), n_ranks, chunk)
    window = chunk * n_ranks
    if n < window:
        pytest.skip("scan shorter than one window")
    # Sliding windows, in scan order, over the whole scan (cumulative counts per rank).
    hits = np.zeros((n + 1, n_ranks), np.int64)
    hits[1:] = np.cumsum(owners[:, None] == np.arange(n_ranks), axis=0)
    per_window = hits[window:] - hits[:-window]
    assert (per_window > 0).all()
    # ... and every position has one owner among the ranks, whole chunks at a time.
    assert owners.min() >= 0 and owners.max() < n_ranks
    assert (owners == owners[np.arange(n) // chunk * chunk]).all()


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4, 8])
def test_frames_of_one_position_and_sectors_of_one_frame_go_to_one_rank(n_ranks):
    """Router.rank_of, used by senders and the gateway, for a scan with 3 frames per position."""
    g = ScanGeometry(9, 7, frames_per_position=3)
    router = Router([None] * n_ranks, sender="test", chunk=2)
    router._width[1] = (g.width, g.n_positions)   # what begin() records, without sockets
    for position in range(g.n_positions):
        x, y = position % g.width, position // g.width
        ranks = {router.rank_of(1, x, y, frame) for frame in range(3 * position, 3 * position + 3)}
        assert ranks == {route.owner(position, n_ranks, 2)}


def test_slabs_cover_the_scan_in_order():
    for n, ranks in [(10, 3), (262656, 4), (3, 5)]:
        bounds = route.slab_bounds(n, ranks)
        assert bounds[0] == 0 and bounds[-1] == n and (np.diff(bounds) >= 0).all()
        assert np.diff(bounds).max() - np.diff(bounds).min() <= 1
        p = np.arange(n)
        owner = route.slab_owner(p, n, ranks)
        assert ((bounds[owner] <= p) & (p < bounds[owner + 1])).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_a_bad_chunk_is_refused(bad):
    with pytest.raises(ValueError, match="routing chunk"):
        route.check_chunk(bad)
