"""Assembling streamed sectors into frames on one rank, with a ledger of every loss.

Sectors of a frame (same scan and frame number) are copied into one buffer of a
fixed pool (:class:`FramePool`, the rank's memory cap). A frame is *ready* for
counting when its four sectors are in, or when it is emitted early as
*incomplete* (its scan closed, or the reassembly window was full and it was the
oldest frame being assembled). Missing sectors are zeros, and the frame's sector
mask says which arrived.

The ledger (:class:`Ledger`) counts everything that did not become part of a
complete frame: duplicates, malformed messages, late sectors (for a frame
already emitted), sectors disagreeing on their frame's position, frames evicted
from a full window, and messages the senders announced but that never arrived.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from .compiled import add_pattern
from .detector import COMPLETE_MASK, FRAME_PIXELS, FRAME_SHAPE, N_SECTORS, ScanGeometry, sector_slice
from .live import LiveImages
from .sparse import CountedFrames

_SECTOR_ROWS = [sector_slice(m)[0] for m in range(N_SECTORS)]

#: Width (seconds) of the time bins in which a rank records its messages and busy time.
ARRIVAL_BIN = 0.1


class FramePool:
    """A rank's frame buffers: ``(capacity, 576, 576)`` uint16 and a free list."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the frame pool needs at least one frame, got {capacity}")
        self.frames = np.zeros((capacity,) + FRAME_SHAPE, np.uint16)
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return len(self.frames)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give(self, slots) -> None:
        self._free.extend(int(s) for s in slots)


@dataclasses.dataclass
class Ledger:
    """Counts of one scan on one rank (summed over ranks for the file)."""

    received: int = 0           #: sector messages of the scan received
    sectors: int = 0            #: sector messages used
    duplicates: int = 0         #: second copy of a sector of a frame (before or after emission)
    malformed: int = 0          #: messages not following the wire format
    late: int = 0               #: missing sectors arriving after their frame was emitted
    conflicting: int = 0        #: sectors whose position disagrees with their frame's
    evicted: int = 0            #: frames emitted incomplete because the window was full
    lost: int = 0               #: messages senders announced that never arrived
    dropped_by_senders: int = 0  #: messages senders gave up on (send timeout)
    frames_complete: int = 0
    frames_incomplete: int = 0

    def add(self, other: "Ledger") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    #: The counters that are losses (everything but what arrived and was used).
    LOSSES = ("lost", "dropped_by_senders", "duplicates", "malformed", "late", "conflicting",
              "evicted")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def provenance(self) -> dict:
        """The loss counters under the names they carry in ``/metadata/fourdstream``."""
        return {"messages_received": self.received,
                "sectors_received": self.sectors, "sectors_duplicate": self.duplicates,
                "sectors_late": self.late, "sectors_conflicting": self.conflicting,
                "messages_malformed": self.malformed, "messages_lost": self.lost,
                "messages_dropped_by_senders": self.dropped_by_senders,
                "frames_evicted": self.evicted}


class ScanShare:
    """One scan as one rank receives it.

    Parameters
    ----------
    scan : scan number
    geometry : the scan's geometry (from a ``begin`` message or a sector header)
    pool : the rank's frame pool (shared by all scans)
    counting : the scan's :class:`~fourdstream.pipeline.ScanCounting` (its thresholds)
    """

    def __init__(self, scan: int, geometry: ScanGeometry, pool: FramePool, counting=None,
                 live: bool = False):
        self.scan, self.geometry, self.pool, self.counting = scan, geometry, pool, counting
        self.live = LiveImages(geometry.n_positions) if live else None   # the live view's sums
        self.ledger = Ledger()
        self.pending: dict[int, list] = {}    # frame number -> [slot, mask, position]
        self.ready: list[tuple] = []          # (slot, frame number, position, mask)
        self.emitted: dict[int, int] = {}     # frame number -> sector mask of emitted frames
        self.counted: list[CountedFrames] = []
        # Summed pattern of ``counted``: the live sums' own when there are live sums (their
        # counting thread adds each batch before handing it back), else added here.
        self.pattern = self.live.pattern if self.live else np.zeros(FRAME_PIXELS, np.int64)
        self.in_flight = 0                    # batches handed to the counting thread
        self.announced: dict[str, int] = {}   # sender -> messages it says it sent here
        self.n_received = 0                   # sector messages of this scan received here
        self.ended: set[str] = set()
        self.first_send = float("inf")       # the senders' first sector sent (their end messages)
        self.last_send = 0.0
        self.first_message = self.last_message = time.time()   # a ``begin`` may come seconds early
        self.first_sector = float("inf")     # when the first sector message arrived here
        self.failed: str | None = None        # why the scan cannot be counted
        self.closed_by: str | None = None     # "end", "timeout", "shutdown"
        self.heard: dict[tuple, int] = {}     # (module, thread) -> highest frame number received
        self.arrivals: collections.Counter = collections.Counter()  # ARRIVAL_BIN bin -> messages
        self.busy: set[int] = set()           # bins in which frames of the scan were in flight here
        self.counted_at = 0.0                 # when the last counted batch came back (Unix time)
        self.handed_at = 0.0                  # when the coordinator handed the scan to the writer

    def received(self, module: int, thread: int, frame: int) -> None:
        """Note one sector message of the scan from sender stream ``(module, thread)``."""
        self.last_message = now = time.time()
        self.first_sector = min(self.first_sector, now)
        self.n_received += 1
        self.arrivals[int(now / ARRIVAL_BIN)] += 1
        self.busy.add(int(now / ARRIVAL_BIN))
        key = (module, thread)
        if frame > self.heard.get(key, -1):
            self.heard[key] = frame

    def note_busy(self, since: float, now: float) -> None:
        """Record the time bins from ``since`` to ``now`` as busy if frames are being
        assembled, wait to be counted or are being counted here."""
        if self.pending or self.ready or self.in_flight:
            self.busy.update(range(int(since / ARRIVAL_BIN), int(now / ARRIVAL_BIN) + 1))

    def horizon(self, n_streams: int) -> float:
        """Frame number up to which every frame routed here has arrived (or never will).

        Each (sender, rank) pipe is FIFO, so once each of the ``n_streams`` sender
        streams has sent a frame numbered ``f`` or higher, no frame below ``f`` is
        still on its way. ``inf`` for a closed scan, -1 while a stream is unheard.
        """
        if self.closed_by is not None:
            return float("inf")
        return min(self.heard.values()) if len(self.heard) >= n_streams else -1

    def complete_frame_numbers(self, n: int) -> list[int]:
        """The ``n`` lowest frame numbers of complete frames waiting to be counted."""
        return sorted(fn for _, fn, _, mask in self.ready if mask == COMPLETE_MASK)[:n]

    # -- sectors -----------------------------------------------------------------
    def add(self, frame: int, module: int, position: int, payload) -> bool:
        """Place one sector; False if no buffer is free (call again after making room)."""
        entry = self.pending.get(frame)
        if entry is None:
            if frame in self.emitted:
                if self.emitted[frame] & (1 << module):
                    self.ledger.duplicates += 1
                else:
                    self.ledger.late += 1
                return True
            slot = self.pool.take()
            if slot is None:
                return False
            entry = self.pending[frame] = [slot, 0, position]
        elif entry[2] != position:
            self.ledger.conflicting += 1
            return True
        bit = 1 << module
        if entry[1] & bit:
            self.ledger.duplicates += 1
            return True
        sector = self.pool.frames[entry[0], _SECTOR_ROWS[module]]
        sector.reshape(-1)[:] = np.frombuffer(payload, dtype="<u2")
        entry[1] |= bit
        self.ledger.sectors += 1
        if entry[1] == COMPLETE_MASK:
            self._emit(frame)
        return True

    def _emit(self, frame: int) -> None:
        slot, mask, position = self.pending.pop(frame)
        if mask != COMPLETE_MASK:
            for m in range(N_SECTORS):
                if not mask & (1 << m):
                    self.pool.frames[slot, _SECTOR_ROWS[m]] = 0
            self.ledger.frames_incomplete += 1
        else:
            self.ledger.frames_complete += 1
        self.ready.append((slot, frame, position, mask))
        self.emitted[frame] = mask

    def evict_oldest(self) -> bool:
        """Emit the oldest frame being assembled as incomplete (window full)."""
        if not self.pending:
            return False
        self._emit(next(iter(self.pending)))
        self.ledger.evicted += 1
        return True

    def flush(self) -> None:
        """Emit every frame still being assembled (the scan is closing)."""
        for frame in list(self.pending):
            self._emit(frame)

    # -- control -----------------------------------------------------------------
    def sender_ended(self, sender: str, sent: int, dropped: int, first_send: float,
                     last_send: float) -> None:
        self.ended.add(sender)
        self.announced[sender] = sent
        self.ledger.dropped_by_senders += dropped
        self.first_send = min(self.first_send, first_send)
        self.last_send = max(self.last_send, last_send)
        self.last_message = time.time()

    def all_ended(self, n_senders: int) -> bool:
        return len(self.ended) >= n_senders

    def settle_losses(self) -> None:
        """Messages announced by senders but not received become ``lost``.

        Each (sender, rank) pipe is FIFO, so once every sender's ``end`` is in,
        everything it sent before has arrived or is lost.
        """
        self.ledger.received = self.n_received
        self.ledger.lost = max(sum(self.announced.values()) - self.n_received, 0)

    # -- counting ----------------------------------------------------------------
    def add_counted(self, counted: CountedFrames) -> None:
        """A batch back from a counting thread (the receiving thread calls this): kept, and
        in the scan's summed pattern, so that none of that is left for the end."""
        self.counted.append(counted)
        if self.live is None:
            add_pattern(counted.events, self.pattern)
        self.counted_at = time.time()

    def take_ready(self, n: int):
        """Up to ``n`` ready frames: (their slots, frame numbers, positions, masks). They stay
        in the pool, counted there: the caller gives the slots back when that is done."""
        batch, self.ready = self.ready[:n], self.ready[n:]
        return (np.array([b[0] for b in batch], np.int64), np.array([b[1] for b in batch], np.uint32),
                np.array([b[2] for b in batch], np.int64), np.array([b[3] for b in batch], np.uint8))

    @property
    def n_counted(self) -> int:
        return sum(len(c) for c in self.counted)

    def result(self) -> CountedFrames:
        return CountedFrames.concatenate(self.counted)
