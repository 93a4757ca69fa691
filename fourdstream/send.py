"""Senders: stream sector messages to the receiver ranks, as the DAQ servers do.

A sender handles one detector module (sector). It routes every sector message
itself to the rank that owns the frame's scan position (the block rule of
:meth:`ScanGeometry.position_blocks`, which makes each rank's part of the output
file contiguous), announces each scan to every rank (``begin``), and closes it
with the number of messages it sent to that rank (``end``), so a receiver can
tell exactly what was lost.

Sources: the simulator (frames from a pre-generated in-memory pool, so that
generation is not the bottleneck), or replay of raw sector files.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from typing import Iterator

import numpy as np
import zmq

from . import wire
from .transport import CONTROL_TIMEOUT
from .detector import ScanGeometry, record_dtype, sector_shape, sector_slice
from .rawfile import expand_paths, module_from_filename


@dataclasses.dataclass
class ScanCounts:
    """Per-rank message counts of one scan at one sender."""

    sent: np.ndarray
    dropped: np.ndarray
    first_send: float = 0.0
    last_send: float = 0.0


class Router:
    """Sends one sender's messages to the ranks (see module docstring).

    Parameters
    ----------
    sockets : one PUSH socket per rank (see :func:`fourdstream.transport.push_sockets`)
    sender : this sender's identity, unique among the senders of a session
    """

    def __init__(self, sockets: list[zmq.Socket], sender: str):
        self.sockets, self.sender = sockets, sender
        self.n_ranks = len(sockets)
        self.scans: dict[int, ScanCounts] = {}
        self._bounds: dict[int, tuple] = {}

    def begin(self, scan: int, geometry: ScanGeometry) -> None:
        """Announce ``scan`` to every rank."""
        self.scans[scan] = ScanCounts(np.zeros(self.n_ranks, np.int64), np.zeros(self.n_ranks, np.int64))
        self._bounds[scan] = (geometry.width, geometry.n_positions,
                              geometry.position_blocks(self.n_ranks)[1:-1].tolist())
        message = wire.encode_control("begin", scan=scan, sender=self.sender, width=geometry.width,
                                      height=geometry.height,
                                      frames_per_position=geometry.frames_per_position,
                                      flyback=geometry.flyback, frames=geometry.n_frames)
        for s in self.sockets:
            self._send_control(s, message)

    def rank_of(self, scan: int, x: int, y: int, frame: int) -> int:
        """Owner rank of a sector; positions outside the scan go by frame number."""
        width, n_positions, inner = self._bounds[scan]
        position = y * width + x
        if x >= width or position >= n_positions:
            return frame % self.n_ranks
        return bisect.bisect_right(inner, position)

    def send(self, scan: int, rank: int, header: bytes, payload) -> bool:
        """Send one sector message (payload zero-copy); False if it timed out."""
        counts = self.scans[scan]
        s = self.sockets[rank]
        try:
            s.send(header, zmq.SNDMORE)
            s.send(payload, copy=False)
        except zmq.Again:
            counts.dropped[rank] += 1
            return False
        counts.sent[rank] += 1
        counts.last_send = time.time()
        counts.first_send = counts.first_send or counts.last_send
        return True

    def end(self, scan: int, **extra) -> ScanCounts:
        """Tell every rank how many messages of ``scan`` it was sent."""
        counts = self.scans.pop(scan)
        self._bounds.pop(scan)
        for r, s in enumerate(self.sockets):
            self._send_control(s, wire.encode_control(
                "end", scan=scan, sender=self.sender, sent=int(counts.sent[r]),
                dropped=int(counts.dropped[r]), first_send=counts.first_send or time.time(),
                last_send=counts.last_send or time.time(), **extra))
        return counts

    @staticmethod
    def _send_control(s: zmq.Socket, message: bytes) -> None:
        """Control messages must get through: retry past the send timeout, within reason."""
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while True:
            try:
                s.send(message)
                return
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"a receiver rank took no message for {CONTROL_TIMEOUT:.0f} s "
                        f"({s.getsockopt(zmq.LAST_ENDPOINT).decode() or 'not connected'}); "
                        f"is the receiver job running?") from None


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
           progress=None) -> dict:
    """Send every scan of ``source`` through ``router``; returns totals.

    ``rate``: frames/s for this sender (0: as fast as possible).
    """
    g = source.geometry
    totals = {"sent": 0, "dropped": 0, "scans": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    for scan in source.scan_numbers():
        router.begin(scan, g)
        start = time.perf_counter()
        for i, s in enumerate(source.sectors(scan)):
            if rate:
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
        totals["scans"] += 1
    totals["seconds"] = time.perf_counter() - t0
    return totals
