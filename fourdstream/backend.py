"""Choice of counting kernel: compiled on CPU, CuPy on a GPU, or the numpy reference.

``select(choice)`` returns a :class:`Backend`: the array module the frames live in
and the counter class that counts them.

* ``"cpu"``: the compiled kernel (:class:`~fourdstream.compiled.CompiledCounter`, numba);
* ``"numpy"``: the array-module kernel on numpy (:class:`~fourdstream.counting.ElectronCounter`),
  the reference the others are tested against;
* ``"gpu"``: the array-module kernel on CuPy; fails with a clear message when no device is usable;
* ``"auto"``: CuPy when it imports *and* a CUDA device answers, else the compiled kernel.

The array-module kernel is written against the module, so the CPU tests run the
same logic the GPU executes. numba and CuPy are imported only when chosen.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CHOICES = ("auto", "cpu", "numpy", "gpu")


class BackendError(RuntimeError):
    """The requested backend is not usable here."""


@dataclasses.dataclass(frozen=True)
class Backend:
    xp: object          #: array module of the frames (numpy or cupy)
    counter: type       #: ElectronCounter or a subclass
    description: str


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


def select(choice: str = "auto") -> Backend:
    """The :class:`Backend` for ``choice`` in ``CHOICES``."""
    from .counting import ElectronCounter

    if choice not in CHOICES:
        raise BackendError(f"backend must be one of {CHOICES}, got {choice!r}")
    if choice == "numpy":
        return Backend(np, ElectronCounter, "numpy (CPU, array-module kernel)")
    if choice in ("gpu", "auto"):
        cupy, reason = _cupy_or_reason()
        if cupy is not None:
            return Backend(cupy, ElectronCounter, f"cupy (GPU {cupy.cuda.runtime.getDevice()})")
        if choice == "gpu":
            raise BackendError(f"--backend gpu: {reason}; use --backend cpu or auto")
    from .compiled import CompiledCounter
    return Backend(np, CompiledCounter, "compiled (CPU, numba)"
                   + (f"; {reason}" if choice == "auto" else ""))


def to_numpy(a) -> np.ndarray:
    """Host numpy copy of a numpy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)
