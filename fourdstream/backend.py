"""Choice of array module for counting: numpy on CPU, CuPy on a GPU.

``select("auto")`` takes CuPy when it imports *and* a CUDA device answers, else
numpy; ``select("gpu")`` fails with a clear message when no device is usable;
``select("cpu")`` is always numpy. The counting kernel is written against the
returned module, so the CPU tests run the same logic the GPU executes.
"""

from __future__ import annotations

import numpy as np

CHOICES = ("auto", "cpu", "gpu")


class BackendError(RuntimeError):
    """The requested array backend is not usable here."""


def _cupy_or_reason():
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (pip install 'fourdstream[gpu]')"
    try:
        if not cupy.cuda.is_available():
            return None, "CuPy found no CUDA device"
        cupy.zeros(1).sum()  # the first real operation is what fails without a driver
    except Exception as exc:  # CUDARuntimeError and friends
        return None, f"CuPy cannot use the GPU: {exc}"
    return cupy, ""


def select(choice: str = "auto"):
    """Return ``(xp, description)`` for ``choice`` in ``CHOICES``."""
    if choice not in CHOICES:
        raise BackendError(f"backend must be one of {CHOICES}, got {choice!r}")
    if choice == "cpu":
        return np, "numpy (CPU)"
    cupy, reason = _cupy_or_reason()
    if cupy is not None:
        return cupy, f"cupy (GPU {cupy.cuda.runtime.getDevice()})"
    if choice == "gpu":
        raise BackendError(f"--backend gpu: {reason}; use --backend cpu or auto")
    return np, f"numpy (CPU; {reason})"


def to_numpy(a) -> np.ndarray:
    """Host numpy copy of a numpy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)
