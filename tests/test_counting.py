import os

import numpy as np
import pytest

from fourdstream.compiled import CompiledCounter
from fourdstream.counting import ElectronCounter, Thresholds
from fourdstream.detector import ScanGeometry
from fourdstream.simulate import DetectorModel, Simulator

from conftest import stempy_events

BG, XR = 28.0, 600.0


@pytest.fixture(params=[ElectronCounter, CompiledCounter], ids=["array-module", "compiled"])
def Counter(request):
    """Every test below runs with both kernels: the array-module reference and the compiled one."""
    return request.param


def dense_reference(frames, bg, xr, dark=None, gain=None):
    """Straightforward whole-frame implementation of the rule, for cross-checks."""
    raw = frames.astype(np.float64)
    if gain is None:
        v = raw - (0 if dark is None else np.trunc(dark))
    else:
        v = ((frames.astype(np.float32) - np.float32(0 if dark is None else dark))
             * (np.float32(1) / gain.astype(np.float32))).astype(np.float64)
    v = np.maximum(v, 0)
    v = np.where((v > bg) & (v < xr), v, 0)
    padded = np.pad(v, ((0, 0), (1, 1), (1, 1)))  # outside the frame counts as 0
    is_max = v > 0
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                is_max &= v > padded[:, 1 + dr:577 + dr, 1 + dc:577 + dc]
    return [np.flatnonzero(m) for m in is_max]


def events_per_frame(counter, frames):
    events, offsets = counter.count(frames)
    return [events[offsets[i]:offsets[i + 1]] for i in range(len(frames))]


@pytest.fixture(scope="module")
def frames_by_dose():
    out = {}
    for dose in (40, 400):
        sim = Simulator(ScanGeometry(6, 2), dose=dose, seed=dose, pattern="disc")
        out[dose] = (sim.frames(0, 12)[0], sim.dark)
    return out


@pytest.mark.parametrize("dose", [40, 400])
@pytest.mark.parametrize("with_dark", [False, True])
def test_events_equal_stempy(Counter, frames_by_dose, dose, with_dark):
    frames, dark = frames_by_dose[dose]
    dark = dark if with_dark else None
    if dark is not None:
        assert not np.all(dark == np.trunc(dark))  # a real float dark, not integers
    kw = {} if dark is None else {"darkreference": dark}
    ours = events_per_frame(Counter(Thresholds(BG - 10 * with_dark, XR), dark), frames)
    for i, frame in enumerate(frames):
        ref = stempy_events(frame, background_threshold=BG - 10 * with_dark, xray_threshold=XR, **kw)
        assert np.array_equal(ours[i], ref), f"frame {i}"
    assert sum(map(len, ours)) > 10 * len(frames)


def test_events_equal_stempy_with_gain(Counter, frames_by_dose):
    frames, dark = frames_by_dose[400]
    gain = np.random.default_rng(1).uniform(0.8, 1.25, (576, 576)).astype(np.float32)
    ours = events_per_frame(Counter(Thresholds(15.5, XR), dark, gain), frames)
    for i, frame in enumerate(frames[:6]):
        ref = stempy_events(frame, darkreference=dark, gain=gain, background_threshold=15.5,
                            xray_threshold=XR)
        assert np.array_equal(ours[i], ref), f"frame {i}"


def _blank():
    return np.zeros((1, 576, 576), np.uint16)


def _handmade_cases():
    cases = {}
    f = _blank()
    f[0, 100, 100:102] = 90          # plateau of two: no event
    f[0, 200, 200] = 90              # a lone maximum: event
    f[0, 201, 201] = 90              # its diagonal twin: a tie, neither is an event
    f[0, 300, 300] = 70
    f[0, 300, 301] = 69              # strictly lower neighbour: 300,300 is the event
    cases["plateaus"] = (f, [300 * 576 + 300])
    f = _blank()
    spots = [(0, 0), (0, 575), (575, 0), (575, 575), (0, 300), (575, 301), (302, 0), (303, 575)]
    for r, c in spots:
        f[0, r, c] = 80
    cases["borders_and_corners"] = (f, sorted(r * 576 + c for r, c in spots))
    f = _blank()
    f[0, 50, 50] = 5000              # x-ray: zeroed ...
    f[0, 50, 51] = 120               # ... so its bright neighbour becomes an event
    f[0, 400, 400] = XR              # exactly xr: dropped (strict)
    f[0, 401, 401] = BG              # exactly bg: dropped (strict)
    f[0, 402, 403] = BG + 1          # just above bg: event
    cases["xray_and_strict_thresholds"] = (f, [50 * 576 + 51, 402 * 576 + 403])
    cases["all_zero"] = (_blank(), [])
    cases["saturated"] = (np.full((1, 576, 576), 0xFFFF, np.uint16), [])
    return cases


@pytest.mark.parametrize("name", list(_handmade_cases()))
def test_handmade_edge_cases(Counter, name):
    frame, expected = _handmade_cases()[name]
    (ours,) = events_per_frame(Counter(Thresholds(BG, XR)), frame)
    assert ours.tolist() == expected
    assert stempy_events(frame[0], background_threshold=BG, xray_threshold=XR).tolist() == expected


def test_dark_is_truncated_before_subtraction_like_the_reference(Counter):
    frame = _blank()
    frame[0, 10, 10] = 40
    frame[0, 10, 11] = 40
    dark = np.zeros((576, 576), np.float32)
    dark[10, 10], dark[10, 11] = 0.3, 0.6   # float subtraction would break the tie
    (ours,) = events_per_frame(Counter(Thresholds(5, XR), dark), frame)
    assert ours.tolist() == []
    assert stempy_events(frame[0], darkreference=dark, background_threshold=5,
                         xray_threshold=XR).tolist() == []


@pytest.mark.parametrize("use_gain", [False, True])
def test_random_frames_match_dense_reference(Counter, use_gain):
    rng = np.random.default_rng(7)
    frames = rng.poisson(20, (5, 576, 576)).astype(np.uint16)
    frames[:, ::37, ::41] += rng.integers(0, 300, frames[:, ::37, ::41].shape).astype(np.uint16)
    dark = rng.uniform(0, 25, (576, 576)).astype(np.float32)
    gain = rng.uniform(0.5, 2, (576, 576)).astype(np.float32) if use_gain else None
    counter = Counter(Thresholds(3.5, 250.0), dark, gain, chunk=2)
    for ours, ref in zip(events_per_frame(counter, frames), dense_reference(frames, 3.5, 250.0, dark, gain)):
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("dark_range", [(-60, -20), (-8.5, -5.5), (65500, 65535)],
                         ids=["negative", "floor-reaching-zero", "near-full-scale"])
def test_dark_whose_floor_leaves_uint16_matches_dense_reference(Counter, dark_range):
    """A dark far outside the raw range clips the candidate floor to 0 or 65535, and a
    dark of -8 puts it at 0 (bg 7.5): the compiled kernel then cannot read values
    through the floor (its uint16 ranks need a floor >= 1) and takes its float path."""
    rng = np.random.default_rng(9)
    frames = rng.integers(0, 0xFFFF, (3, 576, 576), dtype=np.uint16, endpoint=True)
    frames[:, ::3] = rng.integers(0, 40, frames[:, ::3].shape)
    dark = rng.uniform(*dark_range, (576, 576)).astype(np.float32)
    counter = Counter(Thresholds(7.5, 30000.0), dark)
    for ours, ref in zip(events_per_frame(counter, frames), dense_reference(frames, 7.5, 30000.0, dark)):
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("use_gain", [False, True], ids=["integer-path", "float-path"])
@pytest.mark.parametrize("dark_range,table", [((0, 25), np.uint8), ((200, 900), np.uint16)],
                         ids=["floors-in-a-byte", "floors-past-a-byte"])
def test_kernel_reads_floor_tables_of_bytes_or_of_uint16(dark_range, table, use_gain):
    """The compiled kernel compares each pixel with its floor (the float path) or its
    floor - 1 (the integer path), read from a table of bytes where every value fits in
    one, else of uint16: both give the dense reference's events, on frames with events
    and plateaus at the dark's level and well above it."""
    rng = np.random.default_rng(13)
    dark = rng.uniform(*dark_range, (576, 576)).astype(np.float32)
    gain = rng.uniform(0.9, 1.1, (576, 576)).astype(np.float32) if use_gain else None
    frames = (np.trunc(dark) + rng.poisson(4, (3, 576, 576))).astype(np.uint16)
    frames[:, ::29, ::31] += rng.integers(5, 400, frames[:, ::29, ::31].shape).astype(np.uint16)
    counter = CompiledCounter(Thresholds(6.5, 300.0), dark, gain)
    assert counter._floor_table.dtype == table
    if not use_gain:
        assert counter._below.dtype == table
    for ours, ref in zip(events_per_frame(counter, frames), dense_reference(frames, 6.5, 300.0, dark, gain)):
        assert len(ref) > 1000 and np.array_equal(ours, ref)


@pytest.mark.parametrize("bg,xr", [(1.0, 5.0), (-2.5, 4.0), (0.0, 70000.0)],
                         ids=["ties", "negative-bg", "xray-past-uint16"])
def test_ties_across_blocks_and_row_ends_match_dense_reference(Counter, bg, xr):
    """Values of 0-6 make plateaus and ties everywhere: across the compiled kernel's
    64-pixel blocks, at the rows' ends and in the frame's first and last rows. With
    bg >= 0 and xr below 65536 + bg its blocks are compared whole (uint16 ranks); a
    negative bg or an x-ray threshold past uint16 take its float path."""
    rng = np.random.default_rng(11)
    frames = rng.integers(0, 7, (3, 576, 576)).astype(np.uint16)
    frames[:, ::50, ::70] = 0xFFFF
    for ours, ref in zip(events_per_frame(Counter(Thresholds(bg, xr)), frames),
                         dense_reference(frames, bg, xr)):
        assert np.array_equal(ours, ref)


@pytest.mark.parametrize("kind", [float, np.float64], ids=["python-float", "numpy-float64"])
@pytest.mark.parametrize("ulps", [-1, 0, 1])
def test_gain_path_thresholds_compare_in_float64_one_ulp_either_side(Counter, ulps, kind):
    """Values exactly at the thresholds and thresholds one float64 ulp either side of
    them: a float32 value passes ``bg < v < xr`` as the float64 compare says (the
    compiled kernel compares in float32 against the thresholds rounded outward; rounded
    to nearest instead, 10.0 would fail a bg just below it). The thresholds as Python
    floats too (as the command line gives them), which numpy >= 2 compares with a
    float32 in float32."""
    frames = np.zeros((1, 576, 576), np.uint16)
    frames[0, 100, 100:500:4] = 10
    frames[0, 200, 100:500:4] = 20
    frames[0, 300, 100:500:4] = 15
    frames[0, 301, 101:500:4] = 10          # each 15's neighbour, at bg
    step = np.inf if ulps > 0 else -np.inf
    bg, xr = (kind(t) if ulps == 0 else kind(np.nextafter(t, step)) for t in (10.0, 20.0))
    counter = Counter(Thresholds(bg, xr), None, np.ones((576, 576), np.float32))
    ours = events_per_frame(counter, frames)[0]
    assert np.array_equal(ours, dense_reference(frames, bg, xr, None, np.ones((576, 576)))[0])
    assert len(ours) == {-1: 200, 0: 100, 1: 200}[ulps]     # the 10s and the 20s in or out


def test_kernels_read_nothing_past_a_frame_that_ends_at_an_unreadable_page():
    """A batch whose last frame ends where memory stops (the next page unreadable, as a
    memory map of a file may end), with candidates at every pixel next to its edges, in
    its last row and column and at (574, 574): every kernel path reads only the frame. In a
    process of its own, so that a fault fails this test instead of ending the suite."""
    code = """if True:
        import ctypes, mmap
        import numpy as np
        from fourdstream.compiled import CompiledCounter
        from fourdstream.counting import ElectronCounter, Thresholds
        size = 576 * 576 * 2                          # 162 pages exactly
        memory = mmap.mmap(-1, size + mmap.PAGESIZE)
        start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mprotect(ctypes.c_void_p(start + size), mmap.PAGESIZE, 0) == 0   # PROT_NONE
        frames = np.frombuffer(memory, np.uint16, 576 * 576).reshape(1, 576, 576)
        frames[0, 573:, :] = np.arange(3 * 576).reshape(3, 576) % 7 * 20
        frames[0, :, 573:] = np.arange(3 * 576).reshape(576, 3) % 5 * 30
        frames[0, 574, 574] = 200
        dark = np.full((576, 576), 0.5, np.float32)
        gain = np.full((576, 576), 1.1, np.float32)
        for args, kw in [((), {}), ((dark,), {}), ((dark, gain), {}), ((None, gain), {}),
                         ((), {"row_dark": "mean"})]:
            ours = CompiledCounter(Thresholds(10.5, 1000.0), *args, **kw).count(frames)
            ref = ElectronCounter(Thresholds(10.5, 1000.0), *args, **kw).count(frames)
            assert np.array_equal(ours[0], ref[0]) and len(ours[0]) > 100, args
        print("read only the frame")
    """
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "read only the frame" in proc.stdout, proc.stderr[-2000:]


def test_gain_candidate_floor_is_the_least_raw_value_that_passes():
    """With a gain the candidate floor is exact: the least raw value whose float32 value
    passes bg (65535 where none does), found against every raw value; 0 for a gain the
    bisection cannot use (0, negative, inf, nan)."""
    from fourdstream.counting import _candidate_floor

    rng = np.random.default_rng(12)
    dark = rng.uniform(-50, 3000, 64).astype(np.float32)
    gain_inv = rng.uniform(0.01, 40, 64).astype(np.float32)
    gain_inv[:5] = [0, -1, np.inf, np.nan, 1e-4]       # the last: no raw value passes
    bg = 21.7                                            # not a float32
    raw = np.arange(0x10000).astype(np.float32)
    passes = ((raw[None, :] - dark[:, None]) * gain_inv[:, None]).astype(np.float64) > bg
    least = np.where(passes.any(axis=1), passes.argmax(axis=1), 0xFFFF)
    floor = _candidate_floor(dark, gain_inv, bg)
    assert floor[:4].tolist() == [0, 0, 0, 0]
    assert floor[4] == 0xFFFF and floor[4:].tolist() == least[4:].tolist()


def test_row_dark_matches_its_definition(Counter):
    rng = np.random.default_rng(8)
    frames = rng.poisson(30, (2, 576, 576)).astype(np.uint16)
    frames[:, 100:110, :288] += 15  # a bright half-row band, removed by the correction
    counter = Counter(Thresholds(25.0, 500.0), row_dark="mean", optimized_mean=20.0)
    halves = frames.astype(np.float32).reshape(2, 576, 2, 288)
    expected_values = (halves * (np.float32(20.0) / halves.mean(axis=3))[..., None]).reshape(2, 576, 576)
    assert np.allclose(counter.values(frames), expected_values, rtol=1e-6)
    v = np.where((expected_values > 25) & (expected_values < 500), expected_values, 0)
    padded = np.pad(v, ((0, 0), (1, 1), (1, 1)))
    is_max = v > 0
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                is_max &= v > padded[:, 1 + dr:577 + dr, 1 + dc:577 + dc]
    for ours, ref in zip(events_per_frame(counter, frames), is_max):
        assert np.array_equal(ours, np.flatnonzero(ref))


@pytest.mark.parametrize("setup", ["dark", "dark+gain", "row-dark"])
def test_frames_counted_where_they_lie_by_index_equal_the_same_frames_copied(Counter, frames_by_dose,
                                                                            setup):
    """The receiver counts a batch where its frames lie in its frame pool:
    ``count(pool, index)`` equals ``count(pool[index])``, in any order and with repeats;
    an index outside the stack is an error, not a read past it."""
    frames, dark = frames_by_dose[400]
    gain = np.random.default_rng(5).uniform(0.8, 1.25, (576, 576)).astype(np.float32)
    args = {"dark": (dark,), "dark+gain": (dark, gain), "row-dark": ()}[setup]
    counter = Counter(Thresholds(BG, XR), *args, row_dark="mean" if setup == "row-dark" else None)
    index = np.array([5, 0, 11, 3, 3, 7])
    events, offsets = counter.count(frames, index)
    expected_events, expected_offsets = counter.count(frames[index])
    assert len(events) > 100 and np.array_equal(events, expected_events)
    assert np.array_equal(offsets, expected_offsets)
    for outside in ([0, len(frames)], [-1]):
        with pytest.raises(IndexError):
            counter.count(frames, np.array(outside))


def test_batching_and_chunking_do_not_change_results(Counter, frames_by_dose):
    frames, dark = frames_by_dose[400]
    whole = events_per_frame(Counter(Thresholds(BG, XR), dark, chunk=5), frames)
    single = [events_per_frame(Counter(Thresholds(BG, XR), dark), f[None])[0] for f in frames]
    assert all(np.array_equal(a, b) for a, b in zip(whole, single))
    events, offsets = Counter(Thresholds(BG, XR)).count(frames[:0])
    assert len(events) == 0 and offsets.tolist() == [0]


def test_accuracy_against_ground_truth(Counter, capsys):
    """Recall and precision of counting (within 1 px) on simulated electrons."""
    model = DetectorModel(xray_probability=0)
    sim = Simulator(ScanGeometry(20, 1), dose=150, seed=9, model=model)
    frames, truth = sim.frames(0, 20)
    per_frame = events_per_frame(Counter(Thresholds(28.0, 2000.0), sim.dark), frames)
    found = matched_events = n_events = 0
    for i, events in enumerate(per_frame):
        t = np.stack(np.divmod(truth.frame(i).astype(int), 576), axis=1)
        e = np.stack(np.divmod(events.astype(int), 576), axis=1)
        dist = np.abs(t[:, None, :] - e[None, :, :]).max(axis=2)  # Chebyshev, pixels
        found += (dist.min(axis=1) <= 1).sum()
        matched_events += (dist.min(axis=0) <= 1).sum()
        n_events += len(e)
    recall, precision = found / len(truth.pixels), matched_events / n_events
    with capsys.disabled():
        print(f"\n  counting accuracy at 150 e-/frame: recall {recall:.3f}, precision {precision:.3f}")
    assert recall > 0.85 and precision > 0.9


def test_thresholds_are_validated(Counter):
    with pytest.raises(ValueError, match="exceed"):
        Thresholds(100, 50)
    with pytest.raises(ValueError, match="finite"):
        Thresholds(float("nan"), 50)
    with pytest.raises(ValueError, match="no thresholds"):
        Counter().count(_blank())


@pytest.mark.parametrize("dose", [15, 150, 1500])
@pytest.mark.parametrize("dark,gain,row_dark", [(False, False, None), (True, False, None),
                                                (True, True, None), (True, False, "mean"),
                                                (False, True, "median")])
def test_compiled_kernel_equals_the_array_module_kernel_and_stempy(dose, dark, gain, row_dark):
    sim = Simulator(ScanGeometry(8, 1), dose=dose, seed=dose, pattern="disc")
    frames = sim.frames(0, 8)[0]
    d = sim.dark if dark else None
    g = np.random.default_rng(dose).uniform(0.8, 1.25, (576, 576)).astype(np.float32) if gain else None
    thresholds = Thresholds(21.7, 640.3)        # not representable in float32: exercises rounding
    reference = ElectronCounter(thresholds, d, g, row_dark=row_dark).count(frames)
    compiled = CompiledCounter(thresholds, d, g, row_dark=row_dark).count(frames)
    assert np.array_equal(reference[0], compiled[0]) and np.array_equal(reference[1], compiled[1])
    assert len(compiled[0]) > 2 * len(frames)
    if row_dark is None:                         # stempy's electron_count_frame has no row dark
        kw = {"darkreference": d} if dark else {}
        kw.update({"gain": g} if gain else {})
        per_frame = events_per_frame(CompiledCounter(thresholds, d, g), frames)
        for i in (0, 7):
            assert np.array_equal(per_frame[i], stempy_events(
                frames[i], background_threshold=21.7, xray_threshold=640.3, **kw)), i


def test_block_compares_equal_numpy():
    """The kernel's 64-lane compares (LLVM intrinsics) against numpy, bit for bit, unsigned
    to the top of the range: against tables of uint16 and of bytes (zero-extended), and
    against one value."""
    import numba

    from fourdstream.compiled import _above, _at_least

    @numba.njit
    def masks(pixels, floor, floor8, values):
        out = np.empty((len(pixels) // 64, 6), np.uint64)
        for b in range(len(pixels) // 64):
            start = b * 64
            out[b] = (_at_least(pixels, start, floor), _at_least(pixels, start, floor8),
                      _at_least(pixels, start, values[b]), _above(pixels, start, floor),
                      _above(pixels, start, floor8), _above(pixels, start, values[b]))
        return out

    rng = np.random.default_rng(3)
    n = 200
    pixels = rng.choice(np.array([0, 1, 27, 28, 29, 254, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF], np.uint16),
                        64 * n)
    floor = rng.choice(np.array([0, 28, 0x8000, 0xFFFF], np.uint16), len(pixels))
    floor8 = rng.choice(np.array([0, 1, 28, 128, 255], np.uint8), len(pixels))
    values = rng.choice(np.array([0, 28, 0x8000, 0xFFFF], np.uint16), n)
    got = masks(pixels, floor, floor8, values)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)

    def bits(mask):
        return (mask.reshape(n, 64) * weights).sum(axis=1, dtype=np.uint64)

    per_block = np.repeat(values, 64)
    expected = [bits(pixels >= floor), bits(pixels >= floor8), bits(pixels >= per_block),
                bits(pixels > floor), bits(pixels > floor8), bits(pixels > per_block)]
    for k, want in enumerate(expected):
        assert np.array_equal(got[:, k], want), k


def test_compiled_row_dark_factors_equal_the_reference_bit_for_bit():
    """The compiled kernel's half-row factors, from the mean and from the median, equal the
    reference's (numpy's float32 mean and median) bit for bit: on frames over the whole
    uint16 range, near its top (half-row sums above 2**24, where numpy's pairwise float32
    sum rounds), of Poisson noise, of a few distinct values (medians among ties) and of
    zeros (the 1e-6 floor)."""
    from fourdstream.compiled import _row_dark_scale

    rng = np.random.default_rng(11)
    frames = [rng.integers(0, 0x10000, (576, 576)), rng.integers(0xFF00, 0x10000, (576, 576)),
              rng.poisson(rng.uniform(0, 500, (576, 1)), (576, 576)), rng.integers(0, 3, (576, 576)) * 30000,
              np.zeros((576, 576))]
    for k, frame in enumerate(frames):
        frame = frame.astype(np.uint16)
        for statistic in ("mean", "median"):
            mu = float(rng.uniform(1, 100))
            reference = ElectronCounter(Thresholds(1.0, 2.0), row_dark=statistic,
                                        optimized_mean=mu).row_dark_scale(frame[None])[0]
            ours = np.empty((576, 2), np.float32)
            _row_dark_scale(frame.ravel(), statistic == "median", np.float32(mu), ours)
            assert np.array_equal(ours, reference), (k, statistic)


@pytest.mark.parametrize("seed", range(6))
def test_compiled_kernel_equals_the_array_module_kernel_on_random_set_ups(seed):
    """Random set-ups, 8 each (seeded): sparse or dense frames with values added on the
    frame's border rows and columns and on block edges, thresholds drawn as Python floats
    (as the command line gives them), with or without a dark, a gain and row-dark. The
    compiled kernel gives the array-module kernel's events, in order (a longer run of
    this found the Python-float threshold case of the one-ulp test above)."""
    rng = np.random.default_rng(seed)
    for _ in range(8):
        frames = rng.poisson(rng.choice([0.5, 3.0, 20.0]), (3, 576, 576)).astype(np.uint16)
        k = int(rng.integers(10, 3000))
        rows = rng.choice([0, 1, 287, 288, 574, 575], (3, k))
        cols = rng.choice([0, 1, 63, 64, 511, 512, 574, 575], (3, k))
        at = np.where(rng.random((3, k)) < 0.3, rows * 576 + cols, rng.integers(0, 576 * 576, (3, k)))
        for frame, pixels in zip(frames, at):
            frame.ravel()[pixels] += rng.integers(1, 400, k).astype(np.uint16)
        bg = float(rng.uniform(-1, 10))
        thresholds = Thresholds(bg, bg + float(rng.uniform(5, 500)))
        dark = rng.uniform(0, rng.choice([2, 25, 300]), (576, 576)).astype(np.float32) if rng.random() < 0.8 else None
        gain = rng.uniform(0.5, 2, (576, 576)).astype(np.float32) if rng.random() < 0.6 else None
        row_dark = "mean" if rng.random() < 0.1 else None
        ours = CompiledCounter(thresholds, dark, gain, row_dark=row_dark).count(frames)
        reference = ElectronCounter(thresholds, dark, gain, row_dark=row_dark).count(frames)
        assert np.array_equal(ours[0], reference[0]) and np.array_equal(ours[1], reference[1]), \
            (thresholds, dark is None, gain is None, row_dark)


@pytest.mark.parametrize("kind", [float, np.float64], ids=["python-float", "numpy-float64"])
def test_row_dark_compares_in_float32_whatever_the_thresholds_type(Counter, kind):
    """With row-dark the values are compared with the thresholds in float32, in both
    kernels, whether the thresholds are Python floats or numpy float64 (numpy >= 2
    compares a float32 with the latter in float64): a value of 10 against a bg one
    float64 ulp below 10 (10 in float32) is not kept, a value of 12 is. Every half-row
    holds 36 tens and 36 twelves, every 4th pixel (offset by 2 on odd rows: no two are
    neighbours), so with an optimized mean of 2.75, their mean, every factor is 1."""
    frame = np.zeros((576, 576), np.uint16)
    for r in range(576):
        frame[r, 2 * (r % 2)::4] = np.tile(np.array([10, 12], np.uint16), 72)
    bg = kind(np.nextafter(10.0, -np.inf))
    counter = Counter(Thresholds(bg, kind(100.0)), np.zeros((576, 576), np.float32), row_dark="mean",
                      optimized_mean=2.75)
    assert np.array_equal(counter.row_dark_scale(frame[None]), np.ones((1, 576, 2), np.float32))
    ours = events_per_frame(counter, frame[None])[0]
    assert ours.tolist() == np.flatnonzero(frame == 12).tolist()


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("dark,gain,row_dark", [(False, False, None), (True, True, None), (True, False, "mean")])
def test_compiled_kernel_reading_raw_files_counts_each_frame_as_assembled(tmp_path, version, dark, gain, row_dark):
    """``count_sectors`` (each frame read from the files by the kernel and counted at once)
    gives the events of the array-module kernel on the simulator's frames, with the
    sectors of a deleted file zero-filled, in both sector layouts; a file cut short
    after indexing gives None (the offline count then reads the frames to say why)."""
    from fourdstream.detector import sector_slice
    from fourdstream.rawfile import RawScan, RawScanWriter, raw_filename

    sim = Simulator(ScanGeometry(4, 3), dose=150, seed=version, pattern="disc")
    frames = sim.frames(0, 12)[0]
    with RawScanWriter(tmp_path, 3, sim.geometry, version=version, n_dst=2) as writer:
        writer.write(frames, np.arange(1, 13), np.arange(12))
    (tmp_path / raw_filename(3, 2, dst=1)).unlink()         # sector 2 of frames 1, 3, 5, ...
    expected = frames.copy()
    expected[(slice(0, None, 2),) + sector_slice(2, version)] = 0
    scan = RawScan([tmp_path], version=version)
    assert list(scan.mask) == [11, 15] * 6
    d = sim.dark if dark else None
    g = np.random.default_rng(version).uniform(0.8, 1.25, (576, 576)).astype(np.float32) if gain else None
    thresholds = Thresholds(21.7, 640.3)
    counter = CompiledCounter(thresholds, d, g, row_dark=row_dark)
    buffer = np.full((2, 576 * 576), 0xABCD, np.uint16)          # stale content must not survive
    events, offsets = counter.count_sectors(*scan.sectors(np.arange(12)), version, buffer)
    reference = ElectronCounter(thresholds, d, g, row_dark=row_dark).count(expected)
    assert np.array_equal(events, reference[0]) and np.array_equal(offsets, reference[1])
    assert len(events) > 2 * len(frames)
    with pytest.raises(ValueError, match="C-contiguous"):
        counter.count_sectors(*scan.sectors(np.arange(12)), version, buffer[:, ::2])
    os.truncate(tmp_path / raw_filename(3, 0, dst=1), 100)       # after indexing
    assert counter.count_sectors(*scan.sectors(np.arange(12)), version, buffer) is None
    closed = np.full((1, 4), os.open(os.devnull, os.O_RDONLY), np.int64)
    os.close(closed[0, 0])
    assert counter.count_sectors(closed, np.zeros((1, 4), np.int64), version, buffer) is None   # EBADF
