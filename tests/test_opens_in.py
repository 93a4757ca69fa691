"""The counted file opens where users analyse 4D-STEM, proven with the real packages:
stempy (tests/test_writer.py), ncempy, LiberTEM, py4DSTEM. Each test compares what the
tool reads with what CountedScan reads.

py4DSTEM 0.14.18 needs numpy < 2, so it lives in a virtual environment of its own
(``.venv-py4dstem``, made by ``scripts/setup.sh --test``); its test runs there.
"""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fourdstream import export, images
from fourdstream.detector import FRAME_PIXELS
from fourdstream.io import open_counted

ROOT = Path(__file__).parent.parent
PY4DSTEM_PYTHON = ROOT / ".venv-py4dstem" / "bin" / "python"


@pytest.fixture
def counted(counted_small_scan):
    return counted_small_scan


def _dense_reference(scan, bin):
    """Counts per position and binned pixel, by numpy on the events (independent of export)."""
    rows, cols = scan.frame_shape
    ref = np.zeros((*scan.scan_shape, rows // bin, cols // bin), np.int64)
    per_event = np.repeat(scan.position.astype(np.int64), np.diff(scan.offsets.astype(np.int64)))
    e = scan.events.astype(np.int64)
    np.add.at(ref, (per_event // scan.scan_shape[1], per_event % scan.scan_shape[1],
                    e // cols // bin, e % cols // bin), 1)
    return ref


def test_ncempy_reads_the_images_and_its_first_data_set_is_the_counts(counted):
    nio = pytest.importorskip("ncempy.io")
    scan = open_counted(counted)
    first = nio.read(counted)                       # what a user types
    assert first["name"] == "counts" and np.array_equal(first["data"], scan.counts_image())
    assert first["pixelName"] == ["y", "x"]
    with h5py.File(counted) as f:
        stored, _ = images.read(f)
    for k, name in enumerate(images.EMD_DATASETS):
        got = nio.read(counted, dsetNum=k)
        assert got["name"] == name and np.array_equal(got["data"], stored[name]), name
    pattern = nio.read(counted, dsetNum=images.EMD_DATASETS.index("pattern"))["data"]
    assert np.array_equal(pattern.ravel(), np.bincount(scan.events, minlength=FRAME_PIXELS))


def test_libertem_runs_udfs_on_the_counted_events_without_densifying(counted, tmp_path):
    pytest.importorskip("libertem")
    from libertem.api import Context
    from libertem.udf.masks import ApplyMasksUDF
    from libertem.udf.sum import SumUDF
    from libertem.udf.sumsigudf import SumSigUDF

    scan = open_counted(counted)
    descriptor = tmp_path / "lt" / "scan.toml"
    r = subprocess.run([sys.executable, "-m", "fourdstream", "export", str(counted), "--to", "libertem",
                        "-o", str(descriptor)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert descriptor.with_suffix(".indices").stat().st_size == 4 * scan.n_events   # the events as is
    ctx = Context.make_with("inline")
    ds = ctx.load("raw_csr", path=str(descriptor))
    assert tuple(ds.shape) == (*scan.scan_shape, 576, 576)
    with h5py.File(counted) as f:
        stored, d = images.read(f)
    yy, xx = np.mgrid[:576, :576]
    disc = (((xx - d.centre_x) ** 2 + (yy - d.centre_y) ** 2) < d.bf_radius ** 2).astype(np.float32)
    total, per_position, masked = ctx.run_udf(ds, [SumUDF(), SumSigUDF(),
                                                   ApplyMasksUDF(mask_factories=[lambda: disc])])
    assert np.array_equal(total["intensity"].data.ravel(), np.bincount(scan.events, minlength=FRAME_PIXELS))
    assert np.array_equal(per_position["intensity"].data, scan.counts_image())
    assert np.array_equal(masked["intensity"].data[..., 0], stored["bf"])   # a virtual detector


def test_a_dense_cube_that_does_not_fit_is_refused_before_allocating(counted):
    scan = open_counted(counted)
    need = int(np.prod(scan.scan_shape)) * 576 * 576 * 2
    with pytest.raises(ValueError, match=r"would take .* GB; .* bin 2 would fit"):
        export.dense(scan, 1, memory=need)        # half of it is the budget
    assert export.dense(scan, 2, memory=need).shape == (*scan.scan_shape, 288, 288)
    with pytest.raises(ValueError, match="must divide"):
        export.dense_shape(scan, 5)


@pytest.mark.skipif(not PY4DSTEM_PYTHON.exists(),
                    reason="py4DSTEM's environment .venv-py4dstem is missing: scripts/setup.sh --test "
                           "makes it (py4DSTEM 0.14.18 needs numpy < 2)")
def test_py4dstem_reads_the_exported_datacube(counted, tmp_path):
    out, data = tmp_path / "cube.h5", tmp_path / "cube.npy"
    r = subprocess.run([str(PY4DSTEM_PYTHON), "-m", "fourdstream", "export", str(counted), "--to",
                        "py4dstem", "-o", str(out), "--bin", "4"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    read = ("import json, sys, numpy, py4DSTEM\n"
            "dc = py4DSTEM.read(sys.argv[1])\n"
            "numpy.save(sys.argv[2], dc.data)\n"
            "print(json.dumps({'type': type(dc).__name__, 'version': py4DSTEM.__version__}))\n")
    r = subprocess.run([str(PY4DSTEM_PYTHON), "-c", read, str(out), str(data)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["type"] == "DataCube" and info["version"] == "0.14.18"
    assert np.array_equal(np.load(data), _dense_reference(open_counted(counted), 4))
