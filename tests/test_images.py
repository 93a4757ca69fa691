"""Per-scan images from counted events, against hand-computed cases, numpy on the file's
events, and stempy's create_stem_images."""

import h5py
import numpy as np
import pytest

from fourdstream import images
from fourdstream.detector import FRAME_COLS, FRAME_PIXELS
from fourdstream.io import open_counted
from fourdstream.sparse import CountedFrames


def _frames(per_frame, positions, masks=None):
    events = [np.array(sorted(e), np.uint32) for e in per_frame]
    counts = [len(e) for e in events]
    return CountedFrames(np.concatenate(events) if events else np.zeros(0, np.uint32),
                         np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                         np.arange(1, len(events) + 1, dtype=np.uint32), np.asarray(positions, np.int64),
                         np.asarray(masks if masks is not None else [0b1111] * len(events), np.uint8))


def px(x, y):
    return y * FRAME_COLS + x


def test_hand_computed_images_with_stempy_boundaries():
    d = images.Detectors(centre_x=100, centre_y=200, bf_radius=3, adf_inner=3, adf_outer=5)
    frames = _frames([[px(100, 200), px(103, 200), px(100, 205), px(102, 202)],   # d = 0, 3, 5, sqrt 8
                      [px(104, 200)],                                             # d = 4
                      [px(110, 200)]],                                            # frame 2 of position 1
                     positions=[1, 2, 1], masks=[0b1111, 0b1011, 0b0111])
    got = images.slab_images(frames, 0, 4, d)
    assert got["counts"].tolist() == [0, 5, 1, 0]
    assert got["bf"].tolist() == [0, 2, 0, 0]          # d = 0 and sqrt 8 < 3; d = 3 is not
    assert got["adf"].tolist() == [0, 1, 1, 0]         # d = 3 and 4 in [3, 5); d = 5 is not
    assert got["com_x"][1] == pytest.approx((0 + 3 + 0 + 2 + 10) / 5)
    assert got["com_y"][1] == pytest.approx((0 + 0 + 5 + 2 + 0) / 5)
    assert got["sector_mask"].tolist() == [0, 0b0111, 0b1011, 0]   # AND over frames; 0: no frame


def test_detectors_are_found_from_a_disc_pattern():
    yy, xx = np.mgrid[:576, :576]
    pattern = np.where((xx - 300) ** 2 + (yy - 250) ** 2 < 30 ** 2, 1000, 3).astype(np.int64)
    d = images.Detectors.find(pattern)
    assert (d.centre_x, d.centre_y) == (300, 250) and abs(d.bf_radius - 30) <= 1
    assert d.adf_inner == int(np.ceil(1.5 * d.bf_radius)) and d.adf_outer > d.adf_inner
    assert images.Detectors.find(np.zeros((576, 576))) == images.Detectors()


@pytest.fixture
def counted_file(counted_small_scan):
    return counted_small_scan


def test_stored_images_equal_numpy_on_the_files_events(counted_file):
    scan = open_counted(counted_file)
    with h5py.File(counted_file) as f:
        got, d = images.read(f)
    events, offsets, position = scan.events.astype(np.int64), scan.offsets.astype(np.int64), scan.position
    per_event = np.repeat(position, np.diff(offsets)).astype(np.int64)
    n = int(np.prod(scan.scan_shape))
    x, y = events % FRAME_COLS, events // FRAME_COLS
    d2 = (x - d.centre_x) ** 2 + (y - d.centre_y) ** 2
    counts = np.bincount(per_event, minlength=n)
    assert np.array_equal(got["counts"].ravel(), counts)
    assert np.array_equal(got["bf"].ravel(), np.bincount(per_event[d2 < d.bf_radius ** 2], minlength=n))
    adf = (d2 >= d.adf_inner ** 2) & (d2 < d.adf_outer ** 2)
    assert np.array_equal(got["adf"].ravel(), np.bincount(per_event[adf], minlength=n))
    with np.errstate(invalid="ignore"):
        com_x = np.bincount(per_event, weights=x, minlength=n) / counts - d.centre_x
    assert np.allclose(got["com_x"].ravel(), np.nan_to_num(com_x), atol=1e-4)
    assert np.array_equal(got["pattern"].ravel(), np.bincount(events, minlength=FRAME_PIXELS))
    mask = np.zeros(n, np.uint8)
    mask[position] = scan.sector_mask               # one frame per position here
    assert np.array_equal(got["sector_mask"].ravel(), mask)
    assert d == images.Detectors.find(got["pattern"])


def test_virtual_images_equal_stempys_create_stem_images(counted_file):
    stim = pytest.importorskip("stempy.image")
    sparse = open_counted(counted_file).to_stempy()
    with h5py.File(counted_file) as f:
        got, d = images.read(f)
    centre = (d.centre_x, d.centre_y)
    bf = stim.create_stem_images(sparse, 0, d.bf_radius, center=centre)[0]
    adf = stim.create_stem_images(sparse, d.adf_inner, d.adf_outer, center=centre)[0]
    # stempy's images of counted data count 65535 per event
    assert np.array_equal(bf, got["bf"].astype(np.uint64) * 65535)
    assert np.array_equal(adf, got["adf"].astype(np.uint64) * 65535)


def test_given_virtual_detectors_are_used_and_bad_ones_refused(small_scan, tmp_path):
    import subprocess
    import sys

    folder, _, _ = small_scan
    out = tmp_path / "given.h5"
    r = subprocess.run([sys.executable, "-m", "fourdstream", "count", str(folder), "-o", str(out),
                        "--virtual-detectors", "288,290,50,70,150"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        _, d = images.read(f)
    assert d == images.Detectors(288, 290, 50, 70, 150)
    r = subprocess.run([sys.executable, "-m", "fourdstream", "count", str(folder), "-o",
                        str(tmp_path / "bad.h5"), "--virtual-detectors", "288,290,50,150,70"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ADF_IN < ADF_OUT" in r.stderr
