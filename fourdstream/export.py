"""A counted scan in the analysis tools users already have.

* **py4DSTEM**: :func:`to_py4dstem` gives a ``py4DSTEM.DataCube`` (dense counts,
  diffraction space binned by ``bin``), :func:`write_py4dstem` saves it in
  py4DSTEM's own file format (``py4DSTEM.read`` opens it). The dense cube's size is
  checked against the memory available before anything is allocated.
* **LiberTEM**: :func:`write_libertem` writes the events as they are, CSR, for
  LiberTEM's ``raw_csr`` data set (a TOML descriptor and three raw files), so UDFs
  run on counted data without densifying it.
* **ncempy / EMD readers** need no export: the counted file carries its images as
  Berkeley EMD data sets (:mod:`fourdstream.images`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def dense_shape(scan, bin: int) -> tuple:
    """(Ry, Rx, Qy, Qx) of the dense cube, diffraction space binned by ``bin``."""
    rows, cols = scan.frame_shape
    if bin < 1 or rows % bin or cols % bin:
        raise ValueError(f"bin must divide the frame size {rows}x{cols}; got {bin}")
    return (*scan.scan_shape, rows // bin, cols // bin)


def check_fits(scan, bin: int, itemsize: int = 2, memory: int | None = None) -> tuple:
    """The dense shape, or a ValueError saying the size and the smallest bin that fits in
    half the memory available (``memory``, default: measured)."""
    memory = available_memory() if memory is None else memory
    shape = dense_shape(scan, bin)
    need = int(np.prod(shape)) * itemsize
    if need <= memory // 2:
        return shape
    fits = [b for b in (2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 36, 48, 64, 72, 96, 144, 192, 288, 576)
            if b > bin and int(np.prod(dense_shape(scan, b))) * itemsize <= memory // 2]
    hint = f"bin {fits[0]} would fit" if fits else "no bin fits; crop the scan first"
    raise ValueError(f"the dense cube {'x'.join(map(str, shape))} would take {need / 1e9:.1f} GB; "
                     f"{memory / 1e9:.1f} GB are available (at most half is used): {hint}")


def dense(scan, bin: int = 1, memory: int | None = None) -> np.ndarray:
    """Counts per pixel, (Ry, Rx, Qy, Qx) uint16, frames of a position summed, pixels
    binned ``bin`` x ``bin``; checked to fit before it is allocated."""
    shape = check_fits(scan, bin, memory=memory)
    n_positions, n_pixels = shape[0] * shape[1], shape[2] * shape[3]
    cube = np.zeros((n_positions, n_pixels), np.uint16)
    offsets, cols = scan.offsets.astype(np.int64), scan.frame_shape[1]
    position = scan.position.astype(np.int64)
    step = max(1, (1 << 24) // n_pixels)            # slots per pass: <= 128 MB of int64 counts
    for start in range(0, len(position), step):
        stop = min(start + step, len(position))
        events = scan.events[offsets[start]:offsets[stop]].astype(np.int64)
        slot = np.repeat(np.arange(stop - start), np.diff(offsets[start:stop + 1]))
        pixel = (events // cols // bin) * shape[3] + (events % cols) // bin
        counts = np.bincount(slot * n_pixels + pixel, minlength=(stop - start) * n_pixels)
        np.add.at(cube, position[start:stop], counts.reshape(stop - start, n_pixels).astype(np.uint16))
    return cube.reshape(shape)


def to_py4dstem(scan, bin: int = 1, memory: int | None = None):
    """A ``py4DSTEM.DataCube`` of the scan (needs py4DSTEM; see :func:`dense`)."""
    import py4DSTEM

    cube = py4DSTEM.DataCube(data=dense(scan, bin, memory))
    cube.calibration.set_Q_pixel_units("pixels")
    cube.calibration.set_R_pixel_units("pixels")
    return cube


def write_py4dstem(scan, path, bin: int = 1, overwrite: bool = False) -> Path:
    """Save the scan as a DataCube in py4DSTEM's file format (``py4DSTEM.read`` opens it)."""
    import py4DSTEM

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    py4DSTEM.save(str(path), to_py4dstem(scan, bin), mode="o")
    return path


def write_libertem(scan, path, overwrite: bool = False) -> Path:
    """LiberTEM ``raw_csr`` data set: ``path`` (TOML) and ``path``'s stem + ``.indptr``,
    ``.indices``, ``.values`` (one row per frame slot, values 1 per event; nav shape
    (height, width), or (positions, frames per position) when there are several).
    Open with ``ctx.load("raw_csr", path=path)``."""
    path = Path(path)
    files = {k: path.with_suffix(f".{k}") for k in ("indptr", "indices", "values")}
    existing = [p for p in (path, *files.values()) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(scan.offsets, "<i8").tofile(files["indptr"])
    np.asarray(scan.events, "<u4").tofile(files["indices"])
    np.ones(len(scan.events), "<u1").tofile(files["values"])
    rows, cols = scan.frame_shape
    nav = list(scan.scan_shape) if scan.frames_per_position == 1 else \
        [int(np.prod(scan.scan_shape)), scan.frames_per_position]
    path.write_text(f"""# LiberTEM raw_csr descriptor written by fourdstream: one row per frame slot
[params]
filetype = "raw_csr"
nav_shape = {nav}
sig_shape = [{rows}, {cols}]

[raw_csr]
indptr_file = "{files['indptr'].name}"
indptr_dtype = "<i8"
indices_file = "{files['indices'].name}"
indices_dtype = "<u4"
data_file = "{files['values'].name}"
data_dtype = "<u1"
""")
    return path
