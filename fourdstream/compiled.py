"""The compiled CPU counting kernel (numba): the rule of :mod:`fourdstream.counting`, in one pass.

:class:`CompiledCounter` gives the same events as
:class:`~fourdstream.counting.ElectronCounter` (the array-module kernel, which
stays the reference and the CuPy path), event for event, from the same
set-up: dark truncation, the gain path in float32, strict thresholds,
clamping, the strict 8-neighbour maximum, borders, plateaus, row-dark.

One pass over each frame in blocks of 64 pixels: a block whose raw values are
all below their candidate floors (the least raw value that can pass ``v > bg``,
per pixel, read from a table of bytes where they fit) is skipped after one
64-lane vector compare (an LLVM intrinsic: numba's own loop over 64 elements
compiles to eight narrow steps). Without a gain or row-dark the values are
integers read through the floor (``raw - floor + floor(bg) + 1``), so the dark
is read only as the floors, and each block that is not skipped is compared whole: its 64
pixels' values against their 8 neighbours' in vector operations
(:func:`_integer_maxima`). Otherwise (the float path) the block's candidates are
the bits of one 64-bit word, and each one's 3x3 window is computed as three rows
of 4 pixels, a vector each, with no branch on the values (on these sparse frames
a mispredicted branch costs more than the arithmetic; :func:`_window_wins`); the
lines of the dark and gain those windows read are asked for one block with
candidates ahead (:func:`_count`). The frame's border pixels go one neighbour at
a time (:func:`_block_events`). With row-dark (a scale for each half-row of each
frame) every pixel is a candidate: a frame's factors are computed first, then its
values and maxima row by row, compared with no branch on the values
(:func:`_row_dark_events`).
While it scans, it asks for the frames' bytes ``AHEAD`` pixels before it reaches
them (a software prefetch: non-temporal on AMD Zen, into the second-level cache
elsewhere, :func:`prefetch_locality`), which keeps a core's reads of memory in
flight through the blocks it stops at.
It counts frames where they lie (a batch, a frame pool), or reads each frame
from the raw files itself (libc's ``pread``, a sector at a time, into a buffer of one
frame) and counts it at once, while its bytes are in the cache
(:meth:`CompiledCounter.count_sectors`: in the harness's count stage on the Intel
Xeon VM, best of 3, the counting step of ``fourdstream count`` on 8,190 frames from
the page cache took 0.48 s on 2 threads and 0.90 s on 1, where reading batches of 32
frames whole and then counting them took 0.69 s and 1.26 s, and the numpy read alone
0.42 s on 2 threads).
It releases the GIL (``nogil``), so threads count batches in parallel, and it
is compiled once and cached on disk next to this module (``cache=True``; set
``NUMBA_CACHE_DIR`` where that folder is read-only).
"""

from __future__ import annotations

import importlib
import sys

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils, config
from numba.cpython.unsafe.numbers import trailing_zeros   # LLVM's cttz
from numba.extending import intrinsic

from .counting import ElectronCounter, frame_index
from .detector import FRAME_COLS, FRAME_PIXELS, FRAME_ROWS, FRAME_SHAPE, N_SECTORS, SECTOR_BYTES, SECTOR_PIXELS


def _load_array_functions_without_blas() -> None:
    """Load numba's array functions (``numba.np.arraymath``, which numba loads with the
    first kernel) with ``scipy.linalg`` hidden from them. On loading they probe for a
    BLAS by importing it: 0.06-0.13 s of a command's start, and a second OpenBLAS.
    The probe only chooses how numba sums inside ``np.convolve`` and ``np.correlate``
    (BLAS or a loop); the kernels here use neither, and numba's ``np.dot`` and
    ``np.linalg`` still import scipy when they are compiled. Nothing is hidden where
    ``scipy.linalg`` or those functions are already loaded."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None     # makes ``import scipy.linalg...`` raise ImportError
    try:
        importlib.import_module("numba.np.arraymath")
    finally:
        del sys.modules["scipy.linalg"]


_load_array_functions_without_blas()

BLOCK = 64
#: How far ahead of the block it compares the kernel asks for the frames' bytes (pixels:
#: 8 KB; 2, 4, 16 and 32 KB measured slower on the AMD VM at 15, 150 and 1,500 e-/frame; on
#: the Intel VM of 2026-11-28, with locality 2, 8 KB was best in 4 of 9 set-ups and doses,
#: 16 KB in 4 (by 0.01-0.06 of a memory pass), 4 KB in 1 (by 0.01), 2 KB in none).
AHEAD = 4096


def prefetch_locality(cpu: str) -> int:
    """The locality of the kernel's prefetch hint (:func:`_prefetch`) for the CPU named
    ``cpu`` (LLVM's name, as numba compiles for it): 0, non-temporal (x86
    ``prefetchnta``), on AMD Zen (``znver*``), 2 (``prefetcht1``: into the second-level
    cache, not the first) elsewhere. Measured against a read of the same frames:

    * AMD EPYC (this project's VM up to 2026-11-28T04:55): the non-temporal hint
      fastest, the read 62-67k frames/s with it against 52-54k without a prefetch,
      locality 3 slower;
    * Intel Xeon (``rocketlake`` to LLVM, 2026-11-28): the non-temporal hint made every
      kernel 2.7x slower than no prefetch at all (0.31-0.35 of a memory pass), locality 2
      the fastest (1 the same, 3 slower with a dark)."""
    return 0 if cpu.startswith("znver") else 2


#: The CPU numba compiles for here (LLVM's name), and its :func:`prefetch_locality`.
TARGET_CPU = config.CPU_NAME or binding.get_host_cpu_name()
PREFETCH_LOCALITY = prefetch_locality(TARGET_CPU)

#: Event pixels of a block :func:`_store_bits` stores without a branch.
_STORED = 3
#: Events per frame the output buffer holds at first (it grows when a batch needs more).
_EVENTS_PER_FRAME = 2048


def _is_pixels(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.uint16 and t.ndim == 1 and t.layout == "C"


def _is_bytes(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.uint8 and t.ndim == 1 and t.layout == "C"


def _is_floats(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 1 and t.layout == "C"


def _block(context, builder, array_type, array, start, lanes=BLOCK):
    """The ``lanes`` elements at ``array[start:]`` (default 64) as one LLVM vector."""
    data = context.make_array(array_type)(context, builder, array).data
    vector = ir.VectorType(context.get_data_type(array_type.dtype), lanes)
    return builder.load(builder.bitcast(builder.gep(data, [start]), vector.as_pointer()),
                        align=array_type.dtype.bitwidth // 8)


def _broadcast(builder, value, lanes=BLOCK):
    """``value`` (an LLVM scalar) in all ``lanes`` lanes of a vector (default 64)."""
    vector = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _is_bound(t) -> bool:
    """A block test's bound: a table (uint16 or uint8 1-D C array) or one uint16 value."""
    return _is_pixels(t) or _is_bytes(t) or t == types.uint16


def _bounds(context, builder, bound_type, bound, start):
    """The 64 uint16 bounds of the block at ``start``: the table's (bytes zero-extended) or
    the one value in every lane."""
    if isinstance(bound_type, types.Array):
        return builder.zext(_block(context, builder, bound_type, bound, start), ir.VectorType(ir.IntType(16), BLOCK))
    return _broadcast(builder, bound)


@intrinsic
def _at_least(typingctx, pixels, start, floor):
    """uint64 whose bit k says ``pixels[start + k] >= floor[start + k]`` (``floor``: uint16
    or uint8 1-D C array) or ``>= floor`` (a uint16 value), k < 64: one vector compare,
    with no reduction (LLVM compiles a loop over 64 elements into 8 narrow steps: its
    vector body is longer than the loop). ``pixels``: uint16 1-D C array; the caller
    keeps ``start + 64`` in range. The float path's test of a block, and the ceiling's
    (:func:`read_pass`)."""
    if not (_is_pixels(pixels) and isinstance(start, types.Integer) and _is_bound(floor)):
        return None

    def codegen(context, builder, signature, args):
        ge = builder.icmp_unsigned(">=", _block(context, builder, signature.args[0], args[0], args[1]),
                                   _bounds(context, builder, signature.args[2], args[2], args[1]))
        return builder.bitcast(ge, ir.IntType(BLOCK))
    return types.uint64(pixels, start, floor), codegen


@intrinsic
def _above(typingctx, pixels, start, below):
    """:func:`_at_least` with ``>``: the integer path's test of a block, against each
    pixel's ``floor - 1``."""
    if not (_is_pixels(pixels) and isinstance(start, types.Integer) and _is_bound(below)):
        return None

    def codegen(context, builder, signature, args):
        gt = builder.icmp_unsigned(">", _block(context, builder, signature.args[0], args[0], args[1]),
                                   _bounds(context, builder, signature.args[2], args[2], args[1]))
        return builder.bitcast(gt, ir.IntType(BLOCK))
    return types.uint64(pixels, start, below), codegen


@intrinsic
def _integer_maxima(typingctx, pixels, start, below, limit, first, last):
    """uint64 whose bit k says pixel ``start + k`` (k < 64) is an event on the integer path:
    its value beats the largest of its 8 neighbours' values, all 64 pixels at once.

    A pixel's value ``raw - floor + offset`` passes where ``raw >= floor`` and
    ``raw - floor < limit`` (``limit = ceil(xr) - offset``, uint16). Values are compared
    as the ranks ``r = raw - below`` saturated at 0, kept where ``r <= limit`` (else 0),
    which order them as the values do when ``offset >= 1`` and ``floor >= 1``.
    ``below``: ``floor - 1``, per pixel (a uint8 array where every floor is <= 256,
    else uint16: half the bytes to read, measured 0.75-0.77 to 0.78-0.79 of the memory
    pass with a dark at 1,500 e-/frame) or, where it is the same for every pixel, that
    value (uint16: no table read). Ranks are computed for the
    64 pixels one to the left and the 64 one to the right, in the block's row and in the
    rows above and below (unaligned loads: the caller keeps ``start - 577`` and
    ``start + 640`` inside the frame); the block's own ranks, and those of the pixels
    above and below it, are lanes of those (one shuffle), so 6 vectors of ranks are
    computed, not 9. ``first``/``last``: the block starts/ends a row (its first/last
    pixel has no left/right neighbours).
    """
    if not (_is_pixels(pixels) and _is_bound(below) and isinstance(start, types.Integer)
            and limit == types.uint16 and first == types.boolean and last == types.boolean):
        return None

    def codegen(context, builder, signature, args):
        raw, begin, lowest, most, is_first, is_last = args
        vector = ir.VectorType(ir.IntType(16), BLOCK)
        zero, bound = ir.Constant(vector, None), _broadcast(builder, most)

        def rank(shift):
            at = builder.add(begin, ir.Constant(begin.type, shift))
            x = _block(context, builder, signature.args[0], raw, at)
            below = _bounds(context, builder, signature.args[2], lowest, at)
            r = builder.select(builder.icmp_unsigned(">", x, below), builder.sub(x, below), zero)
            return builder.select(builder.icmp_unsigned("<=", r, bound), r, zero)

        def top(*ranks):
            best = ranks[0]
            for r in ranks[1:]:
                best = builder.select(builder.icmp_unsigned(">", best, r), best, r)
            return best

        def without_lane(ranks, lane, edge):
            keep = ir.Constant(ir.VectorType(ir.IntType(1), BLOCK), [k != lane for k in range(BLOCK)])
            return builder.select(edge, builder.select(keep, ranks, zero), ranks)

        def centre(lefts, rights):    # the block's own pixels: lanes 1-63 of lefts, lane 62 of rights
            lanes = ir.Constant(ir.VectorType(ir.IntType(32), BLOCK), list(range(1, BLOCK)) + [BLOCK + BLOCK - 2])
            return builder.shuffle_vector(lefts, rights, lanes)

        w = FRAME_COLS
        lefts, rights = top(rank(-w - 1), rank(w - 1)), top(rank(-w + 1), rank(w + 1))   # rows above, below
        own_lefts, own_rights = rank(-1), rank(1)                                         # its own row
        left = without_lane(top(lefts, own_lefts), 0, is_first)
        right = without_lane(top(rights, own_rights), BLOCK - 1, is_last)
        wins = builder.icmp_unsigned(">", centre(own_lefts, own_rights),
                                     top(centre(lefts, rights), left, right))
        return builder.bitcast(wins, ir.IntType(BLOCK))
    return types.uint64(pixels, start, below, limit, first, last), codegen


@intrinsic
def _window_wins(typingctx, pixels, j, window, gain_inv, low, high):
    """True if pixel ``j`` (not in the frame's first or last row or column) is an event on
    the float path: its value beats the largest of its 8 neighbours' values and 0.

    A value is float32 ``(raw - dark) [* gain_inv]`` where ``low < v < high``, else 0;
    ``low``, ``high`` (float32) are the thresholds rounded outward to float32, so that
    the compares say what the reference's float64 compares say (``v > bg <=> v > low``
    for a float32 ``v`` when ``low`` is the largest float32 <= ``bg``). ``window``
    (float32): the dark (331776,) where ``gain_inv`` is None, else each pixel's dark and
    gain_inv side by side (663552,) (``gain_inv`` itself is not read). The 3x3 window is
    read as three rows of 4 pixels, columns ``col - 1`` to ``col + 2`` (the last not
    used), each row one 4-lane vector: 3 loads of each array instead of 9, and no
    branch. It reads ``j - 577`` to ``j + 578``: the caller keeps ``j + 578`` inside
    the frame.
    """
    if not (_is_pixels(pixels) and isinstance(j, types.Integer) and _is_floats(window)
            and (_is_floats(gain_inv) or gain_inv == types.none)
            and low == types.float32 and high == types.float32):
        return None

    def codegen(context, builder, signature, args):
        raw, at, table, _, lowest, highest = args
        i32, f32 = ir.IntType(32), ir.FloatType()
        f4 = ir.VectorType(f32, 4)
        zero = ir.Constant(f4, None)
        low4, high4 = _broadcast(builder, lowest, 4), _broadcast(builder, highest, 4)

        def values(shift):      # the row ``shift`` pixels from j: columns col - 1 .. col + 2
            p = builder.add(at, ir.Constant(at.type, shift - 1))
            x = builder.uitofp(_block(context, builder, signature.args[0], raw, p, 4), f4)
            if _is_floats(signature.args[3]):     # (dark, gain_inv) pairs: one load, two shuffles
                pairs = _block(context, builder, signature.args[2], table, builder.add(p, p), 8)
                dark, gain = (builder.shuffle_vector(pairs, pairs, ir.Constant(ir.VectorType(i32, 4), lanes))
                              for lanes in ([0, 2, 4, 6], [1, 3, 5, 7]))
                w = builder.fmul(builder.fsub(x, dark), gain)
            else:
                w = builder.fsub(x, _block(context, builder, signature.args[2], table, p, 4))
            kept = builder.and_(builder.fcmp_ordered(">", w, low4), builder.fcmp_ordered("<", w, high4))
            return builder.select(kept, w, zero)

        def top(a, b):
            return builder.select(builder.fcmp_ordered(">", a, b), a, b)

        above, own, below = values(-FRAME_COLS), values(0), values(FRAME_COLS)
        centre = ir.Constant(i32, 1)
        columns = top(top(above, below), builder.insert_element(own, ir.Constant(f32, 0.0), centre))
        left, middle, right = (builder.extract_element(columns, ir.Constant(i32, k)) for k in range(3))
        return builder.fcmp_ordered(">", builder.extract_element(own, centre),
                                    top(top(left, middle), right))
    return types.boolean(pixels, j, window, gain_inv, low, high), codegen


@intrinsic
def _prefetch(typingctx, pixels, start):
    """Ask for the cache line holding ``pixels[start]`` (uint16 or float32 1-D C array,
    ``start`` in range) to be read (LLVM's ``prefetch``, locality ``PREFETCH_LOCALITY``). A hint:
    nothing waits for it."""
    if not ((_is_pixels(pixels) or _is_floats(pixels)) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, PREFETCH_LOCALITY),
                                 ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(pixels, start), codegen


@intrinsic
def _pread(typingctx, fd, pixels, byte, n, at):
    """``pread(fd, pixels.data + byte, n, at)``: read ``n`` bytes at byte ``at`` of the open
    file ``fd`` into the uint16 1-D C array ``pixels`` from its byte ``byte`` (the caller
    keeps them in range); returns what ``pread`` does (bytes read, 0 at the end of the
    file, -1 on an error). libc's own function, called by name, so numba caches the
    kernels that call it (it does not cache a call through ctypes)."""
    if not (_is_pixels(pixels) and all(isinstance(t, types.Integer) for t in (fd, byte, n, at))):
        return None

    def codegen(context, builder, signature, args):
        i32, i64, byte_ptr = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        fd, byte, n, at = (context.cast(builder, args[k], signature.args[k], types.int64) for k in (0, 2, 3, 4))
        data = builder.bitcast(context.make_array(signature.args[1])(context, builder, args[1]).data, byte_ptr)
        pread = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i32, byte_ptr, i64, i64]),
                                               "pread")
        return builder.call(pread, [builder.trunc(fd, i32), builder.gep(data, [byte]), n, at])
    return types.int64(fd, pixels, byte, n, at), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _read_sector(fd, at, pixels, start):
    """Read one sector's payload (``SECTOR_BYTES`` at byte ``at`` of ``fd``) into
    ``pixels[start:start + SECTOR_PIXELS]``; False when the file ends first or a read fails."""
    done = 0
    while done < SECTOR_BYTES:        # a read may return less than asked
        got = _pread(fd, pixels, 2 * start + done, SECTOR_BYTES - done, at + done)
        if got <= 0:
            return False
        done += got
    return True


@numba.njit(nogil=True, cache=True, inline="always")
def _read_frame(sectors, i, frames):
    """Assemble frame ``i`` of a sector table into ``frames[0]`` (331776,) uint16; False
    when one of its sectors could not be read whole.

    ``sectors``: ``(fds, at, columns)``: ``fds`` (n, 4) int64, the open file that holds
    each of frame ``i``'s 4 sectors (-1: missing, zero-filled), ``at`` (n, 4) int64, the
    byte where each one's payload starts, and ``columns`` whether a sector is a band of
    144 columns (a version-4 file; read through ``frames[1]``) rather than of 144 rows."""
    fds, at, columns = sectors
    raw, width = frames[0], FRAME_COLS // N_SECTORS
    for m in range(N_SECTORS):
        if not columns:        # a band of rows, read into its place
            if fds[i, m] < 0:
                raw[m * SECTOR_PIXELS:(m + 1) * SECTOR_PIXELS] = 0
            elif not _read_sector(fds[i, m], at[i, m], raw, m * SECTOR_PIXELS):
                return False
            continue
        if fds[i, m] >= 0 and not _read_sector(fds[i, m], at[i, m], frames[1], 0):
            return False
        for r in range(FRAME_ROWS):
            first = r * FRAME_COLS + m * width
            if fds[i, m] < 0:
                raw[first:first + width] = 0
            else:
                raw[first:first + width] = frames[1, r * width:(r + 1) * width]
    return True


@numba.njit(nogil=True, cache=True, inline="always")
def _prefetch_block(raw, following, at):
    """Ask for the block at pixel ``at`` (a multiple of ``BLOCK``) of frame ``raw``, or past its
    end, of the frame ``following`` it in the batch (its two 64-byte lines): what the kernel
    does ``AHEAD`` pixels before each block it compares."""
    if at < FRAME_PIXELS:
        _prefetch(raw, at)
        _prefetch(raw, at + BLOCK // 2)
    else:
        _prefetch(following, at - FRAME_PIXELS)
        _prefetch(following, at - FRAME_PIXELS + BLOCK // 2)


@numba.njit(nogil=True, cache=True, inline="always")
def _store_bits(wins, start, out, total):
    """The pixels ``start + k`` of the set bits k of ``wins`` stored at ``out[total:]``,
    ascending; returns the new total. The lowest ``_STORED`` bits are stored whether set
    or not (counted only if set), with no branch on them: a block that holds events
    holds 1 to 3 (at 1,500 e-/frame here 65, 25 and 8 % of them), and a loop over them
    would mispredict its exit (measured at 1,500 e-/frame: 0.86-0.93 of the memory pass
    without a dark and 0.77-0.78 with one, against 0.76-0.79 and 0.70 with one
    unconditional store; no change at 15 and 150)."""
    for _ in range(_STORED):
        if total < out.shape[0]:
            out[total] = start + trailing_zeros(wins)
        total += wins != 0
        wins &= wins - np.uint64(1)
    while wins:
        if total < out.shape[0]:
            out[total] = start + trailing_zeros(wins)
        total += 1
        wins &= wins - np.uint64(1)
    return total


@numba.njit(nogil=True, cache=True, inline="always")
def _value(raw, j, floor, offset, dark, gain_inv, bg, xr):
    """Thresholded value of pixel ``j``: its corrected value where ``bg < v < xr``, else 0.

    Which correction is compiled in follows the arguments' types (numba drops the
    branches of the arguments that are ``None``), so that each kind of set-up gets a
    kernel of its own with no branch on it in the inner loop:

    * ``dark is None``: the integer path, exact through the candidate floor:
      ``v = raw - trunc(D) = raw - floor + offset`` and ``v > bg <=> raw >= floor``;
    * else float32 ``(raw - dark) [* gain_inv]`` (row-dark: :func:`_row_dark_events`).
    """
    if dark is None:
        x = np.int32(raw[j])
        f = np.int32(floor[j])
        v = x - f + offset
        return np.float64(v) if (x >= f) & (v < xr) else 0.0
    w = np.float32(raw[j]) - dark[j]
    if gain_inv is not None:
        w = w * gain_inv[j]
    return np.float64(w) if (bg < w) & (w < xr) else 0.0


@numba.njit(nogil=True, cache=True)
def _block_events(raw, start, found, floor, offset, dark, gain_inv, bg, xr, out, total):
    """The events among one block's candidates (bit k of ``found``: pixel ``start + k``),
    stored at ``out[total:]``; returns the new total. Each candidate's value is compared
    with the largest of its in-frame 8 neighbours' values, one neighbour at a time, with
    no branch on the values (on sparse frames a mispredicted branch costs more than the
    arithmetic). For what the vector paths leave: the frame's first and last rows, and
    its first and last columns on the float path. A function of its own, not inlined:
    a call there keeps the loop over the other blocks small (inlined, it made the
    integer path 15 % slower at 1,500 e-/frame)."""
    while found:
        j = start + trailing_zeros(found)
        found &= found - np.uint64(1)
        row = j // FRAME_COLS
        col = j - row * FRAME_COLS
        inside = 0 < row < FRAME_ROWS - 1 and 0 < col < FRAME_COLS - 1
        t = _value(raw, j, floor, offset, dark, gain_inv, bg, xr)
        top_neighbour = 0.0
        if inside:
            for d in (-FRAME_COLS - 1, -FRAME_COLS, -FRAME_COLS + 1, -1, 1,
                      FRAME_COLS - 1, FRAME_COLS, FRAME_COLS + 1):
                top_neighbour = max(top_neighbour, _value(raw, j + d, floor, offset, dark,
                                                          gain_inv, bg, xr))
        else:                 # a border pixel: neighbours outside the frame count as 0
            for rr in range(max(row - 1, 0), min(row + 2, FRAME_ROWS)):
                for cc in range(max(col - 1, 0), min(col + 2, FRAME_COLS)):
                    if rr != row or cc != col:
                        top_neighbour = max(top_neighbour, _value(
                            raw, rr * FRAME_COLS + cc, floor, offset, dark, gain_inv, bg, xr))
        if total < out.shape[0]:    # stored, and counted only if it is an event: no branch
            out[total] = j
        total += top_neighbour < t
    return total


@numba.njit(nogil=True, cache=True, inline="always")
def _window_events(raw, start, found, window, gain_inv, low, high, out, total):
    """:func:`_block_events` for candidates away from the frame's borders, on the float path
    without row-dark: each one's 3x3 window in vectors (:func:`_window_wins`)."""
    while found:
        j = start + trailing_zeros(found)
        found &= found - np.uint64(1)
        if total < out.shape[0]:    # stored, and counted only if it is an event: no branch
            out[total] = j
        total += _window_wins(raw, j, window, gain_inv, low, high)
    return total


@numba.njit(nogil=True, cache=True, inline="always")
def _prefetch_windows(window, gain_inv, start, found):
    """Ask for the lines of ``window`` (:func:`_window_wins`) that the 3x3 windows of the
    block's first two candidates (bits of ``found``) will read, with no branch on how
    many there are (with none, a line past the block is asked for). Prefetching every
    candidate's lines, in a loop, was slower at 1,500 e-/frame (0.57 of the memory pass
    against 0.61); the first two measured as good as the first three."""
    pair = 1 if gain_inv is None else 2      # floats of ``window`` a pixel
    for _ in range(2):
        j = start + trailing_zeros(found)
        found &= found - np.uint64(1)
        _prefetch(window, pair * (j - FRAME_COLS - 1))
        _prefetch(window, pair * (j - 1))
        _prefetch(window, pair * (j + FRAME_COLS - 1))


@intrinsic
def _ones(typingctx, bits):
    """The number of set bits of a uint64 (LLVM's ``ctpop``)."""
    if bits != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        return builder.call(ctpop, args)
    return types.uint64(bits), codegen


#: Pixels of a half-row, the unit of the row-dark correction, and how many of them its
#: last 64-pixel block (from pixel 224) shares with the one before (from 192).
_HALF_ROW = FRAME_COLS // 2
_OVERLAP = 4 * BLOCK - (_HALF_ROW - BLOCK)


@numba.njit(nogil=True, cache=True, inline="always")
def _leaf_sum(raw, start, n):
    """numpy's float32 sum of ``raw[start:start + n]`` (8 <= n <= 128, a multiple of 8): the
    leaf of its pairwise summation, eight accumulators combined as a tree."""
    x = raw[start:start + n]
    r = x[:8].astype(np.float32)
    for i in range(8, n, 8):
        for lane in range(8):
            r[lane] += np.float32(x[i + lane])
    return ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))


@numba.njit(nogil=True, cache=True, inline="always")
def _half_row_mean(raw, start):
    """The mean of the 288 pixels ``raw[start:]`` as the reference's float32 ``mean`` gives it.
    Their sum is summed exactly in integers; below 2**24 every partial sum of numpy's is
    exact in float32 too, so that is numpy's sum. Above (a half-row averaging more than
    58,254 ADU) numpy's pairwise float32 sum is followed: 288 = 2 x 2 x 72, leaves of
    eight accumulators. The float64 quotient rounded to float32 is the correctly rounded
    float32 quotient, as numpy's."""
    x = raw[start:start + _HALF_ROW]
    total = np.int32(0)
    for c in range(_HALF_ROW):
        total += np.int32(x[c])
    if total < (1 << 24):
        return np.float32(np.float64(total) / _HALF_ROW)
    q = _HALF_ROW // 4
    pairwise = ((_leaf_sum(raw, start, q) + _leaf_sum(raw, start + q, q))
                + (_leaf_sum(raw, start + 2 * q, q) + _leaf_sum(raw, start + 3 * q, q)))
    return np.float32(np.float64(pairwise) / _HALF_ROW)


@numba.njit(nogil=True, cache=True, inline="always")
def _order_statistic(raw, start, k):
    """The ``k``-th smallest (from 0) of the 288 pixels ``raw[start:]``: the largest value v
    with at most k pixels below it, by bisection over the uint16 range, each step counting
    the pixels below v with five 64-lane compares (the last block overlaps the fourth by
    32 pixels, which are not counted twice)."""
    lo, hi = 0, 0xFFFF
    while lo < hi:
        v = np.uint16((lo + hi + 1) >> 1)
        at_least = (_ones(_at_least(raw, start, v)) + _ones(_at_least(raw, start + BLOCK, v))
                    + _ones(_at_least(raw, start + 2 * BLOCK, v)) + _ones(_at_least(raw, start + 3 * BLOCK, v))
                    + _ones(_at_least(raw, start + _HALF_ROW - BLOCK, v) >> np.uint64(_OVERLAP)))
        if _HALF_ROW - np.int64(at_least) <= k:
            lo = np.int64(v)
        else:
            hi = np.int64(v) - 1
    return lo


@numba.njit(nogil=True, cache=True)
def _row_dark_scale(raw, median, mu, scale):
    """The row-dark factors of frame ``raw`` (331776,) into ``scale`` (576, 2) float32, as the
    reference's :meth:`~fourdstream.counting.ElectronCounter.row_dark_scale` gives them, bit
    for bit: ``mu / max(S, 1e-6)`` in float32, S each half-row's mean, or with ``median``
    its median (the mean of its 144th and 145th smallest, exact in float32)."""
    for r in range(FRAME_ROWS):
        for h in range(2):
            start = r * FRAME_COLS + h * _HALF_ROW
            if median:
                stat = np.float32((_order_statistic(raw, start, _HALF_ROW // 2 - 1)
                                   + _order_statistic(raw, start, _HALF_ROW // 2)) / 2)
            else:
                stat = _half_row_mean(raw, start)
            scale[r, h] = mu / max(stat, np.float32(1e-6))


@numba.njit(nogil=True, cache=True, inline="always")
def _row_dark_values(raw, dark, gain_inv, scale, r, low, high, values):
    """Row ``r``'s values with row-dark into ``values[1:577]``: float32 ``max((raw - dark) *
    scale [* gain_inv], 0)``, kept where ``low < v < high`` (compared in float32, as the
    reference), else 0."""
    zero = np.float32(0)
    for h in range(2):
        s = scale[r, h]
        at = r * FRAME_COLS + h * _HALF_ROW
        x, d = raw[at:at + _HALF_ROW], dark[at:at + _HALF_ROW]
        g = gain_inv[at:at + _HALF_ROW] if gain_inv is not None else None
        v = values[1 + h * _HALF_ROW:1 + (h + 1) * _HALF_ROW]
        for c in range(_HALF_ROW):
            w = (np.float32(x[c]) - d[c]) * s
            if g is not None:
                w = w * g[c]
            w = max(w, zero)
            v[c] = w if (low < w) & (w < high) else zero


@numba.njit(nogil=True, cache=True)
def _row_dark_events(raw, dark, gain_inv, median, mu, bg, xr, scale, rows, winners, out, total):
    """The events of frame ``raw`` (331776,) with row-dark, stored at ``out[total:]``; returns
    the new total. With row-dark every pixel is a candidate, so the frame is done whole:
    its half-rows' factors (:func:`_row_dark_scale`, into ``scale`` (576, 2)), then row
    by row, with no branch on the values, each value against the largest of its 8
    neighbours, three rows of values held in ``rows`` (3, 578) float32 (their ends 0: a
    neighbour outside the frame, which no value > 0 can lose to), the row's events
    marked in ``winners`` (576,) bool and stored where the row has any. 2,200-3,700
    frames/s on one core of the Intel VM of 2026-11-28 (mean or median, with or without
    a gain, 15 to 1,500 e-/frame), where the numpy factors and a whole-frame values
    buffer ran at 200 (median) to 800 (mean), one pixel at a time at 35, and numpy's
    whole-frame reference at 100-120."""
    low, high = np.float32(bg), np.float32(xr)
    _row_dark_scale(raw, median, mu, scale)
    rows[:] = 0
    _row_dark_values(raw, dark, gain_inv, scale, 0, low, high, rows[1])
    for r in range(FRAME_ROWS):
        above, own, below = rows[r % 3], rows[(r + 1) % 3], rows[(r + 2) % 3]
        if r + 1 < FRAME_ROWS:
            _row_dark_values(raw, dark, gain_inv, scale, r + 1, low, high, below)
        else:
            below[:] = 0
        found = 0
        for c in range(FRAME_COLS):
            top = max(max(max(above[c], above[c + 1]), max(above[c + 2], own[c])),
                      max(max(own[c + 2], below[c]), max(below[c + 1], below[c + 2])))
            winners[c] = own[c + 1] > top
            found += winners[c]
        if found:
            for c in range(FRAME_COLS):
                if winners[c]:
                    if total < out.shape[0]:
                        out[total] = r * FRAME_COLS + c
                    total += 1
    return total


@numba.njit(nogil=True, cache=True)
def _count(frames, index, sectors, floor, below, offset, limit, dark, gain_inv, window, row_dark_median, mu, bg,
           xr, low, high, out, offsets):
    """Events of the frames ``frames[index]`` into ``out``; ``offsets`` (n + 1,) filled.

    ``frames``: (m, 331776) uint16 (a batch, or a pool of frame buffers: nothing is
    copied); ``index``: (n,) int64, each in ``range(m)`` (not checked here).
    ``sectors``: None, or a table of the n frames' sectors in raw files
    (:func:`_read_frame`): each frame is then read into ``frames[0]`` (``frames`` (2,
    331776)) and counted while its bytes are in the cache, and ``index`` is not read;
    when one of frame ``i``'s sectors cannot be read whole it returns ``-1 - i``.

    ``floor``: the per-pixel candidate floor (331776,), uint8 where every floor is <= 255,
    else uint16; ``below``: ``floor - 1`` as the integer path reads it
    (:func:`_integer_maxima`; a uint16 value on the float path, not read);
    ``offset``: ``floor(bg) + 1``; ``limit``: ``ceil(xr) - offset`` as uint16 (the
    integer path's); ``dark``, ``gain_inv``: float32 (331776,) or None; ``window``: what
    :func:`_window_wins` reads (the dark, or (dark, gain_inv) pairs with a gain);
    ``row_dark_median``: None without row-dark, else whether its half-row statistic is the
    median (else the mean), and ``mu`` (float32) its optimized mean; ``bg``, ``xr``: the thresholds
    (float64), ``low``, ``high``: the same rounded outward to float32. Returns the
    number of events; when it exceeds ``len(out)`` the events past the end were not
    stored (call again with a larger ``out``).

    The bytes of the block ``AHEAD`` pixels on in the batch (in the next frame, near a
    frame's end) are asked for first (:func:`_prefetch_block`). Each block's pixels are
    then compared with their own floors in one vector compare, which skips the blocks
    that hold no candidate (against the least floor of the block, as before 2026-11-28,
    a dark made 2-5x more blocks pass than hold a candidate, and each cost a mispredicted
    branch and a table read: with a dark, 0.82 / 0.81 / 0.73 of the memory pass at 15 /
    150 / 1,500 e-/frame, against 0.93 / 0.91 / 0.78 now). On the integer path
    (``dark is None``) the compare is against ``below`` and a block with a candidate is
    compared whole (:func:`_integer_maxima`), away from the frame's first and last rows,
    where its candidates go to :func:`_block_events`. On the float path the candidates
    are the bits of one 64-bit word, compared by :func:`_window_events` one block with
    candidates later, their window lines asked for in between (at 1,500 e-/frame with
    dark and gain, 0.61-0.64 of the memory pass against 0.59-0.62 when compared at once;
    an inlined function returning the pending candidates with the total, the same logic
    ran at 0.45), or by :func:`_block_events` at the frame's borders. With row-dark
    every pixel is a candidate: each frame goes to :func:`_row_dark_events` whole.
    """
    n = index.shape[0] if sectors is None else sectors[0].shape[0]
    total = 0
    if row_dark_median is not None:     # the row-dark path's buffers
        scale = np.empty((FRAME_ROWS, 2), np.float32)
        rows = np.empty((3, FRAME_COLS + 2), np.float32)
        winners = np.empty(FRAME_COLS, np.bool_)
    for i in range(n):
        offsets[i] = total
        if sectors is None:
            raw = frames[index[i]]
            following = frames[index[i + 1]] if i + 1 < n else raw
        else:
            if not _read_frame(sectors, i, frames):
                return -1 - i
            raw = following = frames[0]
        if row_dark_median is not None:       # every pixel is a candidate
            total = _row_dark_events(raw, dark, gain_inv, row_dark_median, mu, bg, xr, scale, rows, winners,
                                     out, total)
            continue
        pending, pending_start = np.uint64(0), 0        # the float path's candidates left to compare
        for b in range(FRAME_PIXELS // BLOCK):
            start = b * BLOCK
            _prefetch_block(raw, following, start + AHEAD)
            if dark is not None:     # the float path: the candidates, one bit each
                found = _at_least(raw, start, floor)
                if found:
                    # Its candidates in columns 1-574 of rows 1-574 (``inner``) are left
                    # pending, their window lines asked for, and compared at the next block
                    # that holds a candidate or at the frame's end, when those lines have
                    # come; the pending ones first, so that the events stay in order. The
                    # others (``first``, ``last``: a border's) go one neighbour at a time,
                    # and the block's ``inner`` with them.
                    first = last = inner = np.uint64(0)
                    if FRAME_COLS < start and start + BLOCK + FRAME_COLS < FRAME_PIXELS:
                        col = start % FRAME_COLS
                        first = found & np.uint64(col == 0)                                          # column 0
                        last = found & (np.uint64(col == FRAME_COLS - BLOCK) << np.uint64(BLOCK - 1))   # 575
                        inner = found ^ first ^ last
                        _prefetch_windows(window, gain_inv, start, inner)
                    else:
                        first = found
                    if pending:
                        total = _window_events(raw, pending_start, pending, window, gain_inv, low, high, out, total)
                    pending, pending_start = inner, start
                    if first | last:
                        pending = np.uint64(0)
                        if first:
                            total = _block_events(raw, start, first, floor, offset, dark, gain_inv, bg, xr,
                                                  out, total)
                        total = _window_events(raw, start, inner, window, gain_inv, low, high, out, total)
                        if last:
                            total = _block_events(raw, start, last, floor, offset, dark, gain_inv, bg, xr,
                                                  out, total)
            elif _above(raw, start, below):   # the integer path: a pixel reaches its floor
                if FRAME_COLS < start and start + BLOCK + FRAME_COLS < FRAME_PIXELS:   # compared whole
                    col = start % FRAME_COLS
                    first, last = col == 0, col == FRAME_COLS - BLOCK
                    wins = _integer_maxima(raw, start, below, limit, first, last)
                    total = _store_bits(wins, start, out, total)
                else:          # the first or last row: the candidates, one bit each
                    total = _block_events(raw, start, _at_least(raw, start, floor), floor, offset, dark,
                                          gain_inv, bg, xr, out, total)
        if dark is not None and pending:
            total = _window_events(raw, pending_start, pending, window, gain_inv, low, high, out, total)
    offsets[n] = total
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


@numba.njit(nogil=True, cache=True)
def add_pattern(events, pattern):
    """``pattern[e] += 1`` for every event pixel ``e`` (uint32 ``events`` into the flat
    (331776,) int64 ``pattern``), in place: a counted batch added to a scan's summed pattern."""
    for e in events:
        pattern[e] += 1


def position_sums(events, offsets, slot, n_slots: int, centre, radii, mask) -> tuple:
    """Per-slot event sums in one pass over the events (see :mod:`fourdstream.images`).

    ``slot[i]``: the slot (position) of frame ``i``; ``centre`` = (x, y) pixels;
    ``radii`` = (bf inner, bf outer, adf inner, adf outer) pixels. Returns ``sums``
    (5, n_slots) int64 (events, sum of x, sum of y, in BF, in ADF) and the AND of the
    frames' sector masks per slot (0xFF where no frame).
    """
    sums = np.zeros((5, n_slots), np.int64)
    masks = np.full(n_slots, 0xFF, np.uint8)
    add_position_sums(sums, masks, events, offsets, slot, centre, radii, mask)
    return sums, masks


def add_position_sums(sums, masks, events, offsets, slot, centre, radii, mask) -> None:
    """:func:`position_sums` of one more batch added into ``sums`` and ANDed into ``masks``,
    in place (no arrays of the scan's size made per batch)."""
    _position_sums(events, offsets.astype(np.int64), slot.astype(np.int64), int(centre[0]),
                   int(centre[1]), np.asarray(radii, np.int64) ** 2, sums, masks, mask)


def warm_up() -> None:
    """Compile the helper kernels (the writer's event gather, the images' sums, the scan's
    pattern) now, or load them from the disk cache, so that no scan pays it: the receiver
    calls this at start (the counting kernel: :meth:`~fourdstream.pipeline.ScanCounting.warm_up`)."""
    gather_runs(np.zeros(1, np.uint32), np.zeros(1, np.int64), np.ones(1, np.int64))
    position_sums(np.zeros(1, np.uint32), np.array([0, 1]), np.zeros(1, np.int64), 1, (0, 0),
                  (0, 1, 1, 2), np.ones(1, np.uint8))
    add_pattern(np.zeros(1, np.uint32), np.zeros(FRAME_PIXELS, np.int64))


@numba.njit(nogil=True, cache=True)
def _blocks_at_least(frames, block_floor, prefetch):
    n = frames.shape[0]
    blocks = 0
    for i in range(n):
        raw = frames[i]
        following = frames[i + 1] if i + 1 < n else raw
        for b in range(FRAME_PIXELS // BLOCK):
            start = b * BLOCK
            if prefetch:
                _prefetch_block(raw, following, start + AHEAD)
            if not _at_least(raw, start, block_floor[b]):   # a branch, as the kernel's skip
                continue
            blocks += 1
    return blocks


def read_pass(frames, value: int = 0xFFFF, *, prefetch: bool = False) -> int:
    """The number of ``BLOCK``-pixel blocks of ``frames`` (n, 576, 576) uint16 that hold a
    pixel >= ``value``: one read of every pixel with a 64-lane compare a block, as the
    kernel's, and nothing else where no pixel reaches ``value``; the ceiling the harness
    measures the kernel against. Each block is compared with an entry of a table of
    block floors: on the Intel VM of 2026-11-28 the fastest of the block tests measured
    (against one value held in a register, as the kernel without a dark compares, the
    same loop ran 21-25k frames/s from run to run, against 24-25k). ``prefetch``: ask
    for the bytes ``AHEAD`` pixels on, as the kernel does (:func:`_prefetch_block`)."""
    stack = np.ascontiguousarray(frames).reshape(len(frames), FRAME_PIXELS)
    return int(_blocks_at_least(stack, np.full(FRAME_PIXELS // BLOCK, value, np.uint16), prefetch))


def _narrowest(table: np.ndarray) -> np.ndarray:
    """``table`` (uint16) as bytes where every value is <= 255, else as it is: half the
    bytes for the kernel to read (``below`` in bytes: with a dark, 0.75-0.77 -> 0.78-0.79
    of the memory pass at 1,500 e-/frame; the float path's floors in bytes: +0.03 with
    dark and gain at every dose)."""
    return table.astype(np.uint8) if table.max() <= 0xFF else table


def _float32_at_most(x: float) -> np.float32:
    """The largest float32 <= ``x``: for a float32 ``v``, ``v > x`` (compared in float64)
    exactly when ``v > _float32_at_most(x)``. (Compared in float64 here: numpy >= 2 compares
    a float32 with a Python float in float32.)"""
    x = float(x)
    y = np.float32(x)
    return y if float(y) <= x else np.nextafter(y, np.float32(-np.inf))


class CompiledCounter(ElectronCounter):
    """:class:`~fourdstream.counting.ElectronCounter` counting with the compiled kernel (numpy
    arrays only). Same parameters; ``chunk`` and ``xp`` do not apply."""

    def __init__(self, thresholds=None, dark=None, gain=None, *, row_dark=None,
                 optimized_mean: float = 20.0, **_):
        super().__init__(thresholds, dark, gain, row_dark=row_dark, optimized_mean=optimized_mean)
        if thresholds is None:
            return
        floor = np.broadcast_to(self._floor, (FRAME_PIXELS,))
        # The integer path reads values through the floor where the floor is exact
        # (trunc(D) + floor(bg) + 1 not clipped to uint16) and compares them as uint16
        # ranks where those keep their order (:func:`_integer_maxima`): bg >= 0, a
        # floor >= 1 and ceil(xr) - offset < 65536. Else the float32 path.
        self._offset = int(np.floor(thresholds.background)) + 1
        limit = np.ceil(thresholds.xray) - self._offset
        lowest, highest = self._dark.min() + self._offset, self._dark.max() + self._offset
        exact = (not self.has_gain and row_dark is None and self._offset >= 1 and limit <= 0xFFFF
                 and bool((lowest >= 1) & (highest <= 0xFFFF)))
        self._limit = np.uint16(max(limit, 0) if exact else 0)
        self._dark_f = None if exact else self._dark.astype(np.float32)
        self._gain = self._gain_inv if self.has_gain else None
        # The float path's 3x3 windows read the dark and the gain in one table, the two
        # values of a pixel side by side: half the cache lines a window touches (0.74 ->
        # 0.78 of the memory pass with dark and gain at 150 e-/frame).
        self._window = (self._dark_f if self._gain is None else
                        np.stack([np.broadcast_to(self._dark_f, (FRAME_PIXELS,)),
                                  np.broadcast_to(self._gain, (FRAME_PIXELS,))], axis=1).ravel())
        floor = np.ascontiguousarray(floor, np.uint16)     # (not read with row-dark)
        self._floor_table = _narrowest(floor)
        # The integer path reads floor - 1: one value where the floor is the same for every
        # pixel, else a table.
        if not exact or np.ndim(self._floor) == 0:
            self._below = np.uint16(floor[0] - 1 if exact else 0)
        else:
            self._below = _narrowest(floor - np.uint16(1))
        self._low = _float32_at_most(thresholds.background)
        self._high = -_float32_at_most(-thresholds.xray)

    def count(self, frames, index=None):
        """Count a batch ``(n, 576, 576)`` uint16, or with ``index`` (n,) the frames
        ``frames[index]`` of a larger stack (a frame pool's buffers, counted where they are);
        returns ``(events uint32, offsets int64)``."""
        if frames.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"frames must be (n, 576, 576), got {frames.shape}")
        stack = np.ascontiguousarray(frames).reshape(len(frames), FRAME_PIXELS)
        index = np.arange(len(frames)) if index is None else frame_index(index, len(frames))
        return self._events(stack, index, None)

    def count_sectors(self, fds, at, version: int, frames):
        """Read n frames from raw files and count each one as soon as it is read, while its
        bytes are in the cache (instead of reading a batch whole and then counting it);
        returns ``(events uint32, offsets int64)``, or None when a sector could not be
        read whole (read those frames with :meth:`fourdstream.rawfile.RawScan.read` to say why).

        ``fds``: (n, 4) int64, the open file holding each frame's sector (-1 where it is
        missing: zero-filled); ``at``: (n, 4) int64, the byte where each one's payload
        starts; ``version``: the files' header version (4: sectors are bands of
        columns, 5: of rows); ``frames``: (2, 331776) uint16, the caller's buffer that each
        frame is read into in turn (reused: one per thread).
        """
        if frames.shape != (2, FRAME_PIXELS) or frames.dtype != np.uint16 or not frames.flags.c_contiguous:
            raise ValueError(f"frames must be a C-contiguous (2, {FRAME_PIXELS}) uint16 buffer")
        sectors = (np.ascontiguousarray(fds, np.int64), np.ascontiguousarray(at, np.int64), version == 4)
        return self._events(frames, np.zeros(0, np.int64), sectors)

    def _events(self, frames, index, sectors):
        if self.thresholds is None:
            raise ValueError("this ElectronCounter has no thresholds; it can only give values()")
        n = len(index) if sectors is None else len(sectors[0])
        median = None if self.row_dark is None else self.row_dark == "median"
        offsets = np.zeros(n + 1, np.int64)
        out = np.empty(max(n, 1) * _EVENTS_PER_FRAME, np.uint32)
        while True:
            total = _count(frames, index, sectors, self._floor_table, self._below, self._offset, self._limit,
                           self._dark_f, self._gain, self._window, median, np.float32(self.optimized_mean),
                           float(self.thresholds.background),
                           float(self.thresholds.xray), self._low, self._high, out, offsets)
            if total < 0:
                return None
            if total <= len(out):
                return out[:total].copy(), offsets
            out = np.empty(total, np.uint32)
