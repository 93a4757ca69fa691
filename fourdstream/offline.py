"""Counting a scan from raw sector files, on one process or on all ranks of an MPI job.

The ranks index the scan's headers together (each reads every N-th file's, one
page per record, and all get the whole index), each takes the frames of the
positions it owns under the routing rule that streaming uses
(:func:`fourdstream.route.owner`: chunks of positions dealt round-robin), reads
the sample frames it holds for the joint threshold calibration, and counts its
frames in batches with ``threads`` threads, each reading and counting its own
batch (file reads and the kernels release the GIL, so reading is parallel too)
in a buffer of its own that it reuses, so the frames' memory is ``threads``
batches.
The writer then moves the counted events to the rank that writes their slab of
the file.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .calibrate import Calibration
from .detector import FRAME_SHAPE, PIXEL_DTYPE
from .pipeline import ScanCounting
from .rawfile import RawScan
from .route import DEFAULT_CHUNK, owner
from .sparse import CountedFrames

#: Frames a thread reads and counts at once by default: 8 frames (5.3 MB) stay in the
#: CPU cache from the read to the count, and the read of one batch overlaps the count
#: of another's (1 vs 2 threads on a 2-core machine: 1.5x, against 1.15x with 32).
READ_BATCH = 8


@dataclasses.dataclass
class OfflineResult:
    """One rank's share of a counted scan and what is known about the whole scan."""

    counted: CountedFrames        #: this rank's frames, in file order
    calibration: Calibration
    scan: RawScan                 #: the index (summary, bad records, geometry)
    backend: str
    timings: dict                 #: seconds: setup, calibrate, kernel (loading it), count


def count_raw_scan(scan: RawScan, counting: ScanCounting, *, chunk: int = DEFAULT_CHUNK,
                   threads: int = 1, progress=None) -> OfflineResult:
    """Count the indexed raw ``scan``; collective over ``counting.comm`` when it has one.

    ``chunk``: positions per routing chunk (:func:`fourdstream.route.owner`);
    ``threads``: counting threads of this process.
    ``progress(n)`` is called after each batch of ``n`` frames this rank counted.
    """
    t0 = time.perf_counter()
    comm = counting.comm
    size, rank = (comm.size, comm.rank) if comm is not None else (1, 0)
    mine = np.flatnonzero(owner(scan.position, size, chunk) == rank)   # position-ordered
    t1 = time.perf_counter()
    if counting.calibration is None:
        chosen, weights = counting.plan_samples(scan.frame_number, scan.mask)
        held = mine[np.isin(scan.frame_number[mine], chosen)]
        batch = scan.read(held)
        weight_of = dict(zip(chosen.tolist(), weights.tolist()))
        counting.calibrate({int(fn): (weight_of[int(fn)], frame)
                            for fn, frame in zip(batch.frame_number, batch.frames)})
    t2 = time.perf_counter()
    counting.warm_up()            # its own step, not inside the first batch
    t3 = time.perf_counter()
    parts, in_flight = [], collections.deque()

    def collect():
        part = in_flight.popleft().result()
        parts.append(part)
        if progress is not None:
            progress(len(part))

    batch_size = counting.options.batch_size or READ_BATCH
    buffers = threading.local()      # each thread reads into its own batch buffer, reused

    def read_and_count(index):
        if not hasattr(buffers, "frames"):
            buffers.frames = np.empty((batch_size,) + FRAME_SHAPE, PIXEL_DTYPE)
        batch = scan.read(index, out=buffers.frames)
        return counting.count(batch.frames, batch.frame_number, batch.position, batch.mask)

    with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="fourdstream-count") as pool:
        for start in range(0, len(mine), batch_size):
            in_flight.append(pool.submit(read_and_count, mine[start:start + batch_size]))
            if len(in_flight) > threads:
                collect()
        while in_flight:
            collect()
    t4 = time.perf_counter()
    return OfflineResult(CountedFrames.concatenate(parts), counting.calibration, scan, counting.backend,
                         {"setup": t1 - t0, "calibrate": t2 - t1, "kernel": t3 - t2, "count": t4 - t3})
