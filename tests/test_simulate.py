import numpy as np
import pytest

from fourdstream.detector import ScanGeometry
from fourdstream.simulate import DetectorModel, Simulator


def test_frames_do_not_depend_on_batching(small_sim):
    whole, truth = small_sim.frames(0, 12)
    part, truth_part = small_sim.frames(7, 9)
    assert np.array_equal(whole[7:9], part)
    assert np.array_equal(truth.frame(8), truth_part.frame(1))


def test_same_seed_same_scan_other_seed_other_scan():
    g = ScanGeometry(4, 4)
    a = Simulator(g, seed=1).frames(0, 3)[0]
    assert np.array_equal(a, Simulator(g, seed=1).frames(0, 3)[0])
    assert not np.array_equal(a, Simulator(g, seed=2).frames(0, 3)[0])


def test_electron_count_follows_dose_and_lands_where_truth_says():
    g = ScanGeometry(40, 1)
    sim = Simulator(g, dose=200, seed=3, model=DetectorModel(xray_probability=0))
    sim._transmission[:] = 1.0  # uniform sample: every frame has the full dose
    frames, truth = sim.frames(0, 40)
    counts = np.diff(truth.offsets)
    assert abs(counts.mean() - 200) < 3 * np.sqrt(200 / 40)  # Poisson mean
    # Every impact pixel carries charge well above the dark + noise level.
    background = np.median(frames)
    for i in range(5):
        assert (frames[i].ravel()[truth.frame(i)] > background + 10).mean() > 0.9


def test_dark_has_sector_offsets_and_noise_matches_model():
    model = DetectorModel(xray_probability=0)
    sim = Simulator(ScanGeometry(2, 2), dose=0, seed=4, model=model)
    frames, truth = sim.frames(0, 4)
    assert len(truth.pixels) == 0
    resid = frames.astype(float) - np.rint(sim.dark)
    assert abs(resid.std() - model.read_noise_sigma) < 0.1
    sector_means = [frames[:, 144 * m:144 * (m + 1)].mean() for m in range(4)]
    offsets = np.array(model.sector_offsets)
    assert np.allclose(np.array(sector_means) - sector_means[0], offsets - offsets[0], atol=0.2)


def test_xrays_appear_at_the_configured_rate():
    sim = Simulator(ScanGeometry(100, 2), dose=0, seed=5, model=DetectorModel(xray_probability=0.5))
    frames, _ = sim.frames(0, 200)
    hits = (frames.reshape(200, -1).max(axis=1) >= 2000).mean()
    assert 0.35 < hits < 0.65


def test_disc_pattern_keeps_electrons_inside_the_disc():
    sim = Simulator(ScanGeometry(4, 4), dose=300, seed=6, pattern="disc", disc_radius=100)
    _, truth = sim.frames(0, 4)
    r, c = np.divmod(truth.pixels.astype(int), 576)
    assert np.all(np.hypot(r - 288, c - 288) <= 102)


def test_several_frames_per_position():
    g = ScanGeometry(3, 2, frames_per_position=2)
    sim = Simulator(g, seed=1)
    assert sim.n_frames == 12
    assert sim.position_of(np.arange(12)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="dose"):
        Simulator(ScanGeometry(2, 2), dose=-1)
    with pytest.raises(ValueError, match="outside"):
        Simulator(ScanGeometry(2, 2)).frames(0, 5)
