import numpy as np
import pytest

from fourdstream import detector
from fourdstream.detector import ScanGeometry, parse_scan_size


def test_v5_sectors_are_row_bands_and_v4_column_strips():
    frame = np.arange(576 * 576, dtype=np.uint32).reshape(576, 576)
    v5 = detector.split_sectors(frame, 5)
    assert [s.shape for s in v5] == [(144, 576)] * 4
    assert v5[2][0, 0] == 288 * 576  # first pixel of sector 2 is row 288, col 0
    v4 = detector.split_sectors(frame, 4)
    assert [s.shape for s in v4] == [(576, 144)] * 4
    assert v4[3][0, 0] == 432
    assert detector.SECTOR_BYTES == 165_888
    assert detector.record_dtype(5).itemsize == 165_904


def test_unknown_version_and_module_are_rejected():
    with pytest.raises(ValueError, match="version 3"):
        detector.sector_shape(3)
    with pytest.raises(ValueError, match="module"):
        detector.sector_slice(4)


def test_scan_geometry_positions_and_flyback():
    g = ScanGeometry.from_probe_grid(512, 512, flyback=True, frames_per_position=2)
    assert (g.width, g.height, g.n_positions, g.n_frames) == (513, 512, 513 * 512, 2 * 513 * 512)
    assert g.position(5, 3) == 3 * 513 + 5
    x, y = g.xy(np.array([0, 513, 514 * 2]))
    assert x.tolist() == [0, 0, 2] and y.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="65535"):
        ScanGeometry(70000, 2)


@pytest.mark.parametrize("text, expected", [("64x64", (64, 64)), ("513X512", (513, 512))])
def test_parse_scan_size(text, expected):
    assert parse_scan_size(text) == expected


@pytest.mark.parametrize("text", ["64", "ax3", "0x5", "3x4x5"])
def test_parse_scan_size_rejects(text):
    with pytest.raises(ValueError):
        parse_scan_size(text)
