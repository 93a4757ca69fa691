"""Ingest: a rank's sockets -> frames assembled in per-scan shares.

:class:`Ingest` reads sector and control messages from the rank's PULL sockets
(one per module) and places sectors into frames of a fixed pool
(:mod:`fourdstream.assembly`). It makes no collective decision and counts
nothing: the receiver hands its ready frames to the counting threads, and the
coordinator decides, for all ranks together, when a silent scan is over.

Memory is capped by the frame pool and the policy at the cap is to **block, not
drop**: while the pool is more than three-quarters full, only modules that are
missing from frames being assembled are read, so senders that run ahead (or a
rank that counts slowly) are held back by the ZeroMQ high-water mark. Only if
the pool stays tight with no useful sector for ``stall`` seconds (a sender that
died) is the oldest frame being assembled emitted incomplete (``evicted``).
"""

from __future__ import annotations

import time

import zmq

from .. import wire
from ..assembly import FramePool, Ledger, ScanShare
from ..detector import ScanGeometry


class Ingest:
    """One rank's receiving side.

    Parameters
    ----------
    sockets : the rank's PULL sockets, one per module
    pool : the rank's frame pool
    new_counting : callable returning the :class:`~fourdstream.pipeline.ScanCounting` of a new scan
    stall : seconds at a tight pool without progress before frames are evicted
    on_open : called with a scan's number when its first message arrives here
    skip : scans whose messages are ignored (counted as late): lost with an earlier job
    live : keep each scan's live-view sums (:class:`~fourdstream.live.LiveImages`)
    """

    def __init__(self, sockets: list[zmq.Socket], pool: FramePool, new_counting, *, stall: float = 2.0,
                 on_open=None, skip=(), live: bool = False):
        self.sockets, self.pool, self.new_counting, self.stall = sockets, pool, new_counting, stall
        self.on_open, self.live = on_open, live
        self.shares: dict[int, ScanShare] = {}   # known, not yet handed to the writer
        self.handed: set[int] = set(skip)        # scans handed to the writer (or skipped)
        self.session = Ledger()                  # messages that belong to no open scan
        self._held: dict[int, tuple] = {}        # module -> a sector waiting for a free buffer
        self._stalled_since: float | None = None
        self._poller = zmq.Poller()
        for sock in sockets:
            self._poller.register(sock, zmq.POLLIN)

    # -- reading -------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> dict:
        """Sockets with messages, waiting up to ``timeout_ms`` (shorter while sectors are held)."""
        return dict(self._poller.poll(min(timeout_ms, 2) if self._held else timeout_ms))

    def read(self, events: dict) -> bool:
        """Place held sectors, then read the readable modules worth reading; True on progress."""
        progressed = self._place_held()
        chosen = self._modules_to_read(events)
        for m in chosen:
            progressed |= self._read(m)
        if len(chosen) < len(events):
            self._hold_timeouts()
        return progressed

    def _modules_to_read(self, events) -> list[int]:
        """Readable modules worth reading now (all of them unless the pool is tight)."""
        modules = [m for m, sock in enumerate(self.sockets) if sock in events and m not in self._held]
        if not self.tight():
            return modules
        missing = 0
        for share in self.shares.values():
            for _, mask, _ in share.pending.values():
                missing |= ~mask
        return [m for m in modules if missing & (1 << m)]

    def _read(self, module: int) -> bool:
        """Handle up to 128 messages of one module's socket; True if any."""
        sock = self.sockets[module]
        for i in range(128):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return i > 0
            self.handle(parts)
            if module in self._held:
                return True
        return True

    def _hold_timeouts(self) -> None:
        """This rank is holding senders back: its open scans are not quiet."""
        now = time.time()
        for share in self.shares.values():
            if share.closed_by is None:
                share.last_message = now

    def _place_held(self) -> bool:
        placed = False
        for module, (share, h, position, payload) in list(self._held.items()):
            del self._held[module]
            if share.closed_by:            # closed while the sector waited
                share.ledger.late += 1
                continue
            self._place(share, h, position, payload)
            placed |= module not in self._held
        return placed

    def handle(self, parts) -> None:
        """Handle one multipart message."""
        try:
            kind, head, payload = wire.decode(parts)
        except wire.MalformedMessage as exc:
            share = self._open_share(exc.scan)
            if share is None:
                self.session.malformed += 1
            else:
                share.n_received += 1
                share.last_message = time.time()
                share.ledger.malformed += 1
            return
        if kind == "control":
            self._control(head)
            return
        h = head
        share = self._open_share(h.scan, lambda: ScanGeometry(h.width, h.height))
        if share is None:
            self.session.late += 1
            return
        share.received(h.module, h.thread, h.frame)
        g = share.geometry
        if h.width != g.width or h.height != g.height:
            share.ledger.malformed += 1
            return
        self._place(share, h, h.y * g.width + h.x, payload)

    def _place(self, share: ScanShare, h, position: int, payload) -> None:
        if not share.add(h.frame, h.module, position, payload):
            self._held[h.module] = (share, h, position, payload)

    def _open_share(self, scan, new_geometry=None) -> ScanShare | None:
        """The open share of ``scan`` (None if unknown, closed or handed on).

        An unknown scan is created when ``new_geometry`` is given: a callable, so
        that the hot path builds a ScanGeometry only for a scan it has not seen.
        """
        share = self.shares.get(scan)
        if share is None:
            if new_geometry is None or scan is None or scan in self.handed:
                return None
            share = self.share(scan, new_geometry())
        return None if share.closed_by else share

    def share(self, scan: int, geometry: ScanGeometry) -> ScanShare:
        """The share of ``scan``, created (empty) if this rank has not heard of it."""
        share = self.shares.get(scan)
        if share is None:
            share = self.shares[scan] = ScanShare(scan, geometry, self.pool, self.new_counting(),
                                                  live=self.live)
            if self.on_open:
                self.on_open(scan)
        return share

    def _control(self, msg: dict) -> None:
        scan = msg["scan"]
        if msg["type"] == "begin":   # fields checked by wire.decode
            g = ScanGeometry(msg["width"], msg["height"], msg["frames_per_position"], msg["flyback"])
            share = self._open_share(scan, lambda: g)
            if share is not None:
                share.geometry = g   # the begin message knows frames/position and flyback
            return
        share = self._open_share(scan)
        if share is None:
            self.session.late += 1
            return
        now = time.time()
        share.sender_ended(str(msg["sender"]), int(msg["sent"]), int(msg.get("dropped", 0)),
                           float(msg.get("first_send", now)), float(msg.get("last_send", now)))
        share.ledger.malformed += int(msg.get("malformed", 0))   # seen by a gateway

    # -- closing -------------------------------------------------------------------
    def close(self, share: ScanShare, reason: str) -> None:
        """Close ``share`` (no more sectors): frames being assembled become ready."""
        if share.closed_by is None:
            share.closed_by = reason
            share.flush()
            share.settle_losses()

    def close_ended(self, n_senders: int) -> None:
        """Close the scans whose ``n_senders`` senders all sent their ``end`` here."""
        for share in self.shares.values():
            if share.closed_by is None and share.all_ended(n_senders):
                self.close(share, "end")

    # -- memory cap ----------------------------------------------------------------
    def tight(self) -> bool:
        """The pool is three-quarters used: read only modules that complete frames."""
        return self.pool.n_free * 4 <= self.pool.capacity

    def relieve_stall(self, progressed: bool, make_room) -> None:
        """Tight pool and no progress for ``stall`` s: the missing sectors are not coming
        (a sender dropped or lost them). Emit the oldest frames being assembled as
        incomplete, calling ``make_room()`` after each, until the pool is no longer
        tight, so that all modules are read again."""
        if progressed or not self.tight():
            self._stalled_since = None
            return
        now = time.time()
        if self._stalled_since is None:
            self._stalled_since = now
            return
        if now - self._stalled_since < self.stall:
            return
        for share in sorted(self.shares.values(), key=lambda sh: sh.scan):
            while self.tight() and share.counting.calibration is not None and share.evict_oldest():
                make_room()
        self._stalled_since = None
