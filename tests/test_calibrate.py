import numpy as np
import pytest
from scipy.optimize import curve_fit

from fourdstream.calibrate import CalibrationError, calibrate, plan_samples
from fourdstream.counting import ElectronCounter
from fourdstream.detector import ScanGeometry
from fourdstream.simulate import Simulator

from conftest import run_mpi


@pytest.fixture(scope="module")
def samples():
    sim = Simulator(ScanGeometry(30, 1), dose=150, seed=2, pattern="disc")
    frames, _ = sim.frames(0, 30)
    chosen, weights = plan_samples(sim.frame_numbers(0, 30), np.ones(30, bool), seed=7)
    values = ElectronCounter().values(frames)
    return [(int(f), int(w), values[int(f) - 1]) for f, w in zip(chosen, weights)]


def test_plan_draws_from_first_complete_frames_deterministically():
    fn = np.arange(100, 0, -1)  # any order in, lowest frame numbers used
    complete = fn % 3 != 0
    chosen, weights = plan_samples(fn, complete, number_of_samples=500, sample_frames=10, seed=1)
    assert set(chosen) <= {1, 2, 4, 5, 7, 8, 10, 11, 13, 14} and weights.sum() == 500
    again = plan_samples(fn, complete, number_of_samples=500, sample_frames=10, seed=1)
    assert np.array_equal(chosen, again[0]) and np.array_equal(weights, again[1])
    other = plan_samples(fn, complete, number_of_samples=500, sample_frames=10, seed=2)
    assert not np.array_equal(weights, other[1])
    with pytest.raises(CalibrationError, match="no complete frame"):
        plan_samples(fn, np.zeros(100, bool))


def test_thresholds_land_where_a_direct_fit_of_the_same_samples_does(samples):
    cal = calibrate(samples, number_of_samples=1200, seed=7)
    # Independent pooled statistics and fit: numpy weighted moments, numpy
    # histogram, scipy curve_fit.
    values = np.concatenate([v.ravel() for _, _, v in samples]).astype(np.float64)
    weights = np.concatenate([np.full(v.size, w) for _, w, v in samples])
    mean = np.average(values, weights=weights)
    std = np.sqrt(np.average((values - mean) ** 2, weights=weights) * weights.sum() / (weights.sum() - 1))
    assert cal.mean == pytest.approx(mean, rel=1e-12)
    assert cal.std_dev == pytest.approx(std, rel=1e-9)
    assert cal.x_ray_threshold == pytest.approx(mean + 175 * std, rel=1e-9)
    edges = np.arange(values.min(), values.max() + 2)
    hist, _ = np.histogram(values, bins=edges, weights=weights)
    gauss = lambda x, a, mu, s: a * np.exp(-0.5 * ((x - mu) / s) ** 2)
    (a, mu, s), _ = curve_fit(gauss, edges[:-1], hist, p0=(hist.max(), mean, std))
    assert abs(cal.background_threshold - (mu + 4 * abs(s))) < 0.5
    assert 20 < cal.background_threshold < 40  # NCEM-like: ~28.5 ADU on real data
    assert cal.number_of_samples == 1200 and cal.seed == 7


def test_same_inputs_same_thresholds_bit_for_bit(samples):
    a = calibrate(samples, number_of_samples=1200, seed=7)
    b = calibrate(list(reversed(samples)), number_of_samples=1200, seed=7)
    assert a == b


def test_constant_frames_are_a_clear_error():
    flat = [(1, 5, np.full((576, 576), 10, np.int32))]
    with pytest.raises(CalibrationError, match="sample frames 1 .*constant"):
        calibrate(flat, number_of_samples=5, seed=0)


def test_a_fit_that_does_not_converge_is_an_error_naming_the_frames():
    # Two far-apart spikes and nothing else: no Gaussian describes this.
    v = np.zeros((576, 576), np.int32)
    v[:, 288:] = 3000
    with pytest.raises(CalibrationError, match="did not converge for sample frames 4"):
        calibrate([(4, 1, v)], number_of_samples=1, seed=0)


def test_mpi_ranks_splitting_the_samples_agree_bit_for_bit():
    results = {n: run_mpi(n, "mpi_calibrate.py") for n in (1, 2, 4)}
    reference = results[1][0]
    for n, ranks in results.items():
        held = sorted(f for r in ranks for f in r["held"])
        assert held == reference["held"]  # every sample frame held exactly once
        if n > 1:
            assert all(len(r["held"]) < len(held) for r in ranks)  # really split
        for r in ranks:
            for key in ("bg", "xr", "mean", "variance", "bins", "frames"):
                assert r[key] == reference[key], (n, r["rank"], key)


def test_calibration_does_not_import_scipy():
    """The fit is written in numpy: calibrating costs no scipy import (0.3 s)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from fourdstream.calibrate import calibrate; "
            "rng = np.random.default_rng(1); "
            "s = [(k, 60, rng.normal(12, 3, (64, 64)) + (rng.random((64, 64)) < 0.01) * 150) "
            "for k in range(20)]; "
            "c = calibrate(s, number_of_samples=1200, seed=1); "
            "print(round(c.background_threshold), 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    bg, imported = out.stdout.split()
    assert imported == "False" and 20 < int(bg) < 30
