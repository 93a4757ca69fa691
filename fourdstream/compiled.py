"""The compiled CPU counting kernel (numba): the rule of :mod:`fourdstream.counting`, in one pass.

:class:`CompiledCounter` gives the same events as
:class:`~fourdstream.counting.ElectronCounter` (the array-module kernel, which
stays the reference and the CuPy path), event for event, from the same
set-up: dark truncation, the gain path in float32, strict thresholds,
clamping, the strict 8-neighbour maximum, borders, plateaus, row-dark.

One pass over each frame in blocks of 64 pixels: a block whose raw values are
all below the candidate floor (the least raw value that can pass ``v > bg``)
is skipped after one vectorised comparison; inside the few blocks with a
candidate the exact rule is applied pixel by pixel. At NCEM doses almost every
block is skipped, so the kernel runs near the speed of reading the frame once.
It releases the GIL (``nogil``), so threads count batches in parallel, and it
is compiled once and cached on disk next to this module (``cache=True``; set
``NUMBA_CACHE_DIR`` where that folder is read-only).
"""

from __future__ import annotations

import numba
import numpy as np

from .counting import ElectronCounter
from .detector import FRAME_COLS, FRAME_PIXELS, FRAME_ROWS, FRAME_SHAPE

BLOCK = 64
#: How values are corrected (see ElectronCounter): integer dark, float32 gain, row-dark.
_INTEGER, _GAIN, _ROW_DARK = 0, 1, 2
#: Events per frame the output buffer holds at first (it grows when a batch needs more).
_EVENTS_PER_FRAME = 2048


@numba.njit(nogil=True, cache=True, inline="always")
def _value(raw, j, mode, dark_i, dark_f, gain_inv, has_gain, scale, bg, xr, bg32, xr32):
    """Thresholded value of pixel ``j`` (0 where it fails ``bg < v < xr``), as float64."""
    if mode == _INTEGER:
        v = np.int32(raw[j]) - dark_i[j]
        return np.float64(v) if bg < v < xr else 0.0
    if mode == _GAIN:
        g = (np.float32(raw[j]) - dark_f[j]) * gain_inv[j]
        return np.float64(g) if bg < g < xr else 0.0
    r = j // FRAME_COLS
    h = (j - r * FRAME_COLS) // (FRAME_COLS // 2)
    w = (np.float32(raw[j]) - dark_f[j]) * scale[r, h]
    if has_gain:
        w = w * gain_inv[j]
    w = max(w, np.float32(0))
    return np.float64(w) if bg32 < w < xr32 else 0.0


@numba.njit(nogil=True, cache=True)
def _count(frames, floor, block_floor, block, mode, dark_i, dark_f, gain_inv, has_gain, scales,
           bg, xr, out, offsets):
    """Events of ``frames`` (n, 331776) uint16 into ``out``; offsets (n + 1,) filled.

    ``floor``: per-pixel candidate floor (uint16, 0 for row-dark); ``block_floor``:
    its minimum over each block of ``block`` pixels (a runtime value, so that the
    block test is compiled as a vector loop). Returns the number of events; when
    it exceeds ``len(out)`` the events past the end were not stored (call again
    with a larger ``out``).
    """
    bg32, xr32 = np.float32(bg), np.float32(xr)
    n = frames.shape[0]
    blocks = frames.reshape(n, FRAME_PIXELS // block, block)
    total = 0
    for i in range(n):
        offsets[i] = total
        raw = frames[i]
        scale = scales[i]
        for b in range(FRAME_PIXELS // block):
            top = np.uint16(0)        # skip the block unless a pixel reaches the floor
            pixels = blocks[i, b]
            for k in range(block):
                top = max(top, pixels[k])
            if top < block_floor[b]:
                continue
            for j in range(b * block, (b + 1) * block):
                if raw[j] < floor[j]:
                    continue
                t = _value(raw, j, mode, dark_i, dark_f, gain_inv, has_gain, scale, bg, xr, bg32, xr32)
                if t <= 0:
                    continue
                row = j // FRAME_COLS
                col = j - row * FRAME_COLS
                is_max = True
                for dr in range(-1, 2):
                    rr = row + dr
                    if rr < 0 or rr >= FRAME_ROWS:
                        continue
                    for dc in range(-1, 2):
                        cc = col + dc
                        if (dr == 0 and dc == 0) or cc < 0 or cc >= FRAME_COLS:
                            continue
                        jn = rr * FRAME_COLS + cc   # below its floor a neighbour is 0 < t
                        if raw[jn] >= floor[jn] and _value(raw, jn, mode, dark_i, dark_f, gain_inv,
                                                           has_gain, scale, bg, xr, bg32, xr32) >= t:
                            is_max = False
                            break
                    if not is_max:
                        break
                if is_max:
                    if total < out.shape[0]:
                        out[total] = j
                    total += 1
    offsets[frames.shape[0]] = total
    return total


@numba.njit(nogil=True, cache=True)
def _copy_runs(source, starts, counts, out):
    k = 0
    for i in range(starts.shape[0]):
        c = counts[i]
        out[k:k + c] = source[starts[i]:starts[i] + c]
        k += c


def gather_runs(source: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([source[s:s + c] for s, c in zip(starts, counts)])``, compiled: one copy
    per run, no index arrays (how :meth:`~fourdstream.sparse.CountedFrames.take` moves events)."""
    out = np.empty(int(counts.sum()), source.dtype)
    _copy_runs(source, starts.astype(np.int64), counts.astype(np.int64), out)
    return out


@numba.njit(nogil=True, cache=True)
def _position_sums(events, offsets, slot, cx, cy, radii2, sums, masks, mask_in):
    for i in range(len(slot)):
        p = slot[i]
        masks[p] &= mask_in[i]
        for k in range(offsets[i], offsets[i + 1]):
            y, x = events[k] // FRAME_COLS, events[k] % FRAME_COLS
            d2 = (x - cx) * (x - cx) + (y - cy) * (y - cy)
            sums[0, p] += 1
            sums[1, p] += x
            sums[2, p] += y
            if radii2[0] <= d2 < radii2[1]:
                sums[3, p] += 1
            if radii2[2] <= d2 < radii2[3]:
                sums[4, p] += 1


def position_sums(events, offsets, slot, n_slots: int, centre, radii, mask) -> tuple:
    """Per-slot event sums in one pass over the events (see :mod:`fourdstream.images`).

    ``slot[i]``: the slot (position) of frame ``i``; ``centre`` = (x, y) pixels;
    ``radii`` = (bf inner, bf outer, adf inner, adf outer) pixels. Returns ``sums``
    (5, n_slots) int64 (events, sum of x, sum of y, in BF, in ADF) and the AND of the
    frames' sector masks per slot (0xFF where no frame).
    """
    sums = np.zeros((5, n_slots), np.int64)
    masks = np.full(n_slots, 0xFF, np.uint8)
    _position_sums(events, offsets.astype(np.int64), slot.astype(np.int64), int(centre[0]),
                   int(centre[1]), np.asarray(radii, np.int64) ** 2, sums, masks, mask)
    return sums, masks


def warm_up() -> None:
    """Compile the kernels now, or load them from the disk cache (about 0.3 s, 1-2 s the first
    time after an install), so that no scan pays it: the receiver calls this at start."""
    from .counting import Thresholds

    CompiledCounter(Thresholds(1.0, 2.0)).count(np.zeros((1,) + FRAME_SHAPE, np.uint16))
    gather_runs(np.zeros(1, np.uint32), np.zeros(1, np.int64), np.ones(1, np.int64))
    position_sums(np.zeros(1, np.uint32), np.array([0, 1]), np.zeros(1, np.int64), 1, (0, 0),
                  (0, 1, 1, 2), np.ones(1, np.uint8))


@numba.njit(nogil=True, cache=True)
def _max_pass(frames, block):
    top = np.uint16(0)
    for i in range(frames.shape[0]):
        for k in range(frames.shape[1] // block * block):
            top = max(top, frames[i, k])
    return top


def read_pass(frames) -> int:
    """The largest value of ``frames`` (n, 576, 576) uint16, compiled: one read of every pixel,
    the ceiling the harness measures the kernel against."""
    return int(_max_pass(np.ascontiguousarray(frames).reshape(len(frames), FRAME_PIXELS), BLOCK))


class CompiledCounter(ElectronCounter):
    """:class:`~fourdstream.counting.ElectronCounter` counting with the compiled kernel (numpy
    arrays only). Same parameters; ``chunk`` and ``xp`` do not apply."""

    def __init__(self, thresholds=None, dark=None, gain=None, *, row_dark=None,
                 optimized_mean: float = 20.0, **_):
        super().__init__(thresholds, dark, gain, row_dark=row_dark, optimized_mean=optimized_mean)
        if row_dark is not None:
            self._mode = _ROW_DARK
        else:
            self._mode = _GAIN if self.has_gain else _INTEGER
        self._dark_i = np.zeros(1, np.int32) if self.has_gain else self._dark
        self._dark_f = self._dark.astype(np.float32)
        self._gain = self._gain_inv if self.has_gain else np.zeros(1, np.float32)
        if thresholds is not None:
            # Row-dark scales every half-row by its own factor: no floor, every pixel is evaluated.
            floor = np.broadcast_to(np.uint16(0) if row_dark else self._floor, (FRAME_PIXELS,))
            self._pixel_floor = np.ascontiguousarray(floor, np.uint16)
            self._block_floor = self._pixel_floor.reshape(-1, BLOCK).min(axis=1)

    def count(self, frames):
        """Count a batch ``(n, 576, 576)`` uint16; returns ``(events uint32, offsets int64)``."""
        if self.thresholds is None:
            raise ValueError("this ElectronCounter has no thresholds; it can only give values()")
        if frames.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"frames must be (n, 576, 576), got {frames.shape}")
        n = len(frames)
        flat = np.ascontiguousarray(frames).reshape(n, FRAME_PIXELS)
        scales = (self.row_dark_scale(frames) if self._mode == _ROW_DARK
                  else np.ones((n, 1, 1), np.float32))
        offsets = np.zeros(n + 1, np.int64)
        out = np.empty(max(n, 1) * _EVENTS_PER_FRAME, np.uint32)
        while True:
            total = _count(flat, self._pixel_floor, self._block_floor, BLOCK, self._mode,
                           self._dark_i, self._dark_f, self._gain, self.has_gain, scales,
                           float(self.thresholds.background), float(self.thresholds.xray),
                           out, offsets)
            if total <= len(out):
                return out[:total].copy(), offsets
            out = np.empty(total, np.uint32)
