"""Dark and gain references: loading from files, validation.

A reference is one (576, 576) float32 image in ADU (dark) or relative gain
(values are divided by it). Accepted sources:

* ``.npy``: a (576, 576) image, or a stack (n, 576, 576) averaged over frames;
* ``.h5``/``.hdf5``/``.emd``: the dataset named by ``FILE.h5:/path/to/dataset``, or
  else the only dataset whose last two axes are (576, 576);
* raw 4D Camera sector files (``.data`` files or a folder of them): the mean of
  the complete frames (a dark scan, as stempy's ``calculate_average`` does).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .detector import FRAME_SHAPE

_HDF5_DATASET = re.compile(r"^(.*\.(?:h5|hdf5|emd)):(/?.+)$")


class ReferenceError(ValueError):
    """A dark or gain reference that cannot be used."""


def load_reference(source: str, kind: str = "dark") -> np.ndarray:
    """Load and validate a ``kind`` ("dark" or "gain") reference from ``source``."""
    match = _HDF5_DATASET.match(str(source))
    path, dataset = match.groups() if match else (str(source), "")
    p = Path(path)
    if p.is_dir() or p.suffix == ".data":
        image = _mean_of_raw_frames(p)
    elif not p.exists():
        raise ReferenceError(f"{kind} reference {p}: no such file")
    elif p.suffix == ".npy":
        try:
            image = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise ReferenceError(f"{kind} reference {p}: cannot be read as an image ({exc})") from None
    elif p.suffix in (".h5", ".hdf5", ".emd"):
        image = _read_hdf5_image(p, dataset, kind)
    else:
        raise ReferenceError(f"{kind} reference {p}: unknown format {p.suffix!r}; "
                             f"use .npy, .h5 (FILE.h5:/dataset) or raw .data files")
    return validate_reference(image, kind, str(source))


def validate_reference(image, kind: str = "dark", source: str = "array") -> np.ndarray:
    """Check a reference image and return it as (576, 576) float32.

    A stack (n, 576, 576) is averaged over its frames.
    """
    a = np.asarray(image)
    if a.dtype.kind not in "uif":
        raise ReferenceError(f"{kind} reference {source}: dtype {a.dtype} is not numeric")
    if a.ndim == 3 and a.shape[1:] == FRAME_SHAPE:
        a = a.mean(axis=0)
    if a.shape != FRAME_SHAPE:
        raise ReferenceError(f"{kind} reference {source}: shape {a.shape}, expected {FRAME_SHAPE} "
                             f"(or a stack (n, 576, 576))")
    a = a.astype(np.float32)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ReferenceError(f"{kind} reference {source}: {int(bad.sum())} NaN/inf pixels "
                             f"(first at row/col {tuple(int(i) for i in np.argwhere(bad)[0])})")
    if kind == "gain" and (a <= 0).any():
        raise ReferenceError(f"gain reference {source}: {int((a <= 0).sum())} pixels <= 0; "
                             f"values are divided by the gain, so it must be > 0")
    if kind == "dark" and (a < 0).any():
        raise ReferenceError(f"dark reference {source}: {int((a < 0).sum())} negative pixels")
    return a


def _read_hdf5_image(path: Path, dataset: str, kind: str):
    import h5py

    with h5py.File(path, "r") as f:
        if dataset:
            if dataset not in f:
                raise ReferenceError(f"{kind} reference {path}: no dataset {dataset!r}")
            return f[dataset][()]
        found = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                     and obj.ndim >= 2 and obj.shape[-2:] == FRAME_SHAPE else None)
        if len(found) != 1:
            raise ReferenceError(
                f"{kind} reference {path}: {len(found)} datasets of frame shape "
                f"({', '.join(found) or 'none'}); name one as {path}:/path/to/dataset")
        return f[found[0]][()]


def _mean_of_raw_frames(path: Path) -> np.ndarray:
    from .rawfile import RawScan

    scan = RawScan([path])
    complete = np.flatnonzero(scan.mask == 0b1111)
    if len(complete) == 0:
        raise ReferenceError(f"dark reference {path}: no complete frame in the raw files")
    total = np.zeros(FRAME_SHAPE, np.float64)
    for batch in scan.batches(64, complete):
        total += batch.frames.sum(axis=0, dtype=np.float64)
    return total / len(complete)
