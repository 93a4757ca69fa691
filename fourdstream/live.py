"""The live view of a session: what the microscope user sees while a scan arrives.

* :class:`LiveImages` (every rank, one per scan): the scan's images accumulated from
  each counted batch as it comes back from a counting thread (the compiled one-pass
  sums of :mod:`fourdstream.images`, a few per cent of counting time), over the whole
  scan's positions.
* :func:`reduce_live` (the coordinator, about once a second): the ranks' accumulators
  of the scan arriving now are summed on rank 0; the virtual detectors are the
  previous scan's, or, for the first scan, found from its first reduced pattern, and
  are kept for the rest of the scan's live view (batches counted before a scan has
  detectors are missing from its live BF and ADF; the file's images, computed once at
  the end from all events, use the whole scan's pattern).
* :class:`LiveState` (rank 0): the latest images and the session's figures, which
  the page (:mod:`fourdstream.liveserver`) serves.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .detector import FRAME_PIXELS, FRAME_SHAPE
from .images import Detectors, from_sums

class LiveImages:
    """One rank's live sums of one scan (thread-safe: counting threads add, the
    coordinator takes snapshots)."""

    def __init__(self, n_positions: int):
        self.n_positions = n_positions
        self.sums = np.zeros((5, n_positions), np.int64)   # events, sum x, sum y, in BF, in ADF
        self.masks = np.full(n_positions, 0xFF, np.uint8)
        self.seen = np.zeros(n_positions, bool)
        self.pattern = np.zeros(FRAME_PIXELS, np.int64)
        self.frames = 0
        self.detectors: Detectors | None = None
        self._lock = threading.Lock()

    def add(self, counted) -> None:
        """Add one counted batch (:class:`~fourdstream.sparse.CountedFrames`): compiled passes
        over its events into the scan's arrays, in place."""
        from .compiled import add_pattern, add_position_sums

        if not len(counted):
            return
        d = self.detectors
        radii, centre = (d.radii, (d.centre_x, d.centre_y)) if d else ((0, 0, 0, 0), (0, 0))
        with self._lock:
            add_position_sums(self.sums, self.masks, counted.events, counted.offsets,
                              counted.position, centre, radii, counted.mask)
            add_pattern(counted.events, self.pattern)
            self.seen[counted.position] = True
            self.frames += len(counted)

    def snapshot(self) -> np.ndarray:
        """Everything as one int64 vector, for one summing reduction: sums, the mask of the
        positions seen (0 elsewhere: a position's frames all go to one rank, so the sum over
        ranks is that rank's mask), seen, pattern, frames."""
        with self._lock:
            return np.concatenate([self.sums.ravel(), np.where(self.seen, self.masks, 0),
                                   self.seen, self.pattern, [self.frames]]).astype(np.int64)


def unpack(total: np.ndarray, n_positions: int, detectors: Detectors, shape) -> dict:
    """The images of a reduced :meth:`LiveImages.snapshot`."""
    n = n_positions
    flat = from_sums(total[:5 * n].reshape(5, n), total[5 * n:6 * n] & 0x0F, total[6 * n:7 * n] > 0,
                     detectors)
    return dict({k: v.reshape(shape) for k, v in flat.items()},
                pattern=total[7 * n:7 * n + FRAME_PIXELS].reshape(FRAME_SHAPE), frames=int(total[-1]))


def reduce_live(comm, share, geometry, detectors: Detectors | None):
    """Sum the ranks' live sums of one scan on rank 0 (collective over ``comm``; a rank
    without the scan contributes nothing). Returns ``(images, detectors)`` on rank 0,
    ``(None, detectors)`` elsewhere; the detectors, found from the first reduced
    pattern when not given, are set on every rank's accumulator."""
    from mpi4py import MPI

    n = geometry.n_positions
    mine = share.live.snapshot() if share is not None and share.live is not None else \
        _empty_snapshot(n)
    total = np.empty_like(mine) if comm.rank == 0 else None
    comm.Reduce(mine, total, op=MPI.SUM, root=0)
    if detectors is None:
        found = Detectors.find(total[7 * n:7 * n + FRAME_PIXELS]) if comm.rank == 0 and \
            total[7 * n:7 * n + FRAME_PIXELS].any() else None
        detectors = comm.bcast(found, root=0)
    if detectors is not None and share is not None and share.live is not None \
            and share.live.detectors is None:
        share.live.detectors = detectors
    if comm.rank != 0:
        return None, detectors
    return unpack(total, n, detectors or Detectors(), (geometry.height, geometry.width)), detectors


def _empty_snapshot(n: int) -> np.ndarray:
    return np.zeros(7 * n + FRAME_PIXELS + 1, np.int64)


class LiveState:
    """Rank 0's latest view of the session, read by the page and the PUB stream.

    ``on_update`` (optional) is called with ``(state dict, images)`` after each update of
    the scan's images (the :class:`Publisher`)."""

    def __init__(self, on_update=None):
        self._lock = threading.Lock()
        self.version = 0
        self.scan: dict = {}
        self.images: dict = {}
        self.session: dict = {"scans_written": [], "started": time.time()}
        self.on_update = on_update

    def update_scan(self, scan: int, geometry, images: dict, detectors: Detectors, extra: dict) -> None:
        with self._lock:
            self.version += 1
            self.images = images
            self.scan = dict(scan=scan, width=geometry.width, height=geometry.height,
                             expected=geometry.n_frames, frames=images["frames"],
                             detectors=detectors.__dict__, time=time.time(), **extra)
            scan_state = dict(self.scan, version=self.version)
        if self.on_update:
            self.on_update(scan_state, images)

    def scan_written(self, summary: dict) -> None:
        from .assembly import Ledger   # (assembly imports this module)

        with self._lock:
            self.version += 1
            keep = ("scan", "frames", "expected", "complete", "incomplete", "missing", "latency",
                    "latency_received", "thresholds", "path", "failed")
            entry = {k: summary[k] for k in keep if k in summary}
            entry["losses"] = {k: v for k, v in summary.get("ledger", {}).items() if k in Ledger.LOSSES and v}
            self.session["scans_written"].append(entry)

    def view(self) -> tuple[int, dict, dict]:
        """``(version, state, images)``: a consistent copy."""
        with self._lock:
            return self.version, {"scan": dict(self.scan), "session": {
                "scans_written": list(self.session["scans_written"]),
                "uptime": time.time() - self.session["started"]}}, dict(self.images)


#: The arrays of a live update, in message order (after the header).
STREAM_ARRAYS = ("counts", "bf", "adf", "com_x", "com_y", "sector_mask", "pattern")


class Publisher:
    """The live stream for other programs: a ZeroMQ PUB socket on rank 0.

    Each update is one multipart message: a msgpack map (the scan's state: ``scan``,
    ``frames``, ``expected``, ``width``, ``height``, ``detectors``, ``closed``,
    ``version``, and ``arrays``: name, dtype and shape of each array part) followed by
    the raw arrays of :data:`STREAM_ARRAYS` (C order). ``fourdstream watch`` reads it.
    """

    def __init__(self, ctx, endpoint: str):
        import zmq

        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 4)      # a slow subscriber misses updates, never us
        self.socket.setsockopt(zmq.LINGER, 2000)    # the last update (a scan written) still leaves
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._lock = threading.Lock()               # updates come from two threads

    def __call__(self, state: dict, images: dict) -> None:
        import msgpack
        import zmq

        arrays = [np.ascontiguousarray(images[name]) for name in STREAM_ARRAYS]
        header = dict(state, arrays=[[n, a.dtype.str, list(a.shape)] for n, a in zip(STREAM_ARRAYS, arrays)])
        with self._lock:
            try:
                self.socket.send_multipart([msgpack.packb(header, default=float), *arrays],
                                           flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass

    def close(self) -> None:
        self.socket.close()


def decode_update(parts) -> tuple[dict, dict]:
    """``(state, arrays)`` of one message of the live stream."""
    import msgpack

    header = msgpack.unpackb(parts[0])
    arrays = {name: np.frombuffer(part, dtype=np.dtype(dtype)).reshape(shape)
              for (name, dtype, shape), part in zip(header.pop("arrays"), parts[1:])}
    return header, arrays
