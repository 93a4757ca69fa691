"""Raw 4D Camera sector files: validated index, frame assembly, and writer.

A scan is stored as many files, one stream per sector ("module") and DAQ writer
thread, named ``data_scan{scan:010d}_module{m}_dst{d}_file{f}.data``. A file is a
sequence of ``[16-byte header][one sector payload]`` records and nothing else; the
sector number comes only from the file name.

Reading is done in two steps so that memory stays bounded for scans larger than RAM:

1. :class:`RawScan` reads only the record headers, 16 bytes per 166 kB record, one
   ``pread`` each (a memory map would fault in a page per header), after telling the
   kernel of them all, so that a disk serves them many at a time (not for a file
   already in the page cache, where that took a third of the time here). The ranks of an MPI
   job share this: each reads the headers of every N-th file and all get them all
   (16 bytes a record: a production scan's 1 M records are 17 MB), so the reads of an
   index do not grow with the number of ranks. Every header is validated; bad
   records are kept as :class:`BadRecord` entries (file, byte offset, reason) and
   left out. The valid records are grouped into frames by ``frame_number``.
2. :meth:`RawScan.read` / :meth:`RawScan.batches` read the sectors of the
   requested frames into ``(n, 576, 576)`` arrays with ``preadv``: a version-5
   sector is a band of whole rows, so the kernel copies it from the page cache
   straight into its place in the frame (one copy, no page faults, the GIL
   released), into a buffer the caller may reuse. The requested records that
   follow each other in a file are read with one call (their headers into a
   scratch buffer): a batch of 8 frames written by 2 DAQ threads per sector is
   8 calls, not 32. Missing sectors are zeros and are flagged in the per-frame
   sector mask. Or :meth:`RawScan.sectors` gives where the requested frames'
   sectors lie (open files, byte offsets), for the compiled kernel to read each
   frame itself as it counts it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import detector
from .collective import agree, on_root
from .detector import COMPLETE_MASK, FRAME_SHAPE, N_SECTORS, ScanGeometry

FILENAME_TEMPLATE = "data_scan{scan:010d}_module{module}_dst{dst}_file{file}.data"
_MODULE_RE = re.compile(r"module(\d+)")
#: Buffers one ``preadv`` takes at most (POSIX guarantees 16; Linux 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


class RawFormatError(ValueError):
    """Raw input that cannot be used at all (no files, no module in a file name, ...)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record left out of a scan, with where it is and why."""

    path: str
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path} @ byte {self.offset}: {self.reason}"


@dataclasses.dataclass
class FrameBatch:
    """Assembled frames and what is known about each.

    Attributes
    ----------
    frames : ndarray, (n, 576, 576) uint16
    frame_number : ndarray, (n,) uint32
        Detector frame counter of each frame.
    position : ndarray, (n,) int64
        Scan position index ``y * width + x``.
    mask : ndarray, (n,) uint8
        Sector-presence mask (bit m set when sector m arrived).
    """

    frames: np.ndarray
    frame_number: np.ndarray
    position: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_number)


def raw_filename(scan: int, module: int, dst: int = 0, file: int = 0) -> str:
    """File name the 4D Camera DAQ uses for one sector stream."""
    return FILENAME_TEMPLATE.format(scan=scan, module=module, dst=dst, file=file)


def module_from_filename(path: str | os.PathLike) -> int:
    """Sector number encoded in a raw file name (``...module{m}...``)."""
    name = Path(path).name
    match = _MODULE_RE.search(name)
    if match is None:
        raise RawFormatError(
            f"{path}: no module number in the file name; raw 4D Camera files are named "
            f"like {raw_filename(1, 0)} (the sector comes only from the name)"
        )
    module = int(match.group(1))
    if module >= N_SECTORS:
        raise RawFormatError(f"{path}: module {module} in the file name, the detector has "
                             f"modules 0..{N_SECTORS - 1}")
    return module


def record_headers(scan_number: int, geometry: ScanGeometry, frame_number, position) -> np.ndarray:
    """The record headers (:data:`~fourdstream.detector.HEADER_DTYPE`) of the frames
    ``frame_number`` at the positions ``position`` of scan ``scan_number``."""
    header = np.zeros(len(frame_number), detector.HEADER_DTYPE)
    header["scan_number"], header["frame_number"] = scan_number, frame_number
    header["scan_width"], header["scan_height"] = geometry.width, geometry.height
    header["x"], header["y"] = geometry.xy(position)
    return header


def _record_runs(file_id: np.ndarray, record: np.ndarray) -> list[np.ndarray]:
    """The indices of the present sectors (``file_id >= 0``), in runs of consecutive
    records of one file, ordered by file and record: each run is read with one system
    call (at most ``IOV_MAX`` buffers: payloads and the headers between them)."""
    present = np.flatnonzero(file_id >= 0)
    order = present[np.lexsort((record[present], file_id[present]))]
    f, r = file_id[order], record[order]
    breaks = np.flatnonzero((f[1:] != f[:-1]) | (r[1:] != r[:-1] + 1)) + 1
    longest = (_IOV_MAX + 1) // 2
    return [run[k:k + longest] for run in np.split(order, breaks) for k in range(0, len(run), longest)]


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly plus the ``*.data`` files of named folders, sorted; a file
    whose name gives no module (:func:`module_from_filename`) is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.data"))
            if not found:
                raise RawFormatError(f"{p}: folder holds no *.data raw files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise RawFormatError(f"{p}: no such file or folder")
    if not files:
        raise RawFormatError("no raw files given")
    for f in files:           # before anything is read: every raw file names its sector
        module_from_filename(f)
    return files


def _mode(values: np.ndarray):
    uniq, counts = np.unique(values, return_counts=True)
    return uniq[np.argmax(counts)]


def _in_page_cache(fd: int, offsets) -> bool:
    """Whether the bytes at each of ``offsets`` of ``fd`` are in the page cache: a read of
    one byte that fails rather than wait for the disk (``RWF_NOWAIT``). False where the
    system cannot tell."""
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    probe = bytearray(1)
    try:
        for offset in offsets:
            os.preadv(fd, [probe], offset, os.RWF_NOWAIT)
    except OSError:          # BlockingIOError: not cached; others: flag not supported here
        return False
    return True


def _read_headers(path: Path, n: int, record_size: int) -> np.ndarray:
    """The headers of the first ``n`` records of ``path`` (records of ``record_size`` bytes,
    each starting with its header): one ``pread`` per record (a memory map would fault in
    one page per header). Unless its first and last headers are in the page cache (a file
    just written or read), the kernel is first told of every header it will be asked for
    (``posix_fadvise(WILLNEED)``, which queues the reads and returns), so that a file not
    in the page cache is read with many requests in flight, not one at a time."""
    headers = np.empty(n, detector.HEADER_DTYPE)
    size = detector.HEADER_DTYPE.itemsize
    into = memoryview(headers.view(np.uint8))
    fd = os.open(path, os.O_RDONLY)
    try:
        if n and not _in_page_cache(fd, (0, (n - 1) * record_size)):
            for k in range(n):
                os.posix_fadvise(fd, k * record_size, size, os.POSIX_FADV_WILLNEED)
        for k in range(n):
            if os.preadv(fd, [into[k * size:(k + 1) * size]], k * record_size) != size:
                raise RawFormatError(f"{path}: record {k} ends inside its header; "
                                     f"was the file truncated while it was indexed?")
    finally:
        os.close(fd)
    return headers


def _index_file(path: Path, record_size: int) -> tuple[np.ndarray, int]:
    """The headers of the whole records of ``path``, and the bytes after the last one."""
    size = path.stat().st_size
    return _read_headers(path, size // record_size, record_size), size % record_size


def _share(n_files: int, comm) -> range:
    """The files whose headers this rank of ``comm`` reads: r, r + N, r + 2N, ..."""
    return range(comm.rank, n_files, comm.size)


def _index_files(paths: Iterable[str | os.PathLike], record_size: int, comm=None) -> tuple[list, list]:
    """The files ``paths`` name (:func:`expand_paths`) and :func:`_index_file` of each, in
    their order. With an MPI ``comm`` of several ranks, rank 0 lists the files (one list for
    every rank: a rank that listed a folder at another moment, a file appearing, would take
    another file for the same index), each rank reads its :func:`_share` of them, and every
    rank gets the headers of all (an error reading any is raised on every rank)."""
    if comm is None or comm.size == 1:
        files = expand_paths(paths)
        return files, [_index_file(path, record_size) for path in files]
    files = on_root(comm, lambda: expand_paths(paths))
    mine = agree(comm, lambda: {i: _index_file(files[i], record_size) for i in _share(len(files), comm)})
    indexed = {}
    for part in comm.allgather(mine):
        indexed.update(part)
    return files, [indexed[i] for i in range(len(files))]


class RawScan:
    """Index of one scan's raw sector files.

    Parameters
    ----------
    paths : files and/or folders
        The scan's raw files (folders contribute their ``*.data`` files).
    version : {4, 5}
        Header version, which fixes the sector layout.
    scan_number : int, optional
        Which scan to take when the files hold several; default the most common.
    geometry : ScanGeometry, optional
        Expected scan geometry. By default the most common header scan size is
        used; give it to validate against a known scan or to set
        ``frames_per_position`` / ``flyback``.
    comm : MPI communicator, optional
        Collective over its ranks: rank 0 lists the files, the ranks share the reading
        of their headers (:func:`_index_files`), and all get the same index.

    Attributes
    ----------
    bad_records : list of BadRecord
        Records left out, with file, byte offset and reason.
    duplicates : int
        Sectors received more than once for the same frame (first kept).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, version: int = 5,
                 scan_number: int | None = None, geometry: ScanGeometry | None = None, comm=None):
        self.version = version
        self._rec_dtype = detector.record_dtype(version)
        rec_size = self._rec_dtype.itemsize
        self.files, indexed = _index_files(paths, rec_size, comm)
        self.bad_records: list[BadRecord] = []
        self.duplicates = 0
        modules = [module_from_filename(f) for f in self.files]
        self._fds: dict[int, int] = {}    # file id -> descriptor, opened when first read
        headers, file_ids = [], []
        for i, (path, (file_headers, tail)) in enumerate(zip(self.files, indexed)):
            n = len(file_headers)
            if tail:
                self.bad_records.append(BadRecord(
                    str(path), n * rec_size, f"truncated record: {tail} of {rec_size} bytes (v{version} record)"))
            if n:
                headers.append(file_headers)
                file_ids.append(np.full(n, i, dtype=np.int32))
        if not headers:
            raise RawFormatError(f"no complete records in {len(self.files)} raw file(s)")
        hdr = np.concatenate(headers)
        file_id = np.concatenate(file_ids)
        record = np.concatenate([np.arange(len(h), dtype=np.int64) for h in headers])
        module = np.asarray(modules, dtype=np.int8)[file_id]

        self.scan_number = int(_mode(hdr["scan_number"]) if scan_number is None else scan_number)
        ok = hdr["scan_number"] == self.scan_number
        self._reject(~ok, file_id, record, lambda j: (
            f"scan_number {hdr['scan_number'][j]} in header, this is scan {self.scan_number}"))
        if not ok.any():
            raise RawFormatError(f"no records of scan {self.scan_number} in the raw files")
        if geometry is None:
            sizes = hdr["scan_width"][ok].astype(np.int64) << 16 | hdr["scan_height"][ok]
            size = int(_mode(sizes))
            if size >> 16 == 0 or size & 0xFFFF == 0:
                raise RawFormatError("the raw headers give a scan size of zero; "
                                     "pass the scan geometry explicitly")
            geometry = ScanGeometry(size >> 16, size & 0xFFFF)
        self.geometry = geometry
        bad_size = ok & ((hdr["scan_width"] != geometry.width) | (hdr["scan_height"] != geometry.height))
        self._reject(bad_size, file_id, record, lambda j: (
            f"scan size {hdr['scan_width'][j]}x{hdr['scan_height'][j]} in header, "
            f"the scan is {geometry.width}x{geometry.height}"))
        ok &= ~bad_size
        outside = ok & ((hdr["x"] >= geometry.width) | (hdr["y"] >= geometry.height))
        self._reject(outside, file_id, record, lambda j: (
            f"position x={hdr['x'][j]} y={hdr['y'][j]} outside the "
            f"{geometry.width}x{geometry.height} scan"))
        ok &= ~outside

        self._build_frames(hdr[ok], file_id[ok], record[ok], module[ok])
        self.modules_present = sorted(set(modules))

    def _reject(self, bad: np.ndarray, file_id, record, reason) -> None:
        rec_size = self._rec_dtype.itemsize
        for j in np.flatnonzero(bad):
            self.bad_records.append(BadRecord(
                str(self.files[file_id[j]]), int(record[j]) * rec_size, reason(j)))

    def _build_frames(self, hdr, file_id, record, module) -> None:
        frame_number = hdr["frame_number"].astype(np.int64)
        position = self.geometry.position(hdr["x"], hdr["y"])
        # First occurrence of each (frame, module) wins; later ones are duplicates.
        order = np.lexsort((np.arange(len(hdr)), module, frame_number))
        fn, mod = frame_number[order], module[order]
        first = np.ones(len(order), bool)
        first[1:] = (fn[1:] != fn[:-1]) | (mod[1:] != mod[:-1])
        self.duplicates = int((~first).sum())
        order = order[first]
        fn, mod, pos = frame_number[order], module[order], position[order]
        starts = np.flatnonzero(np.r_[True, fn[1:] != fn[:-1]])
        frame_of_record = np.cumsum(np.r_[False, fn[1:] != fn[:-1]])
        # A frame's position is its first sector's; sectors that disagree are bad records.
        frame_pos = pos[starts]
        disagree = pos != frame_pos[frame_of_record]
        for j in np.flatnonzero(disagree):
            r = order[j]
            x, y = self.geometry.xy(pos[j])
            fx, fy = self.geometry.xy(frame_pos[frame_of_record[j]])
            self.bad_records.append(BadRecord(
                str(self.files[file_id[r]]), int(record[r]) * self._rec_dtype.itemsize,
                f"frame {fn[j]}: position x={x} y={y} disagrees with its other sectors' "
                f"x={fx} y={fy}"))
        keep = ~disagree
        self.frame_number = fn[starts].astype(np.uint32)
        self.position = frame_pos
        n = len(starts)
        self._loc = np.full((n, N_SECTORS, 2), -1, dtype=np.int64)  # (file id, record)
        f, m = frame_of_record[keep], mod[keep]
        self._loc[f, m, 0] = file_id[order[keep]]
        self._loc[f, m, 1] = record[order[keep]]
        self.mask = np.zeros(n, dtype=np.uint8)
        np.bitwise_or.at(self.mask, f, (1 << m).astype(np.uint8))
        # Order frames by position, then frame number (the order of the output file).
        by_pos = np.lexsort((self.frame_number, self.position))
        self.frame_number, self.position = self.frame_number[by_pos], self.position[by_pos]
        self.mask, self._loc = self.mask[by_pos], self._loc[by_pos]
        per_position = int(np.bincount(self.position).max()) if n else 1
        if per_position > self.geometry.frames_per_position:
            self.geometry = dataclasses.replace(self.geometry, frames_per_position=per_position)

    def label_flyback(self, flyback: bool) -> None:
        """Record whether the scan's last column is a flyback column."""
        self.geometry = dataclasses.replace(self.geometry, flyback=flyback and self.geometry.width > 1)

    # -- summary ------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of frames with at least one valid sector."""
        return len(self.frame_number)

    @property
    def n_complete(self) -> int:
        return int((self.mask == COMPLETE_MASK).sum())

    @property
    def n_incomplete(self) -> int:
        return len(self) - self.n_complete

    def summary(self) -> dict:
        """Plain-data summary of what the files hold and what was left out."""
        g = self.geometry
        return {
            "files": len(self.files),
            "scan_number": self.scan_number,
            "scan_width": g.width,
            "scan_height": g.height,
            "frames_found": len(self),
            "frames_complete": self.n_complete,
            "frames_incomplete": self.n_incomplete,
            "positions_without_frames": int(g.n_positions - len(np.unique(self.position))),
            "modules_without_files": [m for m in range(N_SECTORS) if m not in self.modules_present],
            "duplicate_sectors": self.duplicates,
            "bad_records": len(self.bad_records),
        }

    # -- reading ------------------------------------------------------------------
    def read(self, index: np.ndarray | slice, out: np.ndarray | None = None) -> FrameBatch:
        """Assemble the frames ``index`` (into the position-ordered frame table).

        ``out``: an uint16 array of at least ``(len(index), 576, 576)`` to read into
        (the batch's frames are then a view of it); a new one by default.
        Returns a :class:`FrameBatch`; missing sectors are zero-filled.
        """
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        shape = (len(idx),) + FRAME_SHAPE
        if out is None:
            out = np.empty(shape, dtype=detector.PIXEL_DTYPE)
        elif out.dtype != detector.PIXEL_DTYPE or len(out) < len(idx) or out.shape[1:] != FRAME_SHAPE \
                or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint16 array of at least {shape}")
        out = out[:len(idx)]
        # Sector s = 4 i + m of the batch: frame i's sector m. A v5 sector is a band of
        # whole rows, read straight into its place; a v4 one (a column band) into a
        # scratch array first.
        in_place = self.version == 5
        sectors = (out.reshape(len(idx) * N_SECTORS, detector.SECTOR_PIXELS) if in_place
                   else np.empty((len(idx) * N_SECTORS, detector.SECTOR_PIXELS), out.dtype))
        file_id, rec = self._loc[idx, :, 0].ravel(), self._loc[idx, :, 1].ravel()
        sectors[file_id < 0] = 0
        for run in _record_runs(file_id, rec):
            self._read_run(int(file_id[run[0]]), int(rec[run[0]]), [sectors[s] for s in run])
        if not in_place:
            bands = sectors.reshape((len(idx), N_SECTORS) + detector.sector_shape(self.version))
            for m, target in enumerate(detector.split_sectors(out, self.version)):
                target[...] = bands[:, m]
        return FrameBatch(out, self.frame_number[idx], self.position[idx], self.mask[idx])

    def sectors(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the sectors of the frames ``index`` (into the position-ordered frame
        table) are: ``(fds, at)``, both (n, 4) int64, the open file holding frame ``i``'s
        sector ``m`` (-1 where it is missing) and the byte its payload starts at (what
        :meth:`fourdstream.compiled.CompiledCounter.count_sectors` reads, a sector at a
        time, later). The operating system is told of each run of their records in a file
        (``posix_fadvise(WILLNEED)``, which queues its reads and returns), so that a disk
        serves it in large requests, as :meth:`read`'s one call a run does, whatever the
        device's read-ahead: from the disk of the Intel Xeon VM with its read-ahead set
        to 128 kB, ``fourdstream count`` of 8,190 frames read a sector at a time took
        6.25 s without it, 4.97 s with it, and 4.63 s reading batches whole (medians of 6;
        4.2, 4.1 and 4.0 s with its own 8 MB). From the page cache it costs nothing
        measurable."""
        file_id, rec = self._loc[index, :, 0].ravel(), self._loc[index, :, 1].ravel()
        record = self._rec_dtype.itemsize
        fd_of = np.full(len(self.files) + 1, -1, np.int64)       # file id -1 -> -1
        for run in _record_runs(file_id, rec):
            fd = fd_of[file_id[run[0]]] = self._fd(int(file_id[run[0]]))
            first, size = int(rec[run[0]]) * record, len(run) * record
            os.posix_fadvise(fd, first, size, os.POSIX_FADV_WILLNEED)
        shape = (len(file_id) // N_SECTORS, N_SECTORS)
        return fd_of[file_id].reshape(shape), (rec * record + detector.HEADER_DTYPE.itemsize).reshape(shape)

    def _read_run(self, file_id: int, first: int, sectors: list) -> None:
        """Read the payloads of the consecutive records ``first, first + 1, ...`` of file
        ``file_id`` into ``sectors`` (one buffer each) with one ``preadv``; the headers
        between them go to a scratch buffer."""
        header = np.empty(detector.HEADER_DTYPE.itemsize, np.uint8)
        buffers = [header] * (2 * len(sectors) - 1)
        buffers[::2] = sectors
        record = self._rec_dtype.itemsize
        got = os.preadv(self._fd(file_id), buffers, first * record + len(header))
        if got != sum(b.nbytes for b in buffers):
            end = len(header) + got             # where the file ends, from record ``first``
            raise RawFormatError(f"{self.files[file_id]}: record {first + end // record} ends after "
                                 f"{max(end % record - len(header), 0)} of {sectors[0].nbytes} bytes "
                                 f"of its sector; was the file truncated after indexing?")

    def _fd(self, file_id: int) -> int:
        fd = self._fds.get(file_id)
        if fd is None:                         # threads may race here: one descriptor is kept
            opened = os.open(self.files[file_id], os.O_RDONLY)
            fd = self._fds.setdefault(file_id, opened)
            if fd != opened:
                os.close(opened)
        return fd

    def close(self) -> None:
        """Close the files read so far (reading again reopens them)."""
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        self.close()

    def batches(self, batch_size: int = 64, index: np.ndarray | None = None) -> Iterator[FrameBatch]:
        """Yield :class:`FrameBatch` of at most ``batch_size`` frames (bounded memory)."""
        idx = np.arange(len(self)) if index is None else np.asarray(index)
        for start in range(0, len(idx), batch_size):
            yield self.read(idx[start:start + batch_size])


class RawScanWriter:
    """Write one scan as raw sector files, as the DAQ does.

    Frame ``k`` of the scan goes to writer thread ``dst = k % n_dst`` of every
    module; each writer starts a new file every ``frames_per_file`` records.

    Parameters
    ----------
    outdir : path
        Folder to write into (created if needed).
    scan_number : int
    geometry : ScanGeometry
    n_dst : int
        DAQ writer threads per module (files per module run in parallel).
    frames_per_file : int
        Records per file before the writer moves to the next file.
    overwrite : bool
        Replace existing files of the same scan; without it they are an error.
    """

    def __init__(self, outdir, scan_number: int, geometry: ScanGeometry, *, version: int = 5,
                 n_dst: int = 2, frames_per_file: int = 1024, overwrite: bool = False):
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.outdir.glob(f"data_scan{scan_number:010d}_module*.data"))
        if existing and not overwrite:
            raise FileExistsError(f"{self.outdir} already holds {len(existing)} raw files of scan "
                                  f"{scan_number}; choose another folder or allow overwriting")
        for p in existing:
            p.unlink()
        self.scan_number, self.geometry, self.version = scan_number, geometry, version
        self.n_dst, self.frames_per_file = n_dst, frames_per_file
        self._rec_dtype = detector.record_dtype(version)
        self._handles: dict[tuple[int, int, int], object] = {}
        self._written = collections.Counter()  # records per (module, dst)
        self.paths: list[Path] = []

    def write(self, frames: np.ndarray, frame_number: np.ndarray, position: np.ndarray) -> None:
        """Append frames ``(n, 576, 576)`` with their frame numbers and positions."""
        header = record_headers(self.scan_number, self.geometry, frame_number, position)
        sectors = detector.split_sectors(frames, self.version)
        records = np.empty(len(frames), self._rec_dtype)
        records["header"] = header
        dst = np.asarray(frame_number, dtype=np.int64) % self.n_dst
        for m in range(N_SECTORS):
            records["data"] = sectors[m]
            for d in map(int, np.unique(dst)):
                chunk = records[dst == d]
                while len(chunk):
                    room = self.frames_per_file - self._written[m, d] % self.frames_per_file
                    self._handle(m, d).write(chunk[:room].tobytes())
                    self._written[m, d] += len(chunk[:room])
                    chunk = chunk[room:]

    def _handle(self, module: int, dst: int):
        file = self._written[module, dst] // self.frames_per_file
        key = (module, dst, file)
        if key not in self._handles:
            old = (module, dst, file - 1)
            if old in self._handles:
                self._handles.pop(old).close()
            path = self.outdir / raw_filename(self.scan_number, module, dst, file)
            self.paths.append(path)
            self._handles[key] = open(path, "wb")
        return self._handles[key]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
