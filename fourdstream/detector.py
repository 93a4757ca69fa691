"""The NCEM 4D Camera: frame and sector geometry, the raw record header, scan geometry.

Everything that knows how a frame is cut into sectors or how a scan position is
numbered lives here, so the simulator, the file reader/writer, the wire format and
the HDF5 output agree by construction.

Conventions
-----------
* A frame is ``FRAME_SHAPE`` = (576, 576) uint16, rows first. A flat pixel index is
  ``row * 576 + col``.
* The detector is read out as ``N_SECTORS`` = 4 sectors ("modules"). In header
  version 5 (current firmware) sector ``m`` is the horizontal band of rows
  ``144 m .. 144 m + 143``; in version 4 it is the vertical strip of columns
  ``144 m .. 144 m + 143``.
* A scan is ``height`` rows of ``width`` probe positions, ``width`` counting the
  flyback column when the scan has one. Position index = ``y * width + x``.
* A frame's sector-presence mask has bit ``m`` set when sector ``m`` arrived;
  ``COMPLETE_MASK`` = 0b1111.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FRAME_ROWS = 576
FRAME_COLS = 576
FRAME_SHAPE = (FRAME_ROWS, FRAME_COLS)
FRAME_PIXELS = FRAME_ROWS * FRAME_COLS
N_SECTORS = 4
COMPLETE_MASK = (1 << N_SECTORS) - 1
PIXEL_DTYPE = np.dtype("<u2")

SECTOR_PIXELS = FRAME_PIXELS // N_SECTORS
SECTOR_BYTES = SECTOR_PIXELS * PIXEL_DTYPE.itemsize  # 165,888 bytes
FRAME_BYTES = FRAME_PIXELS * PIXEL_DTYPE.itemsize    # 663,552 bytes

#: 16-byte little-endian record header of raw files (versions 3, 4, 5).
HEADER_DTYPE = np.dtype(
    [
        ("scan_number", "<u4"),
        ("frame_number", "<u4"),
        ("scan_width", "<u2"),
        ("scan_height", "<u2"),
        ("x", "<u2"),
        ("y", "<u2"),
    ]
)
assert HEADER_DTYPE.itemsize == 16

SUPPORTED_VERSIONS = (4, 5)


def sector_shape(version: int = 5) -> tuple[int, int]:
    """Shape (rows, cols) of one sector's payload for a header ``version``."""
    _check_version(version)
    if version == 5:
        return (FRAME_ROWS // N_SECTORS, FRAME_COLS)
    return (FRAME_ROWS, FRAME_COLS // N_SECTORS)


def sector_slice(module: int, version: int = 5) -> tuple[slice, slice]:
    """Index of sector ``module`` inside a (576, 576) frame."""
    _check_version(version)
    if not 0 <= module < N_SECTORS:
        raise ValueError(f"module must be 0..{N_SECTORS - 1}, got {module}")
    rows, cols = sector_shape(version)
    if version == 5:
        return (slice(module * rows, (module + 1) * rows), slice(None))
    return (slice(None), slice(module * cols, (module + 1) * cols))


def split_sectors(frames: np.ndarray, version: int = 5) -> list[np.ndarray]:
    """Split frames (..., 576, 576) into the 4 sector arrays (..., rows, cols).

    Version-5 sectors are views of C-contiguous input (a row band is contiguous);
    version-4 strips are strided views.
    """
    return [frames[(...,) + sector_slice(m, version)] for m in range(N_SECTORS)]


def _check_version(version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"unsupported 4D Camera header version {version}; "
            f"fourdstream reads versions {SUPPORTED_VERSIONS}"
        )


def record_dtype(version: int = 5) -> np.dtype:
    """numpy dtype of one raw record: 16-byte header + one sector payload."""
    return np.dtype([("header", HEADER_DTYPE), ("data", PIXEL_DTYPE, sector_shape(version))])


@dataclasses.dataclass(frozen=True)
class ScanGeometry:
    """Size of a scan as the detector numbers it.

    Parameters
    ----------
    width : int
        Probe positions per row *as recorded*, including the flyback column if any.
    height : int
        Rows of probe positions.
    frames_per_position : int
        Frames recorded at each position (usually 1).
    flyback : bool
        Whether the last column (``x == width - 1``) is the flyback column that
        analysis usually drops. It is kept in the data; this only labels it.
    """

    width: int
    height: int
    frames_per_position: int = 1
    flyback: bool = False

    def __post_init__(self):
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 1 <= value <= 0xFFFF:
                raise ValueError(f"scan {name} must be 1..65535 (uint16 header field), got {value}")
        if self.frames_per_position < 1:
            raise ValueError(f"frames_per_position must be >= 1, got {self.frames_per_position}")
        if self.flyback and self.width < 2:
            raise ValueError("a scan with a flyback column needs width >= 2")

    @classmethod
    def from_probe_grid(cls, columns: int, rows: int, *, flyback: bool = True,
                        frames_per_position: int = 1) -> "ScanGeometry":
        """Geometry of a ``columns`` x ``rows`` probe raster, plus a flyback column if asked."""
        return cls(columns + int(flyback), rows, frames_per_position, flyback)

    @property
    def n_positions(self) -> int:
        """Number of scan positions, ``width * height``."""
        return self.width * self.height

    @property
    def n_frames(self) -> int:
        """Number of frames the scan is expected to hold."""
        return self.n_positions * self.frames_per_position

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) as recorded, flyback column included."""
        return (self.height, self.width)

    def position(self, x, y):
        """Position index ``y * width + x`` (scalars or arrays)."""
        return np.asarray(y, dtype=np.int64) * self.width + np.asarray(x, dtype=np.int64)

    def xy(self, position):
        """Inverse of :meth:`position`: ``(x, y)`` of position indices."""
        y, x = np.divmod(np.asarray(position, dtype=np.int64), self.width)
        return x, y

    def describe(self) -> str:
        extra = " incl. flyback column" if self.flyback else ""
        fpp = f", {self.frames_per_position} frames/position" if self.frames_per_position > 1 else ""
        return f"{self.width}x{self.height} positions{extra}{fpp}"


def parse_scan_size(text: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` (e.g. ``"64x64"``) into ``(width, height)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"scan size must look like WIDTHxHEIGHT, e.g. 64x64; got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"scan size must be positive, got {text!r}")
    return w, h
