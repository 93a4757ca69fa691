"""Gateway: lets unmodified NCEM producers feed the receiver ranks.

The production DAQ producers PUSH sector messages (9- or 8-field msgpack header
+ raw sector) and send no control messages. The gateway binds PULL sockets for
them, forwards every sector message unchanged (zero-copy) to the rank that owns
its scan position, and plays the senders' part of the protocol for the ranks,
as one sender per module (``gateway.0`` .. ``gateway.3``, each on its module's
pipes): it announces each new scan number it sees (``begin``, geometry from the
headers) and ends it (``end`` with per-rank counts) once it has forwarded the
scan's expected number of sectors, or after ``timeout`` seconds without a
message of that scan. Like a sender it never hangs on the ranks: when none takes
a message for the routers' ``send_timeout``, it ends the open scans (their
counts tell the ranks what was lost) and stops with :attr:`Gateway.gone` set.
"""

from __future__ import annotations

import dataclasses
import time

import zmq

from . import wire
from .detector import N_SECTORS, ScanGeometry
from .send import Router


@dataclasses.dataclass
class _OpenScan:
    expected: int        # sector messages the scan should bring
    forwarded: int = 0
    malformed: int = 0
    last: float = dataclasses.field(default_factory=time.time)


class Gateway:
    """Forward producer messages to the ranks (see module docstring).

    Parameters
    ----------
    inbound : PULL socket the producers connect to
    routers : one :class:`~fourdstream.send.Router` per module, to the ranks
    frames_per_position : frames the producers record per scan position
    timeout : seconds without a message before an open scan is ended
    scans : stop after this many scans (0: until stopped)
    """

    def __init__(self, inbound: zmq.Socket, routers: list[Router], *, frames_per_position: int = 1,
                 timeout: float = 10.0, scans: int = 0, log=print):
        self.inbound, self.routers, self.fpp = inbound, routers, frames_per_position
        self.timeout, self.scans, self.log = timeout, scans, log
        self.open: dict[int, _OpenScan] = {}
        self.finished: list[int] = []
        self.unattributed = 0     # malformed messages with no readable scan number
        self.stopped = False
        self.gone: str | None = None   # why the gateway gave up on the ranks
        self.totals = {"sent": 0, "dropped": 0, "unannounced": 0, "seconds": 0.0}
        self._t0 = time.perf_counter()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbound, zmq.POLLIN)
        while not self.stopped:
            if poller.poll(50):
                for _ in range(1024):
                    try:
                        parts = self.inbound.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.forward(parts)
                    if any(r.receivers_gone for r in self.routers):
                        self._give_up()
                        return
            now = time.time()
            for scan, state in list(self.open.items()):
                if now - state.last > self.timeout:
                    self.log(f"gateway: scan {scan}: no message for {self.timeout:g} s; ending it "
                             f"after {state.forwarded:,} of {state.expected:,} sectors")
                    self._end(scan)

    def forward(self, parts) -> None:
        try:
            kind, h, payload = wire.decode(parts)
        except wire.MalformedMessage as exc:
            if exc.scan in self.open:
                self.open[exc.scan].malformed += 1
                self.open[exc.scan].last = time.time()
                self._maybe_end(exc.scan)
            else:
                self.unattributed += 1
            return
        if kind == "control":          # producers send none; ignore foreign ones
            self.unattributed += 1
            return
        state = self.open.get(h.scan)
        if state is None:
            if h.scan in self.finished:
                self.unattributed += 1     # a straggler of a scan already ended
                return
            geometry = ScanGeometry(h.width, h.height, self.fpp)
            for router in self.routers:
                router.begin(h.scan, geometry)
            state = self.open[h.scan] = _OpenScan(expected=geometry.n_frames * N_SECTORS)
        router = self.routers[h.module]
        router.send(h.scan, router.rank_of(h.scan, h.x, h.y, h.frame), parts[0], payload)
        state.forwarded += 1
        state.last = time.time()
        self._maybe_end(h.scan)

    def _maybe_end(self, scan: int) -> None:
        state = self.open[scan]
        if state.forwarded + state.malformed >= state.expected:
            self._end(scan)

    def _give_up(self) -> None:
        timeout = max(r.send_timeout for r in self.routers)
        self.gone = f"no receiver rank took a message for {timeout:g} s (--send-timeout)"
        for scan in list(self.open):
            self._end(scan)
        self.stopped = True

    def _end(self, scan: int) -> None:
        state = self.open.pop(scan)
        for m, router in enumerate(self.routers):   # malformed ones are reported once
            counts = router.end(scan, malformed=state.malformed if m == 0 else 0)
            self.totals["sent"] += int(counts.sent.sum())
            self.totals["dropped"] += int(counts.dropped.sum())
            self.totals["unannounced"] += len(counts.unannounced)
        self.totals["seconds"] = time.perf_counter() - self._t0
        self.finished.append(scan)
        self.log(f"gateway: scan {scan} ended: {state.forwarded:,} sectors forwarded, "
                 f"{state.malformed} malformed")
        if self.scans and len(self.finished) >= self.scans:
            self.stopped = True
