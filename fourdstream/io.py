"""The counted-scan HDF5 file: its layout, and the reader.

One file per scan. Frames are stored in **slots**: slot ``k`` is frame
``k % F`` of scan position ``k // F``, ``F`` frames per position; a slot with no
frame (lost or never sent) is empty and has sector mask 0. Layout::

    /                                  attrs version = 3 (stempy), fourdstream_version
    /fourdstream/events                (n_events,) uint32   flat pixel indices row*576+col,
                                                            slot after slot (written collectively)
    /fourdstream/offsets               (n_slots + 1,) uint64  slot k: events[offsets[k]:offsets[k+1]]
    /fourdstream/frame_number          (n_slots,) uint32    detector frame counter (0 if empty)
    /fourdstream/position              (n_slots,) uint64    scan position y * width + x
    /fourdstream/sector_mask           (n_slots,) uint8     bit m: sector m arrived
    /fourdstream/images/{counts, bf, adf}  (height, width) uint32  events per position: all, in
                                                            the virtual BF disc, in the ADF ring
    /fourdstream/images/{com_x, com_y} (height, width) float32  centre of mass - pattern centre (px)
    /fourdstream/images/sector_mask    (height, width) uint8  AND of the frames' masks (0: none)
    /fourdstream/images/pattern        (576, 576) int64     summed diffraction pattern
                                       attrs: the detectors (see fourdstream.images)
    /electron_events/frames            (n_slots,) vlen uint32, attrs Nx = Ny = 576
    /electron_events/scan_positions    (n_positions,) int64, attrs Nx = width, Ny = height
    /metadata/electron_counting        attrs: stempy's threshold statistics (+ seed, sample frames)
    /metadata/fourdstream              attrs: geometry, frame accounting, sources, ranks, timings

``/electron_events`` is stempy's version-3 layout, so ``stempy.io.SparseArray.from_hdf5``
opens the file as it is. Parallel HDF5 cannot write variable-length data, so
that view is written after the collective write of ``/fourdstream`` (see
:mod:`fourdstream.writer`).

:class:`CountedScan` reads our files from the flat layout (two contiguous reads,
no per-frame Python objects) and stempy's own files from the vlen view.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .detector import FRAME_COLS, FRAME_ROWS, FRAME_SHAPE

GROUP = "fourdstream"
STEMPY_VERSION = 3
#: Slots converted per step when building or reading the vlen view (bounds memory).
VLEN_CHUNK = 65536
#: Events read back per step when the writer builds the vlen view (64 MB of uint32).
VLEN_EVENTS = 16 * 2**20


def events_as_objects(events: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """1-D object array of per-slot event arrays (views into ``events``)."""
    out = np.empty(len(offsets) - 1, dtype=object)
    pieces = np.split(events, np.asarray(offsets[1:-1], dtype=np.int64) - int(offsets[0]))
    for i, piece in enumerate(pieces):   # `out[:] = pieces` broadcasts equal-length pieces
        out[i] = piece
    return out


@dataclasses.dataclass
class CountedScan:
    """A counted scan read from HDF5 (ours, or stempy's version 1-3 files).

    Attributes
    ----------
    events : (n_events,) uint32
    offsets : (n_slots + 1,) int64
    frame_number, position : (n_slots,)
    sector_mask : (n_slots,) uint8  (ours; stempy files: 0b1111 where a slot has data)
    scan_shape : (height, width) scan positions, flyback column included
    frames_per_position : int
    frame_shape : (576, 576)
    metadata : dict of the file's ``/metadata`` (nested dicts for groups)
    """

    events: np.ndarray
    offsets: np.ndarray
    frame_number: np.ndarray
    position: np.ndarray
    sector_mask: np.ndarray
    scan_shape: tuple
    frames_per_position: int
    frame_shape: tuple = FRAME_SHAPE
    metadata: dict = dataclasses.field(default_factory=dict)
    source: str = "fourdstream"

    @classmethod
    def open(cls, path) -> "CountedScan":
        import h5py

        with h5py.File(path, "r") as f:
            metadata = _read_group(f["metadata"]) if "metadata" in f else {}
            if GROUP in f:
                return cls._from_ours(f, metadata)
            if "electron_events" in f:
                return cls._from_stempy(f, metadata)
        raise ValueError(f"{path}: neither a fourdstream nor a stempy counted file "
                         f"(no /{GROUP} or /electron_events group)")

    @classmethod
    def _from_ours(cls, f, metadata):
        g = f[GROUP]
        fs = metadata.get("fourdstream", {})
        return cls(events=g["events"][()], offsets=g["offsets"][()].astype(np.int64),
                   frame_number=g["frame_number"][()], position=g["position"][()].astype(np.int64),
                   sector_mask=g["sector_mask"][()],
                   scan_shape=(int(fs["scan_height"]), int(fs["scan_width"])),
                   frames_per_position=int(fs["frames_per_position"]), metadata=metadata)

    @classmethod
    def _from_stempy(cls, f, metadata):
        frames = f["electron_events/frames"]
        sp = f["electron_events/scan_positions"]
        width, height = int(sp.attrs["Nx"]), int(sp.attrs["Ny"])
        version = int(f.attrs.get("version", 1))
        n_slots = len(frames)
        if version < 3 and n_slots != width * height:
            raise ValueError(f"stempy version-{version} file with {n_slots} frames for "
                             f"{width}x{height} positions: only one frame per position is "
                             f"supported for version < 3")
        fpp = max(n_slots // (width * height), 1)
        counts = np.zeros(n_slots, np.int64)
        pieces = []
        for start in range(0, n_slots, VLEN_CHUNK):   # bounded number of live objects
            chunk = frames[start:start + VLEN_CHUNK]
            counts[start:start + len(chunk)] = [len(c) for c in chunk]
            pieces.append(np.concatenate(chunk).astype(np.uint32) if len(chunk) else
                          np.zeros(0, np.uint32))
        events = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
        slots = np.arange(n_slots)
        if version < 3:  # older files: scan_positions maps entries to positions
            position = sp[()].astype(np.int64)
        else:
            position = slots // fpp
        return cls(events=events, offsets=np.concatenate([[0], np.cumsum(counts)]),
                   frame_number=np.zeros(n_slots, np.uint32), position=position,
                   sector_mask=np.where(counts > 0, 0b1111, 0).astype(np.uint8),
                   scan_shape=(height, width), frames_per_position=fpp,
                   frame_shape=(int(frames.attrs.get("Ny", FRAME_ROWS)),
                                int(frames.attrs.get("Nx", FRAME_COLS))),
                   metadata=metadata, source=f"stempy v{version}")

    # -- access -------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    def slot(self, position: int, frame: int = 0) -> np.ndarray:
        """Events of frame ``frame`` at scan position ``position``."""
        k = position * self.frames_per_position + frame
        return self.events[self.offsets[k]:self.offsets[k + 1]]

    def counts_image(self) -> np.ndarray:
        """Events per scan position, summed over frames: (height, width) int64.

        The bright-field-like image users look at first.
        """
        per_slot = np.diff(self.offsets)
        per_position = np.bincount(self.position, weights=per_slot,
                                   minlength=self.scan_shape[0] * self.scan_shape[1])
        return per_position.astype(np.int64).reshape(self.scan_shape)

    def loss_summary(self) -> dict:
        """Slots by state: complete, incomplete (some sectors), empty (no frame)."""
        m = self.sector_mask
        return {"slots": self.n_slots, "complete": int((m == 0b1111).sum()),
                "incomplete": int(((m != 0) & (m != 0b1111)).sum()), "empty": int((m == 0).sum())}

    def to_stempy(self):
        """A ``stempy.io.SparseArray`` of the scan (needs stempy installed)."""
        from stempy.io import SparseArray

        data = events_as_objects(self.events, self.offsets)
        data = data.reshape(self.scan_shape[0] * self.scan_shape[1], self.frames_per_position)
        return SparseArray(data=data, scan_shape=tuple(self.scan_shape),
                           frame_shape=tuple(self.frame_shape),
                           metadata=self.metadata.get("electron_counting", {}))


    def to_py4dstem(self, bin: int = 1):
        """A ``py4DSTEM.DataCube`` of the scan: dense counts, diffraction space binned by
        ``bin``; refused with the size and a bin that fits when it would not fit in memory
        (see :mod:`fourdstream.export`)."""
        from .export import to_py4dstem

        return to_py4dstem(self, bin)


def _read_group(group) -> dict:
    import h5py

    out = {k: _plain(v) for k, v in group.attrs.items()}
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            out[name] = _read_group(item)
    return out


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_counted(path: str | Path) -> CountedScan:
    """Open a counted-scan file (fourdstream's or stempy's)."""
    return CountedScan.open(path)
