import json
import subprocess
import sys

import numpy as np
import pytest

from fourdstream import backend
from fourdstream.compiled import CompiledCounter
from fourdstream.counting import ElectronCounter


def test_cpu_is_the_compiled_kernel_numpy_the_reference_and_auto_says_why():
    cpu = backend.select("cpu")
    assert cpu.xp is np and cpu.counter is CompiledCounter
    assert backend.select("numpy").counter is ElectronCounter
    auto = backend.select("auto")
    if auto.xp is np:
        assert auto.counter is CompiledCounter and ";" in auto.description  # says why not the GPU


def test_gpu_without_device_is_a_clear_error():
    try:
        import cupy
        if cupy.cuda.is_available():
            pytest.skip("a CUDA device is present")
    except ImportError:
        pass
    with pytest.raises(backend.BackendError, match="--backend gpu"):
        backend.select("gpu")


def test_unknown_backend():
    with pytest.raises(backend.BackendError):
        backend.select("tpu")


def test_numpy_backend_imports_neither_numba_nor_scipy():
    code = ("import sys; from fourdstream.pipeline import CountingOptions, ScanCounting; "
            "ScanCounting(CountingOptions(background_threshold=28, xray_threshold=700, backend='numpy')); "
            "print(sorted(m for m in ('numba', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_compiled_kernel_loads_without_scipy_linalg_and_numba_blas_still_works():
    """Loading and running the kernel does not import scipy.linalg (numba's BLAS probe is
    kept from it); numba's np.dot imports it when compiled, and works, afterwards."""
    code = ("import sys; import numba, numpy as np; from fourdstream.compiled import CompiledCounter; "
            "from fourdstream.counting import Thresholds; "
            "CompiledCounter(Thresholds(28, 700)).count(np.zeros((1, 576, 576), np.uint16)); "
            "print('scipy.linalg' in sys.modules); "
            "print(numba.njit(lambda a: np.dot(a, a))(np.arange(3.0)), 'scipy.linalg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "5.0", "True"]


def test_cupy_counting_matches_numpy_when_a_gpu_exists():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fourdstream.counting import Thresholds
    from fourdstream.detector import ScanGeometry
    from fourdstream.simulate import Simulator

    sim = Simulator(ScanGeometry(4, 2), seed=1)
    frames, _ = sim.frames(0, 8)
    cpu = CompiledCounter(Thresholds(28, 600), sim.dark).count(frames)
    gpu = ElectronCounter(Thresholds(28, 600), sim.dark, xp=cupy).count(cupy.asarray(frames))
    assert all(np.array_equal(a, backend.to_numpy(b)) for a, b in zip(cpu, gpu))


def test_a_batch_of_a_frame_pool_goes_to_the_device_alone():
    """With an array module other than numpy (CuPy), ScanCounting gathers the batch's frames
    out of the pool on the host and moves only them to the device, not the whole pool; the
    events are those of the batch. A stand-in device module (numpy under another name)
    records what it is given."""
    from fourdstream.detector import ScanGeometry
    from fourdstream.pipeline import CountingOptions, ScanCounting
    from fourdstream.simulate import Simulator

    class Device:
        moved = []

        def asarray(self, a):
            self.moved.append(np.shape(a))
            return np.asarray(a)

        def __getattr__(self, name):
            return getattr(np, name)

    pool = Simulator(ScanGeometry(6, 1), dose=150, seed=2).frames(0, 6)[0]
    slots = np.array([4, 1, 3])
    counting = ScanCounting(CountingOptions(background_threshold=28, xray_threshold=600, backend="numpy"))
    counting.xp = Device()
    counted = counting.count(pool, slots + 1, slots, np.full(3, 15), index=slots)
    assert [shape for shape in Device.moved if len(shape) == 3] == [(3, 576, 576)]   # frames, not tables
    expected = ElectronCounter(counting.calibration.thresholds).count(pool[slots])
    assert np.array_equal(counted.events, expected[0]) and np.array_equal(counted.offsets, expected[1])


def test_compiled_kernel_releases_the_gil_and_is_cached_on_disk(tmp_path):
    from fourdstream import compiled

    assert compiled._count.targetoptions["nogil"] and compiled._value.targetoptions["nogil"]
    code = ("import numpy as np; from fourdstream.compiled import CompiledCounter; "
            "from fourdstream.counting import Thresholds; "
            "CompiledCounter(Thresholds(28, 700)).count(np.zeros((1, 576, 576), np.uint16))")
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert list(tmp_path.rglob("*_count*.nbi")) and list(tmp_path.rglob("*_count*.nbc"))


def test_gather_runs_equals_concatenating_slices():
    from fourdstream.compiled import gather_runs

    rng = np.random.default_rng(3)
    source = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    starts = rng.integers(0, 990, 200)
    counts = rng.integers(0, 10, 200)
    counts[::7] = 0
    expected = np.concatenate([source[s:s + c] for s, c in zip(starts, counts)])
    got = gather_runs(source, starts, counts)
    assert got.dtype == np.uint32 and np.array_equal(got, expected)
    assert len(gather_runs(source, starts[:0], counts[:0])) == 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_read_pass_counts_the_blocks_that_reach_a_value(prefetch):
    """The harness's ceiling reads every pixel: a value in any block, the last one included, counts."""
    from fourdstream.compiled import BLOCK, read_pass

    rng = np.random.default_rng(4)
    frames = rng.integers(0, 3000, (3, 576, 576), dtype=np.uint16)
    frames[2, -1, -1] = 0xFFFF
    assert read_pass(frames, prefetch=prefetch) == 1
    for value in (0, 2900, 2999, 3000):
        expected = int((frames.reshape(-1, BLOCK) >= value).any(axis=1).sum())
        assert read_pass(frames, value, prefetch=prefetch) == expected
    assert read_pass(frames[:, ::-1], 0xFFFF, prefetch=prefetch) == 1      # a strided view is read too


def test_prefetch_hint_is_non_temporal_on_amd_zen_and_into_l2_elsewhere():
    """The README's "non-temporal on AMD Zen, into the second-level cache elsewhere",
    by the CPU names LLVM gives (the one numba compiles for decides)."""
    from fourdstream.compiled import prefetch_locality

    assert [prefetch_locality(c) for c in ("znver2", "znver3", "znver4")] == [0, 0, 0]
    assert [prefetch_locality(c) for c in ("rocketlake", "sapphirerapids", "skylake-avx512", "generic",
                                           "neoverse-v2")] == [2, 2, 2, 2, 2]


def test_kernel_and_its_ceiling_ask_for_the_frames_ahead_with_this_cpus_hint(tmp_path):
    """The README's "asking for the bytes 8 kB ahead (a software prefetch ...)": the
    compiled kernel and the ceiling's prefetching read both hold LLVM prefetches of a
    read (0), at the locality chosen for this CPU (``PREFETCH_LOCALITY``), from the data
    cache (1)."""
    from fourdstream.compiled import AHEAD, PREFETCH_LOCALITY

    assert AHEAD * 2 == 8192       # pixels of 2 bytes: 8 kB
    hint = f"i32 0, i32 {PREFETCH_LOCALITY}, i32 1"
    code = ("import re, numpy as np; from fourdstream import compiled; "
            "from fourdstream.counting import Thresholds; "
            "compiled.CompiledCounter(Thresholds(28, 700)).count(np.zeros((2, 576, 576), np.uint16)); "
            "compiled.read_pass(np.zeros((2, 576, 576), np.uint16), prefetch=True); "
            "print([len(re.findall(r'call void @llvm\\.prefetch\\S*\\(ptr [^,]+, " + hint + "\\)', ir)) "
            "for f in (compiled._count, compiled._blocks_at_least) for ir in f.inspect_llvm().values()])")
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}    # compiled here: inspectable
    found = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                           text=True).stdout
    assert all(n >= 2 for n in json.loads(found)), found        # a block's two 64-byte lines


def test_gain_kernel_asks_for_its_windows_dark_and_gain_ahead(tmp_path):
    """The README's "from one table that holds each pixel's dark and gain side by side,
    whose lines it asks for ... before it compares them": with a gain, the table is the
    dark and the gain interleaved, and the kernel's LLVM IR holds prefetches of its three
    window rows beyond the frames' own (those of the kernel with a dark only)."""
    from fourdstream.compiled import PREFETCH_LOCALITY, CompiledCounter
    from fourdstream.counting import Thresholds

    rng = np.random.default_rng(2)
    dark = rng.uniform(0, 20, (576, 576)).astype(np.float32)
    gain = rng.uniform(0.8, 1.25, (576, 576)).astype(np.float32)
    counter = CompiledCounter(Thresholds(20.0, 600.0), dark, gain)
    assert np.array_equal(counter._window.reshape(576 * 576, 2),
                          np.stack([dark.ravel(), (np.float32(1) / gain).ravel()], axis=1))
    hint = f"i32 0, i32 {PREFETCH_LOCALITY}, i32 1"
    code = ("import re, numpy as np; from fourdstream import compiled; "
            "from fourdstream.counting import Thresholds; "
            "d = np.full((576, 576), 3.5, np.float32); "
            "compiled.CompiledCounter(Thresholds(20, 600), d).count(np.zeros((2, 576, 576), np.uint16)); "
            "compiled.CompiledCounter(Thresholds(20, 600), d, d).count(np.zeros((2, 576, 576), np.uint16)); "
            "print([len(re.findall(r'call void @llvm\\.prefetch\\S*\\(ptr [^,]+, " + hint + "\\)', ir)) "
            "for ir in compiled._count.inspect_llvm().values()])")
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}    # compiled here: inspectable
    dark_only, with_gain = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                                     capture_output=True, text=True).stdout)
    assert with_gain >= dark_only + 3, (dark_only, with_gain)
