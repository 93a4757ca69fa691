"""Writing one counted-scan file collectively from all MPI ranks.

Steps (every rank calls :func:`write_counted_scan` with its own frames):

1. **Ownership.** Rank ``r`` writes the contiguous slab of scan positions given by
   :func:`fourdstream.route.slab_bounds`. Ranks count frames interleaved
   (:func:`fourdstream.route.owner`), so the counted events (not the frames) are
   moved to their slab's rank first with one ``Alltoallv``; on one rank, or when
   every frame already sits with its slab's rank, nothing moves.
2. **Sizes.** Frames per position ``F`` (global max) fixes the slots; per-rank
   event totals are exchanged as 64-bit integers (a 1024x1024 scan at 500
   events/frame holds more than 2**31 events) to find each rank's offsets.
3. **Everything that can fail for lack of room happens before any collective
   I/O**, on rank 0, shared with all ranks: the output does not exist (unless
   ``overwrite``), the folder is writable, and a hidden temporary file next to
   the output is created with all datasets allocated and its blocks reserved
   (``posix_fallocate``). A full disk or a permission problem is then a clean
   error on every rank; a collective write that hits ENOSPC would leave ranks
   out of step, and hang.
4. **Collective write** of ``/fourdstream`` with parallel HDF5 (``driver="mpio"``)
   into the reserved space. A rank with nothing to write still takes part with
   an empty selection (an empty h5py slice would skip the call and hang the
   others).
5. **Serial finish** on rank 0 after the collective close: the stempy view
   (variable-length data, which parallel HDF5 cannot write, written from
   ``(length, pointer)`` pairs into the events, no Python object per frame),
   ``/metadata``, then an atomic rename to the final name. A failed run leaves
   no file under the final name.

Given a :class:`Timeline` (the streaming receiver passes one that starts at the
scan's last frame received), the writer marks its own steps on it and stores
them in ``/metadata/fourdstream/turnaround``.

With an h5py built without MPI, step 4 passes a token from rank to rank, each
writing its slab with the serial driver in turn (reported in the result).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from . import __version__
from .collective import CollectiveError, agree, on_root
from .detector import FRAME_COLS, FRAME_ROWS, ScanGeometry
from .images import scan_images
from .images import write as write_images
from .io import GROUP, STEMPY_VERSION, VLEN_CHUNK, VLEN_EVENTS
from .route import slab_bounds, slab_owner
from .sparse import CountedFrames


class WriteError(CollectiveError, OSError):
    """The counted file could not be written (raised on every rank)."""


class Timeline:
    """Consecutive named steps from ``start`` (Unix time): :meth:`mark` ends a step now.

    The steps tile the time from ``start`` to the last mark, so they add up to it.
    """

    def __init__(self, start: float, marks=()):
        self.start, self.marks = start, list(marks)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.append((name, time.time() if at is None else at))

    def steps(self) -> dict:
        """Seconds of each step, in order (a mark earlier than the one before counts 0)."""
        out, before = {}, self.start
        for name, at in self.marks:
            out[name] = max(at - before, 0.0)
            before = max(at, before)
        return out

    def total(self) -> float:
        return sum(self.steps().values())


@dataclasses.dataclass
class WriteReport:
    """What was written and how long it took (seconds)."""

    path: str
    n_events: int
    n_slots: int
    frames_per_position: int
    bytes_events: int
    parallel: bool
    seconds_redistribute: float
    seconds_collective: float
    seconds_stempy_view: float
    seconds_total: float
    steps: dict = dataclasses.field(default_factory=dict)   #: the timeline's steps, if one was given
    images: tuple = (None, None, None)   #: rank 0: (images, pattern, detectors) of fourdstream.images


def _comm_or_self(comm):
    if comm is not None:
        return comm
    from mpi4py import MPI
    return MPI.COMM_SELF


def _on_root(comm, fn):
    return on_root(comm, fn, WriteError, patient=True)


def _agree(comm, fn):
    return agree(comm, fn, WriteError)


# -- step 1: ownership -----------------------------------------------------------------
def redistribute(counted: CountedFrames, geometry: ScanGeometry, comm) -> CountedFrames:
    """Move frames to the rank writing their position's slab (see module docstring)."""
    owner = slab_owner(counted.position, geometry.n_positions, comm.size) if len(counted) \
        else np.zeros(0, np.int64)
    misplaced = int(np.count_nonzero(owner != comm.rank))
    if comm.allreduce(misplaced) == 0:
        return counted
    order = np.argsort(owner, kind="stable")
    counted = counted.take(order)
    owner = owner[order]
    frames_to = np.bincount(owner, minlength=comm.size).astype(np.int64)
    per_frame = counted.counts()
    events_to = np.bincount(owner, weights=per_frame, minlength=comm.size).astype(np.int64)
    frames_from = np.asarray(comm.alltoall(frames_to.tolist()), np.int64)
    events_from = np.asarray(comm.alltoall(events_to.tolist()), np.int64)
    largest = max(frames_to.sum(), frames_from.sum(), events_to.sum(), events_from.sum())
    if comm.allreduce(int(largest), op=_max_op()) >= 2**31:   # MPI-3 counts are 32-bit
        raise WriteError("a rank would move more than 2**31 events to or from other ranks; "
                         "route frames to their owning rank (by position) before writing")

    def exchange(send, to, frm):
        recv = np.empty(int(frm.sum()), send.dtype)
        comm.Alltoallv([send, (to, _displacements(to))], [recv, (frm, _displacements(frm))])
        return recv

    counts = exchange(per_frame, frames_to, frames_from)
    return CountedFrames(
        exchange(counted.events, events_to, events_from),
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        exchange(counted.frame_number, frames_to, frames_from),
        exchange(counted.position, frames_to, frames_from),
        exchange(counted.mask, frames_to, frames_from))


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


# -- step 2: slots -------------------------------------------------------------------
@dataclasses.dataclass
class _Slab:
    """This rank's contiguous part of the slot arrays."""

    first_slot: int
    counts: np.ndarray        # events per slot
    frame_number: np.ndarray
    position: np.ndarray
    mask: np.ndarray
    events: np.ndarray        # in slot order


def _slab(counted: CountedFrames, geometry: ScanGeometry, fpp: int, comm) -> _Slab:
    lo, hi = slab_bounds(geometry.n_positions, comm.size)[comm.rank:comm.rank + 2]
    counted = counted.sorted()
    n = (hi - lo) * fpp
    first = np.r_[True, counted.position[1:] != counted.position[:-1]] if len(counted) else \
        np.zeros(0, bool)
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(counted)), 0)) if len(counted) \
        else np.zeros(0, np.int64)
    slot = (counted.position - lo) * fpp + (np.arange(len(counted)) - run_start)
    counts = np.zeros(n, np.int64)
    counts[slot] = counted.counts()
    frame_number = np.zeros(n, np.uint32)
    frame_number[slot] = counted.frame_number
    mask = np.zeros(n, np.uint8)
    mask[slot] = counted.mask
    position = np.repeat(np.arange(lo, hi, dtype=np.uint64), fpp)
    return _Slab(int(lo) * fpp, counts, frame_number, position, mask, counted.events)


# -- the writer ----------------------------------------------------------------------
def write_counted_scan(path, counted: CountedFrames, geometry: ScanGeometry, *,
                       electron_counting: dict, provenance: dict, comm=None,
                       overwrite: bool = False, timeline: Timeline | None = None,
                       detectors=None, pattern=None) -> WriteReport:
    """Write one scan's counted frames, collectively over ``comm`` (see module docstring).

    Parameters
    ----------
    path : final file name (``.h5``)
    counted : this rank's frames (any subset of the scan; empty is fine)
    geometry : the scan's geometry
    electron_counting : attributes for ``/metadata/electron_counting`` (same on all ranks)
    provenance : attributes for ``/metadata/fourdstream`` (same on all ranks); nested
        dicts become groups
    comm : mpi4py communicator (default: this process alone)
    timeline : steps so far (see module docstring); the writer adds ``redistribute``,
        ``images``, ``prepare``, ``collective_write``, ``stempy_view``, ``metadata`` and
        ``rename``
    detectors : virtual detectors of the scan's images (:class:`fourdstream.images.Detectors`;
        default: found from the summed pattern)
    pattern : the summed pattern (331776,) int64 of ``counted`` if the caller has kept it as
        it counted (the receiver does), else summed here
    """
    timeline = timeline or Timeline(time.time())
    t0 = time.perf_counter()
    comm = _comm_or_self(comm)
    path = Path(path)
    parallel = _parallel_hdf5()
    counted = redistribute(counted, geometry, comm)
    t_moved = time.perf_counter()
    timeline.mark("redistribute")
    images = scan_images(counted, geometry, slab_bounds(geometry.n_positions, comm.size), comm,
                         detectors, pattern)
    timeline.mark("images")
    per_position = np.bincount(counted.position - slab_bounds(geometry.n_positions, comm.size)[comm.rank]) \
        if len(counted) else np.zeros(0, np.int64)
    fpp = max(comm.allreduce(int(per_position.max()) if len(per_position) else 0,
                             op=_max_op()), geometry.frames_per_position, 1)
    slab = _slab(counted, geometry, fpp, comm)
    n_slots = geometry.n_positions * fpp
    local_events = int(slab.counts.sum())
    event_base = sum(comm.allgather(local_events)[:comm.rank])   # Python ints: 64-bit safe
    n_events = comm.allreduce(local_events)
    tmp = _on_root(comm, lambda: _prepare(path, overwrite, n_events, n_slots))

    t1 = time.perf_counter()
    try:
        _on_root(comm, lambda: _create_file(tmp, n_events, n_slots))
        timeline.mark("prepare")
        if parallel:
            _write_collective(tmp, slab, event_base, comm)
        else:
            _write_by_token(tmp, slab, event_base, comm)
        t2 = time.perf_counter()
        timeline.mark("collective_write")
        steps = _on_root(comm, lambda: _finish(tmp, path, geometry, fpp, electron_counting,
                                               provenance, overwrite, timeline, images))
    except Exception:
        if comm.rank == 0 and tmp.exists():
            tmp.unlink()
        raise
    t3 = time.perf_counter()
    return WriteReport(str(path), n_events, n_slots, fpp, n_events * 4, parallel,
                       t_moved - t0, t2 - t1, t3 - t2, t3 - t0, steps, images)


def _parallel_hdf5() -> bool:
    """Whether h5py was built against parallel (MPI) HDF5."""
    import h5py
    return bool(h5py.get_config().mpi)


def _max_op():
    from mpi4py import MPI
    return MPI.MAX


def _prepare(path: Path, overwrite: bool, n_events: int, n_slots: int) -> Path:
    """Rank 0's checks before any collective I/O; returns the temporary file name."""
    if path.exists() and not overwrite:
        raise WriteError(f"{path} exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise WriteError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise WriteError(f"cannot write to {folder}: permission denied")
    # flat events + vlen copy of the events + per-slot arrays and vlen descriptors
    need = 8 * n_events + 40 * n_slots + (1 << 20)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise WriteError(f"not enough space in {folder}: the file needs about "
                         f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
    return folder / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"


def _create_file(tmp: Path, n_events: int, n_slots: int) -> None:
    """Rank 0: the file with its datasets allocated and its disk blocks reserved."""
    import h5py
    from h5py import h5d, h5p

    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)   # addresses fixed now, contiguous
    dcpl.set_fill_time(h5d.FILL_TIME_NEVER)     # no zero-filling pass
    with h5py.File(tmp, "w") as f:
        g = f.create_group(GROUP)
        for name, (size, dtype) in {"events": (n_events, np.uint32),
                                    "offsets": (n_slots + 1, np.uint64),
                                    "frame_number": (n_slots, np.uint32),
                                    "position": (n_slots, np.uint64),
                                    "sector_mask": (n_slots, np.uint8)}.items():
            g.create_dataset(name, (size,), dtype, dcpl=dcpl)
        size = f.id.get_filesize()
    try:
        with open(tmp, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        raise WriteError(f"cannot reserve {size / 1e6:.1f} MB for the output in {tmp.parent}: "
                         f"{exc.strerror}") from None


def _slab_arrays(slab: _Slab, event_base: int, last: bool) -> dict:
    """(first index, data) for each dataset of this rank's slab."""
    offsets = (event_base + np.concatenate([[0], np.cumsum(slab.counts)])).astype(np.uint64)
    if not last:
        offsets = offsets[:-1]   # the next rank writes the shared boundary value
    s = slab.first_slot
    return {"events": (event_base, slab.events), "offsets": (s, offsets),
            "frame_number": (s, slab.frame_number), "position": (s, slab.position),
            "sector_mask": (s, slab.mask)}


def collective_dxpl():
    """Transfer property list for collective MPI-IO writes."""
    from h5py import h5fd, h5p

    dxpl = h5p.create(h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
    return dxpl


def write_runs(dset, data, starts, counts, dxpl) -> None:
    """Write ``data`` into the runs ``[starts[i], starts[i] + counts[i])`` of a 1-D dataset, in
    one collective call. A rank with nothing to write still takes part, with an empty
    selection (an empty h5py slice would skip the call and hang the other ranks)."""
    from h5py import h5s

    data = np.ascontiguousarray(data, dtype=dset.dtype)
    fspace = dset.id.get_space()
    fspace.select_none()
    for start, count in zip(starts, counts):
        if count:
            fspace.select_hyperslab((int(start),), (int(count),), op=h5s.SELECT_OR)
    mspace = h5s.create_simple((max(len(data), 1),))
    if not len(data):
        mspace.select_none()
        data = np.zeros(1, dset.dtype)
    dset.id.write(mspace, fspace, data, dxpl=dxpl)


def _write_collective(tmp: Path, slab: _Slab, event_base, comm) -> None:
    import h5py

    dxpl = collective_dxpl()
    f = _agree(comm, lambda: h5py.File(tmp, "r+", driver="mpio", comm=comm))
    try:
        arrays = _slab_arrays(slab, event_base, comm.rank == comm.size - 1)
        for name, (start, data) in arrays.items():
            dset = f[GROUP][name]
            if dset.shape[0]:   # a zero-size dataset has no storage (same on every rank)
                _agree(comm, lambda: write_runs(dset, data, [start], [len(data)], dxpl))
    finally:
        _agree(comm, f.close)


def _write_by_token(tmp: Path, slab: _Slab, event_base, comm) -> None:
    """Serial-h5py fallback: ranks write their slabs into the file in turn."""
    import h5py

    def write_mine():
        with h5py.File(tmp, "r+") as f:
            for name, (start, data) in _slab_arrays(slab, event_base,
                                                    comm.rank == comm.size - 1).items():
                if len(data):
                    f[GROUP][name][start:start + len(data)] = data

    for turn in range(comm.size):
        error = None
        if comm.rank == turn:
            try:
                write_mine()
            except Exception as exc:
                error = f"rank {turn}: {type(exc).__name__}: {exc}"
        error = comm.bcast(error, root=turn)
        if error:
            raise WriteError(error)


def _finish(tmp: Path, path: Path, geometry: ScanGeometry, fpp: int, electron_counting: dict,
            provenance: dict, overwrite: bool, timeline: Timeline, images: tuple) -> dict:
    """Rank 0, after the collective close: stempy view, images, metadata, rename; returns
    the steps."""
    import h5py

    with h5py.File(tmp, "r+") as f:
        f.attrs["version"] = STEMPY_VERSION
        f.attrs["fourdstream_version"] = __version__
        g = f[GROUP]
        ee = f.create_group("electron_events")
        sp = ee.create_dataset("scan_positions", data=np.arange(geometry.n_positions, dtype=np.int64))
        sp.attrs["Nx"], sp.attrs["Ny"] = geometry.width, geometry.height
        n_slots = len(g["sector_mask"])
        frames = ee.create_dataset("frames", (n_slots,), dtype=h5py.vlen_dtype(np.uint32))
        frames.attrs["Nx"], frames.attrs["Ny"] = FRAME_ROWS, FRAME_COLS
        offsets = g["offsets"][()].astype(np.int64)
        start = 0
        while start < n_slots:   # at most VLEN_CHUNK slots and VLEN_EVENTS events a step
            stop = min(start + VLEN_CHUNK, n_slots,
                       max(int(np.searchsorted(offsets, offsets[start] + VLEN_EVENTS, "right")) - 1,
                           start + 1))
            off = offsets[start:stop + 1]
            _write_vlen(frames, start, g["events"][off[0]:off[-1]], off - off[0])
            start = stop
        timeline.mark("stempy_view")
        write_images(f, *images)
        meta = f.create_group("metadata")
        _write_attrs(meta.create_group("electron_counting"), electron_counting)
        ours = meta.create_group("fourdstream")
        _write_attrs(ours, dict(provenance, scan_width=geometry.width, scan_height=geometry.height,
                                flyback=geometry.flyback, frames_per_position=fpp))
        timeline.mark("metadata")
        _write_attrs(ours.create_group("turnaround"),
                     dict(timeline.steps(), latency_seconds=timeline.total()))
    if overwrite:
        os.replace(tmp, path)
    else:   # link() refuses an existing name: a file that appeared meanwhile is kept
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise WriteError(f"{path} appeared while the scan was being written; "
                             f"not replaced") from None
        tmp.unlink()
    timeline.mark("rename")
    return timeline.steps()


#: HDF5's in-memory variable-length element (``hvl_t``): length, then a pointer to the data.
_HVL = np.dtype([("len", np.uintp), ("p", np.uintp)])


def _write_vlen(dset, start: int, events: np.ndarray, offsets: np.ndarray) -> None:
    """Write slots ``start ..`` of a vlen uint32 dataset straight from CSR arrays.

    Each element is written as HDF5's ``(length, pointer)`` pair pointing into
    ``events`` (uint32, kept alive by the caller), so no Python object is built
    per frame. ``offsets`` (n + 1,) index ``events``.
    """
    from h5py import h5s, h5t

    events = np.ascontiguousarray(events, np.uint32)
    n = len(offsets) - 1
    pairs = np.empty(n, _HVL)
    pairs["len"] = np.diff(offsets)
    pairs["p"] = events.ctypes.data + events.itemsize * offsets[:-1]
    fspace = dset.id.get_space()
    fspace.select_hyperslab((start,), (n,))
    dset.id.write(h5s.create_simple((n,)), fspace, pairs, mtype=h5t.vlen_create(h5t.NATIVE_UINT32))


def _write_attrs(group, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _write_attrs(group.create_group(key), value)
        elif value is None:
            group.attrs[key] = "none"
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and value:
            group.attrs[key] = ", ".join(value)
        elif isinstance(value, (list, tuple)):
            group.attrs[key] = np.asarray(value) if len(value) else np.zeros(0, np.int64)
        else:
            group.attrs[key] = value
