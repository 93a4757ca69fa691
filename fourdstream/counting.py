"""Electron counting: the reference (stempy) rule, exactly, at a fraction of its cost.

Per frame and pixel ``j``, with dark reference ``D`` (default zeros), an optional
gain map ``G``, a background threshold ``bg`` and an x-ray threshold ``xr``:

1. ``v = raw - trunc(D[j])`` in integers (stempy's uint16 path casts the dark to
   uint16 before subtracting), or, with a gain, ``v = (raw - D[j]) * (1 / G[j])``
   in float32 (stempy's float path: "gain" divides). Negative ``v`` are clamped to
   0 (stempy wraps them modulo 2**16 and then drops them as x-rays; the events are
   identical whenever ``xr <= 65536 - max(D)``).
2. ``v`` is kept only if ``bg < v < xr`` (both strict, compared in float64 as the
   reference does); otherwise it is 0.
3. An event is a pixel whose thresholded value is strictly greater than that of
   each of its up-to-8 in-frame neighbours (edges and corners can be events;
   plateaus give none).

The output of a batch of ``n`` frames is CSR style: ``events`` (uint32 flat pixel
indices ``row * 576 + col``, ascending within a frame) and ``offsets`` (n + 1,
int64), frame ``i`` owning ``events[offsets[i]:offsets[i + 1]]``.

Speed comes from doing the exact arithmetic only where it can matter: one
integer comparison pass per frame against a per-pixel lower bound finds the
candidate pixels (a few hundred per frame at NCEM doses), and the reference rule
is then applied to the candidates and their neighbours only. The code is written
against an array module ``xp`` (numpy or CuPy), so the GPU path runs the same
logic that the CPU tests check.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .detector import FRAME_COLS, FRAME_PIXELS, FRAME_ROWS, FRAME_SHAPE

NEIGHBOURS = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0))


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Counting thresholds in ADU (after dark subtraction and gain)."""

    background: float
    xray: float

    def __post_init__(self):
        if not np.isfinite(self.background) or not np.isfinite(self.xray):
            raise ValueError(f"thresholds must be finite, got bg={self.background} xr={self.xray}")
        if self.xray <= self.background:
            raise ValueError(f"x-ray threshold ({self.xray}) must exceed the background "
                             f"threshold ({self.background})")


class ElectronCounter:
    """Counts electrons in batches of frames with fixed thresholds.

    Parameters
    ----------
    thresholds : Thresholds, optional
        Needed by :meth:`count`; without them only :meth:`values` works (what
        threshold calibration needs).
    dark : array (576, 576), optional
        Dark reference in ADU (float; default zeros).
    gain : array (576, 576), optional
        Gain map; values are *divided* by it (stempy's convention). Must be finite
        and > 0.
    row_dark : {None, "mean", "median"}
        Optional row-dark correction: each half-row (left/right 288 columns) is
        scaled by ``optimized_mean / S``, S the mean or median of its raw values.
        This path computes whole frames in float32 and is slower.
    optimized_mean : float
        Target level ``mu`` of the row-dark correction (ADU).
    xp : module
        Array module, ``numpy`` or ``cupy``; frames passed in must belong to it.
    chunk : int
        Frames compared at once (bounds the temporary candidate mask).
    """

    def __init__(self, thresholds: Thresholds | None = None, dark=None, gain=None, *,
                 row_dark: str | None = None,
                 optimized_mean: float = 20.0, xp=np, chunk: int = 16):
        if row_dark not in (None, "mean", "median"):
            raise ValueError(f"row_dark must be None, 'mean' or 'median', got {row_dark!r}")
        self.thresholds, self.row_dark, self.optimized_mean = thresholds, row_dark, optimized_mean
        self.xp, self.chunk = xp, chunk
        dark = np.zeros(FRAME_SHAPE, np.float32) if dark is None else np.asarray(dark, np.float32)
        self.has_gain = gain is not None
        if self.has_gain:
            gain_inv = (np.float32(1) / np.asarray(gain, np.float32)).ravel()
            self._dark, self._gain_inv = xp.asarray(dark.ravel()), xp.asarray(gain_inv)
        else:
            gain_inv = None
            self._dark = xp.asarray(np.trunc(dark).astype(np.int32).ravel())
        if thresholds is not None:
            floor = _candidate_floor(dark.ravel(), gain_inv, thresholds.background)
            # A uniform floor (no dark, the NCEM production case) is compared as a
            # scalar: one array fewer to read per frame.
            self._floor = floor[0] if (floor == floor[0]).all() else xp.asarray(floor)

    # -- values -------------------------------------------------------------------
    def values(self, frames):
        """Dark/gain (and row-dark) corrected values of whole frames, clamped at 0.

        frames (n, 576, 576) uint16 -> (n, 576, 576) int32, or float32 with a gain
        or row-dark correction. These are the values thresholds are computed from.
        """
        xp = self.xp
        flat = frames.reshape(len(frames), FRAME_PIXELS)
        if self.row_dark is not None:
            return self._row_dark_values(frames)
        if self.has_gain:
            v = (flat.astype(xp.float32) - self._dark) * self._gain_inv
        else:
            v = flat.astype(xp.int32) - self._dark
        return xp.maximum(v, 0).reshape(frames.shape)

    def row_dark_scale(self, frames):
        """Row-dark factors ``mu / S`` of each half-row: (n, 576, 2) float32."""
        xp = self.xp
        halves = frames.astype(xp.float32).reshape(len(frames), FRAME_ROWS, 2, FRAME_COLS // 2)
        stat = xp.median(halves, axis=3) if self.row_dark == "median" else halves.mean(axis=3)
        return xp.float32(self.optimized_mean) / xp.maximum(stat, 1e-6)

    def _row_dark_values(self, frames):
        xp = self.xp
        n = len(frames)
        halves = frames.astype(xp.float32).reshape(n, FRAME_ROWS, 2, FRAME_COLS // 2)
        dark = self._dark.astype(xp.float32).reshape(1, FRAME_ROWS, 2, FRAME_COLS // 2)
        v = (halves - dark) * self.row_dark_scale(frames)[..., None]
        v = v.reshape(n, FRAME_PIXELS)
        if self.has_gain:
            v = v * self._gain_inv
        return xp.maximum(v, 0).reshape(frames.shape)

    def _thresholded(self, raw_flat, idx):
        """Thresholded values at batch-flat indices ``idx`` of raw frames."""
        xp = self.xp
        pix = idx % FRAME_PIXELS
        if self.has_gain:
            v = (raw_flat[idx].astype(xp.float32) - self._dark[pix]) * self._gain_inv[pix]
            v = v.astype(xp.float64)
        else:
            v = raw_flat[idx].astype(xp.int32) - self._dark[pix]
        keep = (v > self.thresholds.background) & (v < self.thresholds.xray)
        return xp.where(keep, v, 0)

    # -- counting -----------------------------------------------------------------
    def count(self, frames, index=None):
        """Count a batch ``(n, 576, 576)`` uint16, or with ``index`` (n,) the frames
        ``frames[index]`` of a larger stack (copied out here; the compiled kernel counts them
        in place).

        Returns
        -------
        events : (total,) uint32 flat pixel indices, ascending within each frame
        offsets : (n + 1,) int64
        """
        xp = self.xp
        if index is not None:
            frames = frames[frame_index(index, len(frames))]
        n = len(frames)
        if self.thresholds is None:
            raise ValueError("this ElectronCounter has no thresholds; it can only give values()")
        if frames.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"frames must be (n, 576, 576), got {frames.shape}")
        pieces = []
        for start in range(0, n, self.chunk):
            part = frames[start:start + self.chunk]
            if self.row_dark is not None:     # compared in float32, whatever the thresholds' type
                v = self._row_dark_values(part).reshape(-1)
                keep = (v > xp.float32(self.thresholds.background)) & (v < xp.float32(self.thresholds.xray))
                tv = xp.where(keep, v, 0)
                cand = xp.flatnonzero(keep)
                pieces.append(_local_maxima(xp, cand, lambda i: tv[i]) + start * FRAME_PIXELS)
            else:
                raw = part.reshape(len(part), FRAME_PIXELS)
                cand = xp.flatnonzero(raw >= self._floor)
                flat = raw.reshape(-1)
                pieces.append(_local_maxima(xp, cand, lambda i: self._thresholded(flat, i))
                              + start * FRAME_PIXELS)
        hits = xp.concatenate(pieces) if pieces else xp.zeros(0, xp.int64)
        offsets = xp.searchsorted(hits, xp.arange(n + 1, dtype=xp.int64) * FRAME_PIXELS)
        return (hits % FRAME_PIXELS).astype(xp.uint32), offsets.astype(xp.int64)


def frame_index(index, n: int) -> np.ndarray:
    """``index`` (frames of a stack of ``n``) as int64, each in ``range(n)``, else IndexError
    (the compiled kernel reads ``frames[index[i]]`` unchecked)."""
    index = np.asarray(index, np.int64)
    if index.ndim != 1 or (len(index) and not (0 <= index.min() and index.max() < n)):
        raise IndexError(f"a frame index must be 1-D, each in range({n})")
    return index


def _candidate_floor(dark: np.ndarray, gain_inv: np.ndarray | None, bg: float) -> np.ndarray:
    """Per-pixel uint16 raw value below which a pixel cannot pass ``v > bg``."""
    if gain_inv is None:
        # v = raw - trunc(D) > bg  <=>  raw >= trunc(D) + floor(bg) + 1
        floor = np.trunc(dark).astype(np.int64) + np.floor(bg) + 1
    else:
        # v = (float32(raw) - D) * g in float32 never falls as raw rises (for 0 < g < inf),
        # so the least raw value with v > bg is found by bisection, in the kernels' own
        # float32 arithmetic: exact, no slack. Other gains take every raw value (floor 0).
        dark, gain_inv = np.asarray(dark, np.float32), np.asarray(gain_inv, np.float32)
        lo, hi = np.zeros(dark.shape, np.int64), np.full(dark.shape, 0xFFFF, np.int64)
        while (lo < hi).any():
            mid = (lo + hi) // 2
            passes = ((mid.astype(np.float32) - dark) * gain_inv).astype(np.float64) > bg
            lo, hi = np.where(passes, lo, mid + 1), np.where(passes, mid, hi)
        floor = np.where(np.isfinite(gain_inv) & (gain_inv > 0), lo, 0)
    return np.clip(floor, 0, 0xFFFF).astype(np.uint16)


def _local_maxima(xp, cand, thresholded):
    """Candidates whose thresholded value beats all in-frame 8-neighbours.

    ``cand``: ascending batch-flat indices; ``thresholded(idx)``: values at indices.
    Returns the winning indices, ascending.
    """
    value = thresholded(cand)
    alive = value > 0
    cand, value = cand[alive], value[alive]
    pix = cand % FRAME_PIXELS
    row, col = pix // FRAME_COLS, pix % FRAME_COLS
    is_max = xp.ones(len(cand), dtype=bool)
    for dr, dc in NEIGHBOURS:
        inside = xp.ones(len(cand), dtype=bool)
        if dr:
            inside &= (row + dr >= 0) & (row + dr < FRAME_ROWS)
        if dc:
            inside &= (col + dc >= 0) & (col + dc < FRAME_COLS)
        neighbour = xp.where(inside, cand + (dr * FRAME_COLS + dc), cand)
        is_max &= (thresholded(neighbour) < value) | ~inside
    return cand[is_max]
