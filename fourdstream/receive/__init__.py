"""The receiver job: MPI ranks receive sectors, count electrons, write one file per scan.

Use it from Python as from the command line (``fourdstream receive`` is a thin
layer over :class:`Receiver`)::

    from mpi4py import MPI
    import zmq
    from fourdstream.pipeline import CountingOptions
    from fourdstream.receive import Receiver, ReceiverOptions
    from fourdstream.transport import rank_sockets

    sockets = rank_sockets(zmq.Context(), MPI.COMM_WORLD, listen="tcp://127.0.0.1:*",
                           endpoints_file="endpoints.json")
    summaries = Receiver(MPI.COMM_WORLD, sockets, CountingOptions(),
                         ReceiverOptions(output="out", scans=1)).run()

Every rank receives all through a scan: senders route by position chunks dealt
round-robin over the ranks (:mod:`fourdstream.route`). A rank is four parts,
each in a module of its own and testable without the others:

* :mod:`~fourdstream.receive.ingest` (the main thread): sockets -> frames
  assembled per scan, with the memory cap and loss ledger;
* :mod:`~fourdstream.receive.workers`: counting threads, fed with batches of
  ready frames once the scan's thresholds are known;
* :mod:`~fourdstream.receive.coordinator` (a thread): every decision the ranks
  take together (stop, a scan's end by silence on all ranks, calibration,
  write order), from one status exchange every 20 ms;
* :mod:`~fourdstream.receive.writing` (a thread): the collective write of each
  finished scan while the next one arrives.

A scan closes on a rank when every sender's ``end`` has arrived there (each
sender-to-rank pipe is FIFO, so everything announced has arrived or is lost),
or for all ranks at once when none has received a message of it for
``timeout`` seconds, or at shutdown (SIGINT/SIGTERM to any rank: the scans in
flight are closed, counted and written; exit 0).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
import traceback

from .. import compiled
from ..assembly import FramePool, Ledger
from ..detector import FRAME_BYTES, SECTOR_BYTES
from ..live import LiveState, Publisher
from ..pipeline import CountingOptions, ScanCounting
from ..session import Journal
from .coordinator import Coordinator, CoordinatorOptions
from .ingest import Ingest
from .workers import CountingThreads
from .writing import ScanWriter, format_scan_summary, rank_concurrency

__all__ = ["Receiver", "ReceiverOptions", "memory_bound_mb", "format_scan_summary",
           "rank_concurrency"]

#: Resident memory of a rank before any frame arrives (interpreter, numpy, h5py,
#: mpi4py, pyzmq, numba and the compiled kernel: 217 MB measured on
#: Debian 12 / Python 3.11 with the kernel cached, 236 MB compiling it), MB, with margin.
BASE_RSS_MB = 260
#: Frames counted per batch when --batch-size is not given.
RECEIVE_BATCH = 32


def pool_frames(window: int, batch_size: int, threads: int) -> int:
    """Frame buffers of a rank's pool: the assembly ``window`` (at least two batches) and
    the buffers of the batches handed to the counting threads, which count them where
    they lie (``2 threads`` batches queued and ``threads`` being counted)."""
    return max(window, 2 * batch_size) + 3 * threads * batch_size


def memory_bound_mb(window: int, hwm: int, batch_size: int, threads: int = 1,
                    events: int = 0, sample_frames: int = 20) -> float:
    """Peak resident memory of one rank, MB, that the receiver stays within.

    The frame pool (:func:`pool_frames`: ``window`` frame buffers and 3 x ``threads``
    x ``batch_size`` for the batches being counted, 0.66 MB each) + 4 module sockets x
    ``hwm`` queued sector messages (0.17 MB each) + calibration (the sample frames
    and their corrected values: 3 MB per sample frame at most, on the rank that
    holds them) + the counted events the rank holds (``events``, 4 bytes each; up
    to 10 copies while a scan is sorted, moved and written: 40 bytes per event,
    measured with a 512x512 scan on 4 ranks) + the stempy view's step on rank 0
    (:data:`~fourdstream.io.VLEN_EVENTS` events and their descriptors: 70 MB,
    counted for every rank) + :data:`BASE_RSS_MB`.
    """
    frame_mb = FRAME_BYTES / 1e6
    return (BASE_RSS_MB + pool_frames(window, batch_size, threads) * frame_mb
            + 4 * hwm * SECTOR_BYTES / 1e6 + 3 * sample_frames + 70 + 40 * events / 1e6)


@dataclasses.dataclass
class ReceiverOptions:
    """How the receiver job runs (see ``fourdstream receive --help``)."""

    output: str
    senders: int = 4            #: sender streams that send every scan
    timeout: float = 10.0       #: seconds without a message on any rank before a scan is closed
    window: int = 256           #: frame buffers per rank for assembly (memory cap: 0.66 MB each)
    hwm: int = 100              #: messages queued per module socket (0.17 MB each)
    scans: int = 0              #: stop after writing this many scans (0: until stopped)
    overwrite: bool = False     #: replace existing files instead of choosing a new name
    threads: int = 1            #: counting threads per rank
    progress: bool = True
    journal: str | None = None  #: rank 0 appends scans opened/written/failed here (JSON lines)
    live: str | None = None     #: rank 0 serves the live page at this [HOST:]PORT
    live_pub: str | None = None  #: rank 0 publishes live updates on this ZeroMQ endpoint
    skip: tuple = ()            #: scans to ignore (lost with an earlier job of the session)


class Receiver:
    """One rank of the receiver job (see module docstring).

    Parameters
    ----------
    comm : mpi4py communicator of the receiver ranks
    sockets : this rank's PULL sockets, one per module (:func:`fourdstream.transport.rank_sockets`)
    counting : counting options (thresholds or calibration, references, backend)
    options : ReceiverOptions
    log : callable for rank 0's messages (default: print to stdout)
    """

    def __init__(self, comm, sockets, counting: CountingOptions, options: ReceiverOptions, log=print):
        self.comm, self.options = comm, options
        self.rank = comm.rank
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        coordinator_comm, writer_comm = comm.Dup(), comm.Dup()
        self.template = ScanCounting(counting, coordinator_comm)   # loads references once
        self.batch = counting.batch_size or RECEIVE_BATCH
        self.lock = threading.RLock()
        journal = Journal(options.journal) if options.journal and self.rank == 0 else None
        self.live, self._stop_live, self.publisher = None, None, None
        live = bool(options.live or options.live_pub)
        if live and self.rank == 0:
            self.live = LiveState()
            if options.live_pub:
                import zmq

                self.publisher = self.live.on_update = Publisher(zmq.Context.instance(), options.live_pub)
                log(f"live stream: {self.publisher.endpoint} (fourdstream watch ENDPOINT)")
            if options.live:
                from ..liveserver import parse_address, start

                url, self._stop_live = start(self.live, *parse_address(options.live))
                port = url.rstrip("/").rsplit(":", 1)[1]
                log(f"live view: {url} (from another machine: ssh -L {port}:localhost:{port} "
                    f"THIS_NODE)")
        self.ingest = Ingest(sockets, FramePool(pool_frames(options.window, self.batch, options.threads)),
                             self.template.for_scan, stall=min(2.0, options.timeout),
                             on_open=journal.opened if journal else None, skip=options.skip,
                             live=live)
        self.writer = ScanWriter(writer_comm, self.template, options, log=log, journal=journal,
                                 live=self.live,
                                 memory_bound=lambda events: memory_bound_mb(
                                     options.window, options.hwm, self.batch, options.threads, events,
                                     counting.sample_frames))
        self.coordinator = Coordinator(
            coordinator_comm, self.ingest, self.lock, self.writer.queue.put,
            CoordinatorOptions(timeout=options.timeout, senders=options.senders, scans=options.scans,
                               sample_frames=counting.sample_frames,
                               live_every=1.0 if live else 0.0),
            log=log if options.progress else None, live=self.live, detectors=counting.detectors)
        self.counting = CountingThreads(options.threads)
        self._session: Ledger | None = None
        # Before any scan: the counting kernel for these references, the writer's helpers.
        self.template.warm_up()
        compiled.warm_up()

    @property
    def session(self) -> Ledger:
        """Messages that belonged to no open scan (malformed, late): this rank's while
        running, every rank's summed once :meth:`run` has returned."""
        return self._session or self.ingest.session

    @property
    def summaries(self) -> list[dict]:
        """Rank 0: the summary of each scan, in order; a scan that could not be written is
        ``{"scan": N, "failed": reason}``."""
        return self.writer.summaries

    def run(self) -> list[dict]:
        """Serve the session until stopped; returns rank 0's per-scan summaries."""
        self._install_signal_handlers()
        threads = [threading.Thread(target=self._guarded, args=(part.run,), name=name, daemon=True)
                   for part, name in ((self.coordinator, "fourdstream-coordinator"),
                                      (self.writer, "fourdstream-writer"))]
        for t in threads:
            t.start()
        try:
            while not self.coordinator.finished.is_set():
                self._step()
        except BaseException:
            self._abort_job()
            raise
        finally:
            self.counting.stop()
            self.writer.queue.put(None)
        for t in threads:
            t.join()
        if self._stop_live:
            self._stop_live()
        if self.publisher:
            self.publisher.close()
        self._session = Ledger()
        for part in self.comm.allgather(self.ingest.session):
            self._session.add(part)
        return self.summaries

    def _step(self) -> None:
        """One round of the receiving thread: read, count, close."""
        stopped = self.coordinator.stopped.is_set()
        started = time.time()
        events = {} if stopped else self.ingest.poll(10)
        with self.lock:
            progressed = self.ingest.read(events) if events else False
            self._collect_counted()
            if stopped:
                self._shut_down()
            self._count_ready(everything=not events)
            self.ingest.relieve_stall(progressed, lambda: self._count_ready(everything=True))
            self.ingest.close_ended(self.options.senders)
            now = time.time()
            for share in self.ingest.shares.values():
                share.note_busy(started, now)
        if stopped:
            self.coordinator.finished.wait(0.01)

    def _shut_down(self) -> None:
        """The session is stopping: close the scans in flight (or drop them at the scan limit)."""
        for share in list(self.ingest.shares.values()):
            if self.coordinator.limit_reached:
                if share.ready or share.pending or share.n_received:
                    self.log(f"scan {share.scan}: in flight at exit, not written")
                self.ingest.pool.give(slot for slot, *_ in share.ready)
                self.ingest.pool.give(slot for slot, *_ in share.pending.values())
                del self.ingest.shares[share.scan]
            else:
                self.ingest.close(share, "shutdown")

    def _count_ready(self, everything: bool = False) -> None:
        """Hand ready frames of calibrated scans to the counting threads (counted in the pool)."""
        for share in list(self.ingest.shares.values()):
            if share.failed:
                self.ingest.pool.give(slot for slot, *_ in share.ready)
                share.ready.clear()
                continue
            if share.counting.calibration is None:
                continue
            while (len(share.ready) >= self.batch or (share.ready and (everything or share.closed_by))) \
                    and not self.counting.full:
                self.counting.submit(share, *share.take_ready(self.batch))

    def _collect_counted(self) -> None:
        for share, slots, result in self.counting.collect():
            self.ingest.pool.give(slots)
            share.in_flight -= 1
            if isinstance(result, BaseException):
                raise result
            share.add_counted(result)

    def _guarded(self, body) -> None:
        """Run a thread's body; a failure there aborts the job (the other ranks would
        otherwise wait for this one in a collective call)."""
        try:
            body()
        except BaseException:
            self._abort_job()

    def _abort_job(self) -> None:
        """This rank cannot go on: the job must not wait for it in a collective call."""
        traceback.print_exc()
        sys.stderr.write(f"fourdstream receive: rank {self.rank} failed; aborting the job\n")
        sys.stderr.flush()
        self.comm.Abort(1)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame):   # the coordinator stops every rank
            self.coordinator.stop_requested = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)


