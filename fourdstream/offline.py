"""Counting a scan from raw sector files, on one process or on all ranks of an MPI job.

The ranks index the scan's headers together (each reads every N-th file's, one
page per record, and all get the whole index), each takes the frames of the
positions it owns under the routing rule that streaming uses
(:func:`fourdstream.route.owner`: chunks of positions dealt round-robin), reads
the sample frames it holds for the joint threshold calibration, and counts its
frames in batches with ``threads`` threads, each reading and counting its own
batch (file reads and the kernels release the GIL, so reading is parallel too)
in a buffer of its own that it reuses. The compiled kernel reads the frames
itself, each counted as soon as it is read, while its bytes are in the CPU's
cache (:meth:`~fourdstream.pipeline.ScanCounting.count_sectors`): a thread's
buffer is one frame. The other kernels count batches read whole: a thread's
buffer is one batch.
The writer then moves the counted events to the rank that writes their slab of
the file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .calibrate import Calibration
from .detector import FRAME_BYTES, FRAME_PIXELS, FRAME_SHAPE, PIXEL_DTYPE
from .pipeline import ScanCounting
from .rawfile import RawScan
from .route import DEFAULT_CHUNK, owner
from .sparse import CountedFrames

#: Frames a counting thread reads and counts at once by default where the kernel does
#: not read the frames itself, fewest and most (:func:`read_batch` picks between them by
#: the CPU cache). Larger reads cost fewer
#: system calls and hand-offs of the GIL per frame: 32 frames instead of 8 made the
#: counting step of 8,190 frames 1.3x faster on 2 threads of the Intel Xeon VM (0.59
#: against 0.78 s), where 48 or 64 gained nothing more. On the AMD EPYC VM, whose cache
#: is smaller, 8 were faster (1 vs 2 threads: 1.5x, against 1.15x with 32): the batch
#: must still be in the cache when it is counted.
READ_BATCH = (8, 32)

#: Frames a counting thread takes at once where the kernel reads the frames itself: its
#: buffer is one frame whatever the batch, which sets only the Python work per frame. On
#: 2 threads of the Intel Xeon VM the counting step of 8,190 frames took 0.53 s with 64
#: and 0.56 s with 32 (medians of 6, interleaved), 0.62 s with 16 (one run); 128 and 256
#: gained nothing more (0.51-0.55 s in four runs).
SECTORS_BATCH = 64


def read_batch(cache: tuple[int, int] | None) -> int:
    """Frames a counting thread reads whole and then counts by default (with a kernel that
    does not read the frames itself, :data:`SECTORS_BATCH` otherwise): as many as fit in
    half of one CPU's share of the last-level cache (so a batch read is still in the
    cache when counted), within :data:`READ_BATCH`; the fewest when the cache is unknown.

    ``cache``: ``(bytes, CPUs sharing it)``, as :func:`last_level_cache` gives, or None.
    """
    fewest, most = READ_BATCH
    if cache is None:
        return fewest
    size, sharing = cache
    return min(max(size // max(sharing, 1) // 2 // FRAME_BYTES, fewest), most)


def last_level_cache(root: str = "/sys/devices/system/cpu") -> tuple[int, int] | None:
    """``(bytes, CPUs sharing it)`` of the last-level data cache of the first CPU this
    process may run on, as Linux describes it under ``root``; None where it does not."""
    caches = []
    for index in Path(root, f"cpu{min(os.sched_getaffinity(0))}", "cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            caches.append((int((index / "level").read_text()), int(size.rstrip("KMG")) * scale,
                           _count_cpus((index / "shared_cpu_list").read_text())))
        except (OSError, ValueError):
            continue
    return max(caches)[1:] if caches else None


def _count_cpus(cpu_list: str) -> int:
    """The number of CPUs in a Linux CPU list such as ``0-3,8``."""
    first_last = (part.split("-") for part in cpu_list.strip().split(","))
    return sum(int(bounds[-1]) - int(bounds[0]) + 1 for bounds in first_last)


@dataclasses.dataclass
class OfflineResult:
    """One rank's share of a counted scan and what is known about the whole scan."""

    counted: CountedFrames        #: this rank's frames, in file order
    calibration: Calibration
    scan: RawScan                 #: the index (summary, bad records, geometry)
    backend: str
    timings: dict                 #: seconds: setup, calibrate, kernel (loading it), count
    batch_size: int               #: frames each thread read and counted at once


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
    from_files = counting.reads_sectors
    counting.warm_up(sectors=from_files)            # its own step, not inside the first batch
    t3 = time.perf_counter()
    parts, in_flight = [], collections.deque()

    def collect():
        part = in_flight.popleft().result()
        parts.append(part)
        if progress is not None:
            progress(len(part))

    batch_size = counting.options.batch_size or (SECTORS_BATCH if from_files else read_batch(last_level_cache()))
    buffers = threading.local()      # each thread reads into its own buffer (a frame or a batch), reused

    def read_and_count(index, sectors):
        """Count the frames ``index``: read by the kernel from ``sectors``
        (:meth:`~fourdstream.rawfile.RawScan.sectors`) where it can, else read whole first."""
        if sectors is not None:
            if not hasattr(buffers, "frame"):
                buffers.frame = np.empty((2, FRAME_PIXELS), PIXEL_DTYPE)
            counted = counting.count_sectors(*sectors, scan.version, buffers.frame,
                                             scan.frame_number[index], scan.position[index], scan.mask[index])
            if counted is not None:
                return counted         # else read them as below, which says what was wrong
        if not hasattr(buffers, "frames"):
            buffers.frames = np.empty((batch_size,) + FRAME_SHAPE, PIXEL_DTYPE)
        batch = scan.read(index, out=buffers.frames)
        return counting.count(batch.frames, batch.frame_number, batch.position, batch.mask)

    with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="fourdstream-count") as pool:
        for start in range(0, len(mine), batch_size):
            # A batch's sectors are looked up (and the disk told of them) as it is
            # handed out, a batch before a thread takes it.
            index = mine[start:start + batch_size]
            in_flight.append(pool.submit(read_and_count, index, scan.sectors(index) if from_files else None))
            if len(in_flight) > threads:
                collect()
        while in_flight:
            collect()
    t4 = time.perf_counter()
    return OfflineResult(CountedFrames.concatenate(parts), counting.calibration, scan, counting.backend,
                         {"setup": t1 - t0, "calibrate": t2 - t1, "kernel": t3 - t2, "count": t4 - t3},
                         batch_size)
