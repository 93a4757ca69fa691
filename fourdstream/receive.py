"""The receiver job: MPI ranks receive sectors, count electrons, write one file per scan.

Each rank runs three threads:

* the **main thread** receives sector and control messages on the rank's PULL
  sockets, assembles frames (:mod:`fourdstream.assembly`), hands ready frames in
  batches to the counting thread as soon as the scan's thresholds are known, and
  closes a scan when every sender has sent its ``end`` message (or after
  ``timeout`` seconds without a message of that scan, or at shutdown);
* the **counting thread** counts those batches while the main thread goes on
  receiving (numpy releases the GIL in its array operations), so that a rank
  never stops draining its sockets for the length of a batch;
* the **writer thread** agrees with the other ranks, in lockstep over its own
  communicator, on the next closed scan and writes it collectively
  (:mod:`fourdstream.writer`), while the main thread keeps receiving the next
  scan. A rank busy in a collective write therefore never stops draining its
  socket, so no sender can block on it and starve another rank.

Thresholds: fixed, or calibrated per scan on rank 0, which owns the first block
of scan positions and so receives the scan's first frames, the sample frames of
the reference method (the same frames an offline count of the scan samples; if
the block is smaller than ``--sample-frames``, rank 0 uses the frames it has).
Rank 0 sends the result to every rank, which holds its ready frames until then;
all ranks count with the same thresholds.

Memory is capped by the frame pool (``window`` frames per rank) and the policy
at the cap is to **block, not drop**. A rank has one socket per module; while
the pool is more than three-quarters full it reads only from modules that are
missing from frames being assembled, so senders that run ahead (or a rank that
counts slowly) are held back by the ZeroMQ high-water mark; senders give up
after their send timeout and report what they dropped in their ``end``
message. Ready frames are counted first; a rank waiting for its thresholds
simply stops reading. Only if the pool is full and no useful sector has come
for ``stall`` seconds (a sender that died) is the oldest frame being assembled
emitted incomplete (``evicted`` in the ledger).
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from . import wire
from .assembly import FramePool, Ledger, ScanShare
from .calibrate import CalibrationError
from .detector import COMPLETE_MASK, ScanGeometry
from .pipeline import CountingOptions, ScanCounting, counting_provenance, frame_accounting
from .writer import WriteError, write_counted_scan

TAG_CALIBRATION = 71
TAG_STOP = 72


@dataclasses.dataclass
class ReceiverOptions:
    """How the receiver job runs (see ``fourdstream receive --help``)."""

    output: str
    senders: int = 4            #: sender processes/threads that send every scan
    timeout: float = 10.0       #: seconds without a message before an open scan is closed
    window: int = 256           #: frame buffers per rank (memory cap: 0.66 MB each)
    scans: int = 0              #: stop after writing this many scans (0: until stopped)
    overwrite: bool = False     #: replace existing files instead of choosing a new name
    progress: bool = True


class Receiver:
    """One rank of the receiver job.

    Parameters
    ----------
    comm : mpi4py communicator of the receiver ranks
    sockets : this rank's PULL sockets, one per module (:func:`fourdstream.transport.rank_sockets`)
    counting : counting options (thresholds or calibration, references, backend)
    options : ReceiverOptions
    log : callable for rank 0's messages (default: print to stdout)
    """

    def __init__(self, comm, sockets: list[zmq.Socket], counting: CountingOptions,
                 options: ReceiverOptions, log=print):
        self.comm, self.sockets, self.options = comm, sockets, options
        self.wcomm = comm.Dup()    # the writer thread's collectives stay apart from p2p traffic
        self.rank, self.size = comm.rank, comm.size
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.template = ScanCounting(counting)    # loads references once
        self.batch = counting.batch_size
        self.pool = FramePool(max(options.window, 2 * self.batch))
        self.shares: dict[int, ScanShare] = {}    # known, not yet written
        self.closed: dict[int, ScanShare] = {}    # counted and closed, for the writer
        self.written: set[int] = set()
        self.session = Ledger()                   # messages that belong to no open scan
        self.summaries: list[dict] = []           # rank 0: one per written scan
        self._early_calibrations: dict[int, tuple] = {}
        self._held: dict[int, tuple] = {}         # module -> a sector waiting for a free buffer
        self._stalled_since: float | None = None
        self.stall = min(2.0, options.timeout)    # seconds at a full pool before evicting
        self._to_count: queue.Queue = queue.Queue(maxsize=2)   # batches for the counting thread
        self._counted: queue.Queue = queue.Queue()              # (share, CountedFrames or error)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._main_done = threading.Event()
        self._writer_error: BaseException | None = None

    # == main thread ==================================================================
    def run(self) -> list[dict]:
        """Serve the session until stopped; returns rank 0's per-scan summaries."""
        self._install_signal_handlers()
        writer = threading.Thread(target=self._writer_main, name="fourdstream-writer", daemon=True)
        writer.start()
        threading.Thread(target=self._counting_main, name="fourdstream-counting", daemon=True).start()
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(2 if self._held else 10))
                progressed = self._place_held()
                chosen = self._modules_to_read(events)
                for m in chosen:
                    progressed |= self._read(m)
                if len(chosen) < len(events):
                    self._hold_timeouts()
                self._poll_mpi()
                if self.rank == 0:
                    self._calibrate_ready(force=self.pool.n_free == 0)
                self._count_ready(everything=not events)
                self._relieve_stall(progressed)
                self._close_finished()
            self._shutdown()
        except BaseException:
            # This rank cannot go on: the job must not wait for it in a collective call.
            self._abort_job()
            raise
        finally:
            self._main_done.set()
            self._to_count.put(None)
        writer.join()
        if self._writer_error is not None:
            raise self._writer_error
        return self.summaries

    def _abort_job(self) -> None:
        import sys
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"fourdstream receive: rank {self.rank} failed; aborting the job\n")
        sys.stderr.flush()
        self.comm.Abort(1)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame):
            if not self._stop.is_set():
                self._stop.set()
                for r in range(self.size):   # a signal to one rank stops them all
                    if r != self.rank:
                        self.comm.isend(None, dest=r, tag=TAG_STOP)

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    # -- messages ----------------------------------------------------------------------
    def _modules_to_read(self, events) -> list[int]:
        """Readable modules worth reading now (all of them unless the pool is tight)."""
        modules = [m for m, sock in enumerate(self.sockets) if sock in events and m not in self._held]
        if not self._tight():
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
            self._handle(parts)
            if module in self._held:
                return True
        return True

    def _hold_timeouts(self) -> None:
        """This rank is holding senders back: its open scans are not quiet, do not time them out."""
        now = time.time()
        for share in self.shares.values():
            if share.closed_by is None:
                share.last_message = now

    def _place_held(self) -> bool:
        placed = False
        for module, (share, h, position, payload) in list(self._held.items()):
            del self._held[module]
            if share.closed_by:            # closed (timeout) while the sector waited
                share.ledger.late += 1
                continue
            self._place(share, h, position, payload)
            placed |= module not in self._held
        return placed

    def _relieve_stall(self, progressed: bool) -> None:
        """Tight pool and no progress for ``stall`` s: the missing sectors are not coming
        (a sender dropped or lost them). Emit the oldest frames being assembled as
        incomplete until the pool is no longer tight, so all modules are read again."""
        if progressed or not self._tight():
            self._stalled_since = None
            return
        now = time.time()
        if self._stalled_since is None:
            self._stalled_since = now
            return
        if now - self._stalled_since < self.stall:
            return
        for share in sorted(self.shares.values(), key=lambda sh: sh.scan):
            while self._tight() and share.counting.calibration is not None and share.evict_oldest():
                self._count_ready(everything=True)
        self._stalled_since = None

    def _tight(self) -> bool:
        """The pool is three-quarters used: read only modules that complete frames."""
        return self.pool.n_free * 4 <= self.pool.capacity

    def _handle(self, parts) -> None:
        try:
            kind, head, payload = wire.decode(parts)
        except wire.MalformedMessage as exc:
            share = self._open_share(exc.scan)
            if share is None:
                self.session.malformed += 1
            else:
                share.n_received += 1
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
        share.n_received += 1
        g = share.geometry
        if h.width != g.width or h.height != g.height:
            share.ledger.malformed += 1
            return
        self._place(share, h, h.y * g.width + h.x, payload)

    def _place(self, share: ScanShare, h, position: int, payload) -> None:
        if not share.add(h.frame, h.module, position, payload):
            self._held[h.module] = (share, h, position, payload)

    def _open_share(self, scan, new_geometry=None) -> ScanShare | None:
        """The open share of ``scan`` (None if unknown, closed or written).

        An unknown scan is created when ``new_geometry`` is given: a callable, so
        that the hot path builds a ScanGeometry only for a scan it has not seen.
        """
        share = self.shares.get(scan)
        if share is None:
            if new_geometry is None or scan is None or scan in self.written:
                return None
            share = self._new_share(scan, new_geometry())
        return None if share.closed_by else share

    def _new_share(self, scan: int, geometry: ScanGeometry) -> ScanShare:
        share = ScanShare(scan, geometry, self.pool, self.template.for_scan())
        if scan in self._early_calibrations:
            share.counting.calibration, share.failed = self._early_calibrations.pop(scan)
        with self._lock:
            self.shares[scan] = share
        return share

    def _control(self, msg: dict) -> None:
        scan = msg["scan"]
        if msg["type"] == "begin":
            try:
                g = ScanGeometry(msg["width"], msg["height"], msg["frames_per_position"],
                                 bool(msg["flyback"]))
            except (KeyError, ValueError):
                self.session.malformed += 1
                return
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

    def _poll_mpi(self) -> None:
        from mpi4py import MPI

        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOP):
            self.comm.recv(source=MPI.ANY_SOURCE, tag=TAG_STOP)
            self._stop.set()
        while self.rank != 0 and self.comm.iprobe(source=0, tag=TAG_CALIBRATION):
            scan, calibration, error = self.comm.recv(source=0, tag=TAG_CALIBRATION)
            share = self.shares.get(scan)
            if share is None:
                self._early_calibrations[scan] = (calibration, error)
            else:
                share.counting.calibration, share.failed = calibration, error

    # -- thresholds and counting ---------------------------------------------------------
    def _calibrate_ready(self, force: bool = False) -> None:
        """Rank 0: calibrate scans whose sample frames are in (see module docstring)."""
        n = self.template.options.sample_frames
        for share in list(self.shares.values()):
            if share.counting.calibration is not None or share.failed:
                continue
            complete = sorted(fn for _, fn, _, mask in share.ready if mask == COMPLETE_MASK)
            settled = len(complete) >= n and not any(fn < complete[n - 1] for fn in share.pending)
            whole_block = len(share.emitted) >= share.expected_here(self.rank, self.size)
            if not (settled or whole_block or share.closed_by or (force and complete)):
                continue
            try:
                frames = {fn: frame for slot, fn, _, mask in share.ready if mask == COMPLETE_MASK
                          for frame in [self.pool.frames[slot]]}
                chosen, weights = share.counting.plan_samples(np.fromiter(frames, np.int64),
                                                              np.full(len(frames), COMPLETE_MASK))
                calibration = share.counting.calibrate(
                    {int(fn): (int(w), frames[int(fn)]) for fn, w in zip(chosen, weights)})
                error = None
            except CalibrationError as exc:
                calibration, error = None, f"threshold calibration failed: {exc}"
                self.log(f"scan {share.scan}: {error}")
            share.failed = error   # calibrate() kept the calibration in share.counting
            for r in range(1, self.size):
                self.comm.send((share.scan, calibration, error), dest=r, tag=TAG_CALIBRATION)

    def _count_ready(self, everything: bool = False) -> None:
        """Hand ready frames to the counting thread (batches copied out of the pool)."""
        self._collect_counted()
        for share in list(self.shares.values()):
            if share.failed:
                self.pool.give(slot for slot, *_ in share.ready)
                share.ready.clear()
                continue
            if share.counting.calibration is None:
                continue
            while (len(share.ready) >= self.batch or (share.ready and (everything or share.closed_by))) \
                    and not self._to_count.full():
                frames, fn, pos, mask, slots = share.take_ready(self.batch)
                self.pool.give(slots)
                share.in_flight += 1
                self._to_count.put((share, frames, fn, pos, mask))

    def _collect_counted(self) -> None:
        while True:
            try:
                share, result = self._counted.get_nowait()
            except queue.Empty:
                return
            share.in_flight -= 1
            if isinstance(result, BaseException):
                raise result
            share.counted.append(result)

    def _counting_main(self) -> None:
        """The counting thread: count batches until told to stop (None)."""
        while True:
            item = self._to_count.get()
            if item is None:
                return
            share, frames, fn, pos, mask = item
            try:
                result = share.counting.count(frames, fn, pos, mask)
            except BaseException as exc:   # raised in the main thread by _collect_counted
                result = exc
            self._counted.put((share, result))

    def _close_finished(self) -> None:
        now = time.time()
        for share in list(self.shares.values()):
            if share.closed_by is None:
                if share.all_ended(self.options.senders):
                    share.closed_by = "end"
                elif now - share.last_message > self.options.timeout:
                    share.closed_by = "timeout"
                    self.log(f"scan {share.scan}: no message for {self.options.timeout:g} s, "
                             f"closing it with what arrived")
                if share.closed_by:
                    share.flush()
                    share.settle_losses()
            if share.closed_by and not share.pending and not share.ready and not share.in_flight \
                    and share.scan not in self.closed \
                    and (share.counting.calibration is not None or share.failed):
                with self._lock:
                    self.closed[share.scan] = share

    def _shutdown(self) -> None:
        """Close every open scan (incomplete) and wait until it is counted."""
        if self._writer_error is not None or self.options.scans and len(self.written) >= self.options.scans:
            for share in self.shares.values():
                if share.scan not in self.closed and (share.ready or share.pending):
                    self.log(f"scan {share.scan}: in flight at exit, not written")
            return
        for share in self.shares.values():
            if share.closed_by is None:
                share.closed_by = "shutdown"
                share.flush()
                share.settle_losses()
        deadline = time.time() + self.options.timeout
        while any(s.scan not in self.closed for s in self.shares.values()) and time.time() < deadline:
            self._poll_mpi()
            if self.rank == 0:
                self._calibrate_ready(force=True)
            self._count_ready(everything=True)
            self._close_finished()
            time.sleep(0.005)
        for share in self.shares.values():
            if share.scan not in self.closed:
                share.failed = "no thresholds arrived before shutdown"
        self._count_ready()      # drops the failed scans' frames ...
        self._close_finished()   # ... and hands them to the writer, which reports them

    # == writer thread ===============================================================
    def _writer_main(self) -> None:
        try:
            self._writer_loop()
        except BaseException as exc:  # reported by run() in the main thread
            self._writer_error = exc
            self._stop.set()

    def _writer_loop(self) -> None:
        waiting_since: dict[int, float] = {}
        progress = _ScanProgress(self.log if self.options.progress else None)
        while True:
            with self._lock:
                closed = sorted(self.closed)
                known = sorted(set(self.shares) - set(self.closed))
            done = self._main_done.is_set()
            give_up = [s for s, t in waiting_since.items()
                       if s not in self.shares and (done or time.time() - t > self.options.timeout)]
            status = {"closed": closed[:4], "known": known, "done": done, "give_up": give_up,
                      "geometry": {s: dataclasses.asdict(self.shares[s].geometry) for s in closed[:4]},
                      "counted": {s: sh.n_counted for s, sh in list(self.shares.items())}}
            everyone = self.wcomm.allgather(status)
            progress.update(everyone, self.shares, self.size)
            candidates = sorted({s for st in everyone for s in st["closed"]})
            if not candidates:
                if all(st["done"] for st in everyone):
                    return
                time.sleep(0.02)
                continue
            scan = candidates[0]
            waiting_since.setdefault(scan, time.time())
            if not all(scan in st["closed"] or scan in st["give_up"] for st in everyone):
                time.sleep(0.01)
                continue
            waiting_since.pop(scan)
            geometry = ScanGeometry(**next(st["geometry"][scan] for st in everyone if scan in st["closed"]))
            with self._lock:
                share = self.closed.pop(scan, None)
                self.shares.pop(scan, None)
                self.written.add(scan)
            if share is None:    # this rank never heard of the scan: it holds nothing of it
                share = ScanShare(scan, geometry, self.pool, self.template.for_scan())
                share.closed_by = "nothing received"
            progress.finish(scan)
            self._write(share, geometry)
            if self.options.scans and len(self.written) >= self.options.scans:
                self._stop.set()
                return

    def _write(self, share: ScanShare, geometry: ScanGeometry) -> None:
        comm = self.wcomm
        failures = [f for f in comm.allgather(share.failed) if f]
        ledger = Ledger()
        for part in comm.allgather(share.ledger):
            ledger.add(part)
        if failures:
            self.log(f"scan {share.scan}: NOT written: {failures[0]}")
            return
        calibration = next(c for c in comm.allgather(share.counting.calibration) if c is not None)
        times = comm.allgather((share.first_message, share.last_message, share.last_send,
                                share.closed_by, share.first_send))
        provenance = dict(
            counting_provenance(self.template.options, calibration, self.template.backend),
            source="stream", scan_number=share.scan, ranks=self.size, senders=self.options.senders,
            **frame_accounting(geometry.n_frames, ledger.frames_complete, ledger.frames_incomplete),
            closed_by=sorted({t[3] for t in times}), **ledger.provenance(),
            timings={"first_send": min(min(t[4] for t in times), min(t[0] for t in times)),
                     "first_message": min(t[0] for t in times), "last_message": max(t[1] for t in times),
                     "last_send": max(t[2] for t in times)})
        path = comm.bcast(self._output_path(share.scan) if self.rank == 0 else None, root=0)
        try:
            report = write_counted_scan(path, share.result(), geometry,
                                        electron_counting=calibration.as_dict(),
                                        provenance=provenance, comm=comm,
                                        overwrite=self.options.overwrite)
        except WriteError as exc:
            self.log(f"scan {share.scan}: NOT written: {exc}")
            return
        closed = time.time()
        last_send = provenance["timings"]["last_send"] or provenance["timings"]["last_message"]
        summary = dict(scan=share.scan, path=str(path), frames=provenance["frames_found"],
                       events=report.n_events,
                       expected=geometry.n_frames, complete=ledger.frames_complete,
                       incomplete=ledger.frames_incomplete, missing=provenance["frames_missing"],
                       ledger=ledger.as_dict(), closed_by=provenance["closed_by"],
                       seconds=closed - provenance["timings"]["first_send"],
                       latency=closed - last_send, write_seconds=report.seconds_total,
                       thresholds=(calibration.background_threshold, calibration.x_ray_threshold),
                       calibrated=bool(calibration.threshold_calculated))
        if self.rank == 0:
            self.summaries.append(summary)
            self.log(format_scan_summary(summary))

    def _output_path(self, scan: int) -> Path:
        """``scanNNNNNNNNNN.h5`` in the output folder; never an existing file's name."""
        folder = Path(self.options.output)
        path = folder / f"scan{scan:010d}.h5"
        if self.options.overwrite:
            return path
        k = 1
        while path.exists():
            path = folder / f"scan{scan:010d}.{k}.h5"
            k += 1
        return path


class _ScanProgress:
    """Rank 0's progress lines: frames counted / expected per open scan, and the rate."""

    def __init__(self, log):
        self.log, self.last, self.start, self.shown = log, 0.0, {}, {}

    def update(self, everyone, shares, n_ranks) -> None:
        now = time.time()
        if self.log is None or now - self.last < 2.0:
            return
        counted: dict[int, int] = {}
        for st in everyone:
            for scan, n in st["counted"].items():
                counted[scan] = counted.get(scan, 0) + n
        for scan, n in sorted(counted.items()):
            share = shares.get(scan)
            if share is None or n == 0 or n == self.shown.get(scan):
                continue
            t0, n0 = self.start.setdefault(scan, (now, n))
            rate = (n - n0) / (now - t0) if now > t0 else 0.0
            self.log(f"scan {scan}: {n:,}/{share.geometry.n_frames:,} frames counted"
                     + (f", {rate:,.0f} frames/s" if rate else ""))
            self.shown[scan] = n
        self.last = now

    def finish(self, scan) -> None:
        self.start.pop(scan, None)
        self.shown.pop(scan, None)


def format_scan_summary(s: dict) -> str:
    lost = s["ledger"]
    extra = ", ".join(f"{k} {lost[k]}" for k in Ledger.LOSSES if lost[k])
    return (f"scan {s['scan']} -> {s['path']}: {s['frames']:,}/{s['expected']:,} frames "
            f"({s['complete']:,} complete, {s['incomplete']:,} incomplete, {s['missing']:,} missing), "
            f"{s['events']:,} events; closed by {'/'.join(s['closed_by'])}; "
            f"{s['frames'] / max(s['seconds'], 1e-9):,.0f} frames/s; last frame sent -> file closed "
            f"{s['latency']:.2f} s" + (f"; losses: {extra}" if extra else ""))
