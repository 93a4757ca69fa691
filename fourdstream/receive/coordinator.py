"""The per-scan coordinator: every decision the ranks of a receiver job take together.

It runs in a thread of its own on every rank, over a communicator of its own.
Every ``interval`` seconds the ranks exchange a short status (one
``allgather``) and all take the same decisions from the same data, so they
never disagree and no rank waits on another outside this one call:

* **stop**: a signal (or a failure) on any rank stops the session on all;
* **liveness**: a scan that is not closed on every rank is closed by timeout
  only when *no rank* has received a message of it for ``timeout`` seconds
  (one rank's silence while others still receive is not an end);
* **calibration**: the scan's sample frames are its first ``sample_frames``
  complete frames by frame number, wherever they are. Once they are settled
  (every rank has heard each sender stream reach the last of them, or the scan
  is closed, or a rank's frame pool has been full for ``force_after`` seconds: a
  sender that lags for a moment fills pools with incomplete frames without that
  being a deadlock), every rank calibrates together
  (:meth:`~fourdstream.pipeline.ScanCounting.calibrate`, collective), giving
  the thresholds an offline count of the same frames gives;
* **write order**: a scan that is done (closed, counted) on every rank that
  knows it is handed to the writer; all ranks hand the same scans in the same
  order. A rank that never heard of a scan takes part with an empty share;
* **the end**: once stopped, when no rank has anything left.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from ..calibrate import CalibrationError
from ..collective import wait_for_all
from ..detector import COMPLETE_MASK, ScanGeometry
from ..images import Detectors


@dataclasses.dataclass
class CoordinatorOptions:
    timeout: float = 10.0     #: seconds without a message on any rank before a scan closes
    senders: int = 4          #: sender streams that send every scan
    scans: int = 0            #: hand this many scans to the writer, then stop (0: no limit)
    sample_frames: int = 20   #: calibration: sample from this many first complete frames
    force_after: float = 2.0  #: calibrate with the frames at hand once a pool is full this long (s)
    interval: float = 0.02    #: seconds between two status exchanges
    live_every: float = 0.0   #: seconds between two live-view reductions (0: no live view)


class Coordinator:
    """Collective decisions of one rank (see module docstring).

    Parameters
    ----------
    comm : mpi4py communicator used by this coordinator alone (its ranks' coordinators)
    ingest : the rank's :class:`~fourdstream.receive.ingest.Ingest`
    lock : lock held by whoever touches the ingest's shares
    hand : callable ``hand(share)``, called (under ``lock``) with each scan to write, in order
    options : CoordinatorOptions
    log : rank 0's progress and decisions (default: silent)
    """

    def __init__(self, comm, ingest, lock, hand, options: CoordinatorOptions, log=None, live=None,
                 detectors=None):
        self.comm, self.ingest, self.lock, self.hand, self.options = comm, ingest, lock, hand, options
        self.live = live                   # rank 0: the LiveState the page serves
        self._live_at = 0.0
        self._live_detectors = detectors   # the live view's detectors (given, or kept across scans)
        self.log = log if (log is not None and comm.rank == 0) else None
        self.stop_requested = False        # set by this rank (signal, failure)
        self.stopped = threading.Event()   # agreed: the session is stopping
        self.finished = threading.Event()  # agreed: nothing left anywhere
        self.limit_reached = False         # stopped because ``scans`` scans were handed on
        self.n_handed = 0
        self._done_at: dict[int, float] = {}
        self._full_since: float | None = None
        self._progress = _Progress(self.log)

    def run(self) -> None:
        """Exchange statuses and decide until finished (the thread's body)."""
        while not self.finished.is_set():
            self.step()
            time.sleep(self.options.interval)

    def step(self) -> None:
        """One exchange and the decisions it allows."""
        with self.lock:
            mine = self._status()
        wait_for_all(self.comm)     # asleep, not spinning, until the slowest rank's tick
        everyone = self.comm.allgather(mine)
        if any(st["stop"] for st in everyone):
            self.stopped.set()
        self._close_silent(everyone)
        self._calibrate(everyone)
        self._hand_done(everyone)
        self._progress.update(everyone)
        if everyone[0]["live"]:      # rank 0's clock decides, so every rank takes part
            self._reduce_live(everyone)
        if self.stopped.is_set() and all(st["idle"] for st in everyone):
            self.finished.set()

    # -- status --------------------------------------------------------------------
    def _status(self) -> dict:
        now = time.time()
        scans = {}
        for scan, share in self.ingest.shares.items():
            calibrated = share.counting.calibration is not None or share.failed is not None
            done = share.closed_by is not None and calibrated and not (
                share.pending or share.ready or share.in_flight)
            entry = {"age": now - share.last_message, "closed": share.closed_by is not None,
                     "done": done, "geometry": dataclasses.asdict(share.geometry),
                     "counted": share.n_counted}
            if done:
                entry["done_age"] = now - self._done_at.setdefault(scan, now)
            if not calibrated:
                entry["sample"] = {"lowest": share.complete_frame_numbers(self.options.sample_frames),
                                   "horizon": share.horizon(self.options.senders)}
            scans[scan] = entry
        if self.ingest.pool.n_free:
            self._full_since = None
        elif self._full_since is None:
            self._full_since = now
        live = bool(self.options.live_every) and time.monotonic() - self._live_at >= self.options.live_every
        if live:
            self._live_at = time.monotonic()
        return {"stop": self.stop_requested, "scans": scans, "live": live,
                "full_for": 0.0 if self._full_since is None else now - self._full_since,
                "idle": self.stopped.is_set() and not self.ingest.shares}

    @staticmethod
    def _known(everyone, scan) -> list[dict]:
        return [st["scans"][scan] for st in everyone if scan in st["scans"]]

    def _geometry(self, everyone, scan) -> ScanGeometry:
        return ScanGeometry(**self._known(everyone, scan)[0]["geometry"])

    # -- live view -----------------------------------------------------------------
    def _reduce_live(self, everyone) -> None:
        """Sum the live sums of the newest scan on rank 0 (every rank takes part)."""
        from ..live import reduce_live

        scans = {s for st in everyone for s in st["scans"]}
        if not scans:
            return
        scan = max(scans)
        geometry = self._geometry(everyone, scan)
        images, detectors = reduce_live(self.comm, self.ingest.shares.get(scan), geometry,
                                        self._live_detectors)   # the previous scan's, if any
        self._live_detectors = detectors
        if self.live is not None and images is not None:
            counted = [st["scans"].get(scan, {}).get("counted", 0) for st in everyone]
            self.live.update_scan(scan, geometry, images, detectors or Detectors(),
                                  {"counted_per_rank": counted,
                                   "closed": all(k["closed"] for k in self._known(everyone, scan))})

    # -- liveness ------------------------------------------------------------------
    def _close_silent(self, everyone) -> None:
        for scan in sorted({s for st in everyone for s in st["scans"]}):
            known = self._known(everyone, scan)
            if all(k["closed"] for k in known) or min(k["age"] for k in known) <= self.options.timeout:
                continue
            with self.lock:
                share = self.ingest.shares.get(scan)
                if share is not None and share.closed_by is None:
                    self.ingest.close(share, "timeout")
            if self.log:
                self.log(f"scan {scan}: no message on any rank for {self.options.timeout:g} s, "
                         f"closing it with what arrived")

    # -- calibration ---------------------------------------------------------------
    def _calibrate(self, everyone) -> None:
        stuck = max(st["full_for"] for st in everyone) > self.options.force_after
        waiting = sorted({s for st in everyone for s, e in st["scans"].items() if "sample" in e})
        for scan in waiting:
            known = self._known(everyone, scan)
            samples = [k["sample"] for k in known if "sample" in k]
            n_wanted = self.options.sample_frames
            candidates = sorted({fn for s in samples for fn in s["lowest"]})[:n_wanted]
            settled = len(known) == len(everyone) and len(candidates) == n_wanted and all(
                s["horizon"] >= candidates[-1] for s in samples)
            everywhere_closed = len(known) == len(everyone) and all(k["closed"] for k in known)
            if settled or everywhere_closed or (stuck and candidates):
                self._calibrate_scan(scan, self._geometry(everyone, scan), candidates)

    def _calibrate_scan(self, scan: int, geometry: ScanGeometry, candidates: list[int]) -> None:
        """Collective: every rank calibrates ``scan`` from its share of the sample frames."""
        with self.lock:
            share = self.ingest.share(scan, geometry)
            counting = share.counting
            frames, error = {}, None
            try:
                chosen, weights = counting.plan_samples(np.asarray(candidates, np.int64),
                                                        np.full(len(candidates), COMPLETE_MASK))
                weight_of = dict(zip(chosen.tolist(), weights.tolist()))
                for slot, fn, _, mask in share.ready:
                    if mask == COMPLETE_MASK and fn in weight_of:
                        frames[fn] = (weight_of[fn], self.ingest.pool.frames[slot].copy())
            except CalibrationError as exc:   # no complete frame anywhere (same on all ranks)
                error = f"threshold calibration failed: {exc}"
        if error is None:
            try:
                counting.calibrate(frames)    # collective over counting.comm
            except CalibrationError as exc:
                error = f"threshold calibration failed: {exc}"
        if error is not None:
            with self.lock:
                share.failed = error
            if self.log:
                self.log(f"scan {scan}: {error}")

    # -- write order ---------------------------------------------------------------
    def _hand_done(self, everyone) -> None:
        for scan in sorted({s for st in everyone for s in st["scans"]}):
            known = self._known(everyone, scan)
            if not all(k["done"] for k in known):
                continue
            if len(known) < len(everyone) and min(k["done_age"] for k in known) <= self.options.timeout:
                continue   # a rank has not heard of it yet: give its messages time
            if self.limit_reached:
                return
            geometry = self._geometry(everyone, scan)
            with self.lock:
                share = self.ingest.share(scan, geometry)
                if share.closed_by is None:   # this rank never heard of the scan
                    share.closed_by = "nothing received"
                del self.ingest.shares[scan]
                self.ingest.handed.add(scan)
                self._done_at.pop(scan, None)
                self._progress.finish(scan)
                share.handed_at = time.time()
                self.hand(share)
            self.n_handed += 1
            if self.options.scans and self.n_handed >= self.options.scans:
                self.limit_reached = True
                self.stopped.set()


class _Progress:
    """Rank 0's progress lines: frames counted / expected per open scan, and the rate."""

    def __init__(self, log, every: float = 2.0):
        self.log, self.every, self.last, self.start, self.shown = log, every, 0.0, {}, {}

    def update(self, everyone) -> None:
        now = time.time()
        if self.log is None or now - self.last < self.every:
            return
        counted: dict[int, int] = {}
        expected: dict[int, int] = {}
        for st in everyone:
            for scan, e in st["scans"].items():
                counted[scan] = counted.get(scan, 0) + e["counted"]
                expected[scan] = ScanGeometry(**e["geometry"]).n_frames
        for scan, n in sorted(counted.items()):
            if n == 0 or n == self.shown.get(scan):
                continue
            t0, n0 = self.start.setdefault(scan, (now, n))
            rate = (n - n0) / (now - t0) if now > t0 else 0.0
            self.log(f"scan {scan}: {n:,}/{expected[scan]:,} frames counted"
                     + (f", {rate:,.0f} frames/s" if rate else ""))
            self.shown[scan] = n
        self.last = now

    def finish(self, scan) -> None:
        self.start.pop(scan, None)
        self.shown.pop(scan, None)
