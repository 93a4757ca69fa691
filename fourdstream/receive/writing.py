"""Writing the scans a receiver job has finished, one collective write each.

:class:`ScanWriter` runs in a thread of its own on every rank, over a
communicator of its own, and writes the scans the coordinator hands it, in the
order handed (the same on every rank), while the next scan is being received.
Each write gathers the ranks' ledgers, timings and arrival statistics into the
file's ``/metadata/fourdstream`` and rank 0's one-line summary.
"""

from __future__ import annotations

import queue
import resource
import time
from pathlib import Path

from ..assembly import ARRIVAL_BIN, Ledger, ScanShare
from ..pipeline import counting_provenance, frame_accounting
from ..writer import Timeline, WriteError, write_counted_scan


def rank_concurrency(busy: list[set]) -> float:
    """Fraction of a scan's duration during which every rank had frames of it in flight.

    ``busy[r]`` holds the time bins (:data:`~fourdstream.assembly.ARRIVAL_BIN` s
    wide) in which rank ``r`` received a message of the scan or held frames of
    it being assembled or counted. The duration runs from the first bin busy on
    any rank to the last; a bin counts when every rank was busy in it.
    """
    bins = set().union(*busy)
    if not bins:
        return 0.0
    lo, hi = min(bins), max(bins)
    return sum(1 for b in range(lo, hi + 1) if all(b in r for r in busy)) / (hi - lo + 1)


def _activity(arrivals: list[dict], busy: list[set]) -> dict:
    """Per rank and time bin from the scan's first busy bin: messages received
    (``counts``) and whether frames were in flight (``busy``, 0 or 1)."""
    bins = set().union(*busy)
    lo = min(bins) if bins else 0
    width = (max(bins) - lo + 1) if bins else 0
    return {"bin_seconds": ARRIVAL_BIN,
            "counts": [[a.get(lo + i, 0) for i in range(width)] for a in arrivals],
            "busy": [[int(lo + i in b) for i in range(width)] for b in busy]}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ScanWriter:
    """Collective writer of one rank (see module docstring).

    Parameters
    ----------
    comm : mpi4py communicator used by the writers alone
    template : the receiver's :class:`~fourdstream.pipeline.ScanCounting` (options, backend)
    options : the receiver's :class:`~fourdstream.receive.ReceiverOptions`
    log : rank 0's messages
    memory_bound : callable giving a rank's memory bound (MB) from the events it holds
    """

    def __init__(self, comm, template, options, log=print, memory_bound=None, journal=None, live=None):
        self.comm, self.template, self.options = comm, template, options
        self.journal = journal          # rank 0: the session journal (fourdstream.session)
        self.live = live                # rank 0: the live view's state (fourdstream.live)
        self.memory_bound = memory_bound
        self.log = log if comm.rank == 0 else (lambda *a, **k: None)
        self.summaries: list[dict] = []    # rank 0: one per scan handed here, written or failed
        self.queue: queue.Queue = queue.Queue()

    def run(self) -> None:
        """Write the shares put on :attr:`queue` until ``None`` (the thread's body).

        A write that fails on every rank (:class:`~fourdstream.writer.WriteError`) is
        reported and the session goes on; any other error ends the thread.
        """
        while True:
            share = self.queue.get()
            if share is None:
                return
            self.write(share)

    def _failed(self, scan: int, reason: str) -> None:
        """Record (rank 0) a scan that could not be written: ``{"scan", "failed"}``."""
        self.log(f"scan {scan}: NOT written: {reason}")
        if self.comm.rank == 0:
            self.summaries.append({"scan": scan, "failed": reason})
            if self.journal:
                self.journal.append("failed", scan, reason=reason)
            if self.live:
                self.live.scan_written({"scan": scan, "failed": reason})

    def write(self, share: ScanShare) -> dict | None:
        """Write one scan collectively; returns rank 0's summary (None if not written)."""
        started = time.time()
        comm = self.comm
        counted = share.result()
        share.counted = [counted]      # the batches' own arrays can go
        ranks = comm.allgather({"failed": share.failed, "ledger": share.ledger,
                                "calibration": share.counting.calibration,
                                "geometry": share.geometry, "first_message": share.first_message,
                                "last_message": share.last_message, "last_send": share.last_send,
                                "first_send": share.first_send, "first_sector": share.first_sector,
                                "closed_by": share.closed_by,
                                "arrivals": dict(share.arrivals), "busy": share.busy,
                                "events": counted.n_events, "counted_at": share.counted_at,
                                "handed_at": share.handed_at, "write_started": started})
        failures = [r["failed"] for r in ranks if r["failed"]]
        ledger = Ledger()
        for r in ranks:
            ledger.add(r["ledger"])
        if failures:
            return self._failed(share.scan, failures[0])
        calibration = next(r["calibration"] for r in ranks if r["calibration"] is not None)
        geometry = next(r["geometry"] for r in ranks if r["closed_by"] != "nothing received")
        heard = [r for r in ranks if r["arrivals"]] or ranks
        # The scan's start: its first sector sent (a sender that died sent no end: its first
        # sector's arrival), not its first message, as a sender's ``begin`` precedes its
        # first sector by as long as it waits for the scan to start.
        first = min(min(r["first_send"] for r in ranks), min(r["first_sector"] for r in ranks))
        first_message = min(r["first_message"] for r in heard)
        timings = {"first_send": first if first < float("inf") else first_message,
                   "first_message": first_message,
                   "last_message": max(r["last_message"] for r in heard),
                   "last_send": max(r["last_send"] for r in ranks)}
        provenance = dict(
            counting_provenance(self.template.options, calibration, self.template.backend),
            source="stream", scan_number=share.scan, ranks=comm.size, senders=self.options.senders,
            **frame_accounting(geometry.n_frames, ledger.frames_complete, ledger.frames_incomplete),
            closed_by=sorted({r["closed_by"] for r in ranks} - {"nothing received"}),
            **ledger.provenance(), rank_concurrency=rank_concurrency([r["busy"] for r in ranks]),
            arrival_bin_seconds=ARRIVAL_BIN, timings=timings)
        path = comm.bcast(self._output_path(share.scan) if comm.rank == 0 else None, root=0)
        # From the last frame received on any rank to the file closed, step by step.
        timeline = Timeline(timings["last_message"], [(step, max(r[key] for r in ranks)) for step, key in (
            ("counting", "counted_at"), ("decision", "handed_at"), ("writer_queue", "write_started"))])
        timeline.mark("gather")
        try:
            report = write_counted_scan(path, counted, geometry,
                                        electron_counting=calibration.as_dict(),
                                        provenance=provenance, comm=comm,
                                        overwrite=self.options.overwrite, timeline=timeline,
                                        detectors=self.template.options.detectors,
                                        pattern=share.pattern)
        except WriteError as exc:
            return self._failed(share.scan, str(exc))
        closed = time.time()
        last_send = timings["last_send"] or timings["last_message"]
        summary = dict(scan=share.scan, path=str(path), frames=provenance["frames_found"],
                       events=report.n_events, expected=geometry.n_frames,
                       complete=ledger.frames_complete, incomplete=ledger.frames_incomplete,
                       missing=provenance["frames_missing"], ledger=ledger.as_dict(),
                       closed_by=provenance["closed_by"], seconds=closed - timings["first_send"],
                       latency=closed - last_send, write_seconds=report.seconds_total,
                       latency_received=closed - timings["last_message"], steps=report.steps,
                       thresholds=(calibration.background_threshold, calibration.x_ray_threshold),
                       calibrated=bool(calibration.threshold_calculated),
                       rank_concurrency=provenance["rank_concurrency"],
                       activity=_activity([r["arrivals"] for r in ranks], [r["busy"] for r in ranks]),
                       peak_rss_mb=comm.allgather(peak_rss_mb()),
                       memory_bound_mb=self.memory_bound(max(r["events"] for r in ranks))
                       if self.memory_bound else None)
        if comm.rank == 0:
            self.summaries.append(summary)
            self.log(format_scan_summary(summary))
            if self.live:   # the exact images of the whole scan replace the live sums
                images, pattern, detectors = report.images
                self.live.update_scan(share.scan, geometry, dict(images, pattern=pattern,
                                                                 frames=summary["frames"]),
                                      detectors, {"closed": True, "counted_per_rank": []})
                self.live.scan_written(summary)
            if self.journal:
                self.journal.append("written", share.scan, **{k: v for k, v in summary.items()
                                                              if k != "scan"})
        return summary

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


def format_scan_summary(s: dict) -> str:
    """Rank 0's one-line summary of a written scan."""
    lost = s["ledger"]
    extra = ", ".join(f"{k} {lost[k]}" for k in Ledger.LOSSES if lost[k])
    return (f"scan {s['scan']} -> {s['path']}: {s['frames']:,}/{s['expected']:,} frames "
            f"({s['complete']:,} complete, {s['incomplete']:,} incomplete, {s['missing']:,} missing), "
            f"{s['events']:,} events; closed by {'/'.join(s['closed_by'])}; "
            f"{s['frames'] / max(s['seconds'], 1e-9):,.0f} frames/s; every rank busy "
            f"{s['rank_concurrency']:.0%} of the time; last frame sent -> file closed "
            f"{s['latency']:.2f} s (after the last frame received: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in s["steps"].items())
            + ")" + (f"; losses: {extra}" if extra else ""))
