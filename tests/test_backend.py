import numpy as np
import pytest

from fourdstream import backend


def test_cpu_is_numpy_and_auto_falls_back_with_a_reason():
    assert backend.select("cpu")[0] is np
    xp, description = backend.select("auto")
    if xp is np:
        assert "numpy" in description and ";" in description  # says why not the GPU


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


def test_cupy_counting_matches_numpy_when_a_gpu_exists():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fourdstream.counting import ElectronCounter, Thresholds
    from fourdstream.detector import ScanGeometry
    from fourdstream.simulate import Simulator

    sim = Simulator(ScanGeometry(4, 2), seed=1)
    frames, _ = sim.frames(0, 8)
    cpu = ElectronCounter(Thresholds(28, 600), sim.dark).count(frames)
    gpu = ElectronCounter(Thresholds(28, 600), sim.dark, xp=cupy).count(cupy.asarray(frames))
    assert all(np.array_equal(a, backend.to_numpy(b)) for a, b in zip(cpu, gpu))
