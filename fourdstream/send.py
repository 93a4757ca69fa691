"""Senders: stream sector messages to the receiver ranks, as the DAQ servers do.

A sender handles one detector module (sector). It routes every sector message
itself to the rank that owns the frame's scan position
(:func:`fourdstream.route.owner`: chunks of positions dealt round-robin, so all
ranks receive all through a scan), announces each scan to every rank
(``begin``), and closes it with the number of messages it sent to that rank
(``end``), so a receiver can tell exactly what was lost.

**Never hangs.** A message a rank does not take is waited for, but a sender
never waits more than ``send_timeout`` seconds in a row without any rank taking
a message from it. Past that, the ranks it was waiting on are *given up*: their
messages are offered without waiting and dropped (counted) while they take
none, and sent again as soon as they take one. When every rank is given up (the
receiver job is gone, or took nothing for ``send_timeout``), the sender offers
the rest of the scan without waiting or pacing (what is not taken is counted as
dropped), stops after that scan, reports what it sent and dropped, and the
command exits non-zero. ``begin``/``end`` messages get ``max(send_timeout,
END_GRACE)`` seconds to leave, or ``GONE_GRACE`` seconds once every rank is
given up; the sockets close when that time, counted from the last ``end``, is
over (or everything has left), so a sender whose ranks are gone exits about
``send_timeout + GONE_GRACE`` seconds after they stopped taking messages.

Sources: the simulator (frames from a pre-generated in-memory pool, so that
generation is not the bottleneck), or replay of raw sector files.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import numpy as np
import zmq

from . import wire
from .detector import ScanGeometry, record_dtype, sector_shape, sector_slice
from .rawfile import expand_paths, module_from_filename
from .route import DEFAULT_CHUNK, check_chunk, owner
from .transport import DEFAULT_SEND_TIMEOUT


#: Seconds (at least) that control messages and queued messages get to leave (see module docstring).
END_GRACE = 30.0
#: Seconds they get once every rank is given up (longer than a receiver's stall relief, 2 s).
GONE_GRACE = 3.0


class ReceiversGone(RuntimeError):
    """No rank took a message for ``send_timeout`` seconds: the scan was given up."""


@dataclasses.dataclass
class ScanCounts:
    """Per-rank message counts of one scan at one sender."""

    sent: np.ndarray
    dropped: np.ndarray
    first_send: float = 0.0
    last_send: float = 0.0
    unannounced: tuple = ()     #: ranks whose ``end`` message could not be delivered


class Router:
    """Sends one sender's messages to the ranks (see module docstring).

    Parameters
    ----------
    sockets : one PUSH socket per rank (see :func:`fourdstream.transport.push_sockets`)
    sender : this sender's identity, unique among the senders of a session
    chunk : positions per routing chunk (:func:`fourdstream.route.owner`); every
        sender of a session must use the same
    send_timeout : seconds the sender may wait in a row without any rank taking a message
    """

    def __init__(self, sockets: list[zmq.Socket], sender: str, *, chunk: int = DEFAULT_CHUNK,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT):
        self.sockets, self.sender = sockets, sender
        self.chunk, self.send_timeout = check_chunk(chunk), float(send_timeout)
        self.n_ranks = len(sockets)
        self.scans: dict[int, ScanCounts] = {}
        self._width: dict[int, tuple] = {}
        self._waiting_since: float | None = None   # first refusal since a rank last took one
        self.given_up: set[int] = set()             # ranks offered messages without waiting
        self._close_by: float | None = None         # time.monotonic() the last end's grace runs out

    @property
    def receivers_gone(self) -> bool:
        """Every rank is given up: none took a message for ``send_timeout`` s."""
        return len(self.given_up) == self.n_ranks

    def begin(self, scan: int, geometry: ScanGeometry) -> None:
        """Announce ``scan`` to every rank."""
        self.scans[scan] = ScanCounts(np.zeros(self.n_ranks, np.int64), np.zeros(self.n_ranks, np.int64))
        self._width[scan] = (geometry.width, geometry.n_positions)
        message = wire.encode_control("begin", scan=scan, sender=self.sender, width=geometry.width,
                                      height=geometry.height,
                                      frames_per_position=geometry.frames_per_position,
                                      flyback=geometry.flyback, frames=geometry.n_frames)
        deadline = self._control_deadline()
        for rank in range(self.n_ranks):
            self._deliver(rank, [message], deadline)

    def rank_of(self, scan: int, x: int, y: int, frame: int) -> int:
        """Owner rank of a sector; positions outside the scan go by frame number."""
        width, n_positions = self._width[scan]
        position = y * width + x
        if x >= width or position >= n_positions:
            return frame % self.n_ranks
        return owner(position, self.n_ranks, self.chunk)

    def send(self, scan: int, rank: int, header: bytes, payload) -> bool:
        """Send one sector message (payload zero-copy); False if it was dropped."""
        counts = self.scans[scan]
        if not self._deliver(rank, [header, payload]):
            counts.dropped[rank] += 1
            return False
        counts.sent[rank] += 1
        counts.last_send = time.time()
        counts.first_send = counts.first_send or counts.last_send
        return True

    def end(self, scan: int, **extra) -> ScanCounts:
        """Tell every rank how many messages of ``scan`` it was sent.

        Every rank is first offered its message without waiting; a rank that takes
        one shows the receivers are alive, so the others then get the full grace.
        """
        counts = self.scans.pop(scan)
        self._width.pop(scan)
        now = time.time()
        messages = [[wire.encode_control(
            "end", scan=scan, sender=self.sender, sent=int(counts.sent[r]),
            dropped=int(counts.dropped[r]), first_send=counts.first_send or now,
            last_send=counts.last_send or now, **extra)] for r in range(self.n_ranks)]
        waiting = [r for r in range(self.n_ranks) if not self._try(r, messages[r])]
        self._close_by = self._control_deadline()
        counts.unannounced = tuple(r for r in waiting
                                   if not self._deliver(r, messages[r], self._close_by))
        return counts

    def close(self) -> None:
        """Close the sockets; what is queued gets what is left of the last end's grace."""
        left = self._grace() if self._close_by is None else self._close_by - time.monotonic()
        for s in self.sockets:
            s.close(linger=max(int(left * 1000), 0))

    def _grace(self) -> float:
        return GONE_GRACE if self.receivers_gone else max(self.send_timeout, END_GRACE)

    def _control_deadline(self) -> float:
        """Deadline (time.monotonic()) for the control messages sent now."""
        return time.monotonic() + self._grace()

    def _deliver(self, rank: int, parts, deadline: float | None = None) -> bool:
        """Queue ``parts`` for ``rank``, waiting only as the policy above allows
        (control messages: until ``deadline``, a time.monotonic() value)."""
        s = self.sockets[rank]
        while not self._try(rank, parts):
            now = time.monotonic()
            if deadline is None:   # sector data
                if rank in self.given_up:
                    return False
                if self._waiting_since is None:
                    self._waiting_since = now
                left = self._waiting_since + self.send_timeout - now
                if left <= 0:
                    self.given_up.add(rank)
                    return False
            else:
                left = deadline - now
                if left <= 0:
                    return False
            s.poll(max(int(left * 1000), 1), zmq.POLLOUT)
        return True

    def _try(self, rank: int, parts) -> bool:
        """Queue ``parts`` for ``rank`` if it has room now."""
        try:
            self.sockets[rank].send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._waiting_since = None
        self.given_up.discard(rank)
        return True


@dataclasses.dataclass
class Sector:
    """One sector message's content."""

    scan: int
    frame: int          # detector frame number
    x: int
    y: int
    payload: object     # buffer of 165,888 bytes


class SimulatedSource:
    """Sectors of module ``module`` of simulated scans, from a pre-generated pool.

    Frame ``k`` of a scan (at position ``k // frames_per_position``, frame number
    ``k + 1``) has the content of simulator frame ``k % pool_frames``; with
    ``pool_frames >= n_frames`` every frame is the simulator's own.
    """

    def __init__(self, sim, module: int, *, pool_frames: int = 512, scans: int = 1,
                 first_scan: int = 1, threads: int = 1, thread: int = 0):
        self.sim, self.module, self.geometry = sim, module, sim.geometry
        self.scans, self.first_scan, self.threads, self.thread = scans, first_scan, threads, thread
        n = min(pool_frames or sim.n_frames, sim.n_frames)
        rows = sector_slice(module)
        self.pool = np.empty((n,) + sector_shape(5), np.uint16)   # only this module's rows
        for start in range(0, n, 64):
            stop = min(start + 64, n)
            self.pool[start:stop] = sim.frames(start, stop)[0][(slice(None),) + rows]

    def scan_numbers(self) -> list[int]:
        return list(range(self.first_scan, self.first_scan + self.scans))

    def sectors(self, scan: int) -> Iterator[Sector]:
        g, fpp, n = self.geometry, self.geometry.frames_per_position, len(self.pool)
        for k in range(self.thread, g.n_frames, self.threads):
            y, x = divmod(k // fpp, g.width)
            yield Sector(scan, k + 1, x, y, self.pool[k % n])


class ReplaySource:
    """Sectors of one module replayed from raw files, in file order.

    The scan geometry and numbers come from the record headers (not validated
    here: the receivers validate and count bad records).
    """

    def __init__(self, paths, module: int, *, version: int = 5, threads: int = 1, thread: int = 0):
        self.module, self.threads, self.thread = module, threads, thread
        self.files = [p for p in expand_paths(paths) if module_from_filename(p) == module]
        if not self.files:
            raise ValueError(f"no raw files of module {module} among the given paths")
        dtype = record_dtype(version)
        self._maps = [np.memmap(p, dtype=dtype, mode="r", shape=(p.stat().st_size // dtype.itemsize,))
                      for p in self.files if p.stat().st_size >= dtype.itemsize]
        self._headers = [np.asarray(m["header"]) for m in self._maps]
        headers = np.concatenate(self._headers)
        self._scans = [int(s) for s in np.unique(headers["scan_number"])]
        w = int(np.bincount(headers["scan_width"]).argmax())
        h = int(np.bincount(headers["scan_height"]).argmax())
        per_position = np.bincount(headers["y"].astype(np.int64) * w + headers["x"]).max()
        self.geometry = ScanGeometry(max(w, 1), max(h, 1), int(per_position))

    def scan_numbers(self) -> list[int]:
        return self._scans

    def sectors(self, scan: int) -> Iterator[Sector]:
        i = 0
        for mm, hdr in zip(self._maps, self._headers):
            data = mm["data"]
            for j in np.flatnonzero(hdr["scan_number"] == scan).tolist():
                if i % self.threads == self.thread:
                    h = hdr[j]
                    yield Sector(scan, int(h["frame_number"]), int(h["x"]), int(h["y"]),
                                 memoryview(data[j]))
                i += 1


def stream(source, router: Router, module: int, *, rate: float = 0.0, thread: int = 0,
           start_at: float | None = None, progress=None) -> dict:
    """Send every scan of ``source`` through ``router``; returns totals.

    ``rate``: frames/s for this sender (0: as fast as possible). ``start_at``: Unix
    time at which the first scan's sectors start (after its ``begin``), so that
    the senders of all modules start together, as on a detector trigger. Raises
    :class:`ReceiversGone` (with the totals so far in its ``totals``) when no rank
    takes a message for the router's ``send_timeout``.
    """
    g = source.geometry
    totals = {"sent": 0, "dropped": 0, "scans": 0, "seconds": 0.0, "unannounced": 0}
    t0 = time.perf_counter()
    for scan in source.scan_numbers():
        router.begin(scan, g)
        if start_at is not None:
            time.sleep(max(start_at - time.time(), 0.0))
            start_at = None
        start = time.perf_counter()
        for i, s in enumerate(source.sectors(scan)):
            if rate and not router.receivers_gone:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            header = wire.encode_header(scan, s.frame, g.width, g.height, s.x, s.y, module,
                                        thread=thread)
            router.send(scan, router.rank_of(scan, s.x, s.y, s.frame), header, s.payload)
            if progress is not None:
                progress(1)
        counts = router.end(scan)
        totals["sent"] += int(counts.sent.sum())
        totals["dropped"] += int(counts.dropped.sum())
        totals["unannounced"] += len(counts.unannounced)
        totals["scans"] += 1
        totals["seconds"] = time.perf_counter() - t0
        if router.receivers_gone:
            gone = ReceiversGone(f"no receiver rank took a message for {router.send_timeout:g} s "
                                 f"(--send-timeout); scan {scan} given up")
            gone.totals = totals
            raise gone
    return totals
