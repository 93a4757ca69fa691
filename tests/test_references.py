import h5py
import numpy as np
import pytest

from fourdstream.references import ReferenceError, load_reference


def test_npy_and_stack(tmp_path):
    dark = np.random.default_rng(0).uniform(0, 20, (576, 576))
    np.save(tmp_path / "dark.npy", dark)
    assert np.allclose(load_reference(str(tmp_path / "dark.npy")), dark.astype(np.float32))
    np.save(tmp_path / "stack.npy", np.stack([dark, dark + 2]))
    assert np.allclose(load_reference(str(tmp_path / "stack.npy")), dark + 1, atol=1e-5)


def test_hdf5_named_and_found_dataset(tmp_path):
    path = tmp_path / "refs.h5"
    with h5py.File(path, "w") as f:
        f["calib/gain"] = np.full((576, 576), 1.5)
        f["other"] = np.zeros(10)
    assert load_reference(f"{path}:/calib/gain", "gain")[0, 0] == 1.5
    assert load_reference(str(path), "gain")[5, 5] == 1.5   # the only frame-shaped dataset
    with pytest.raises(ReferenceError, match="no dataset"):
        load_reference(f"{path}:/nope")


def test_raw_dark_scan_is_averaged(small_scan):
    folder, frames, _ = small_scan
    assert np.allclose(load_reference(str(folder)), frames.mean(axis=0), atol=1e-3)


@pytest.mark.parametrize("array, kind, message", [
    (np.zeros((576, 575)), "dark", "shape"),
    (np.full((576, 576), np.nan), "dark", "NaN"),
    (np.zeros((576, 576)), "gain", "<= 0"),
    (-np.ones((576, 576)), "dark", "negative"),
    (np.full((576, 576), "a"), "dark", "not numeric"),
    (np.zeros((576, 576), dtype=object), "dark", "cannot be read"),
])
def test_bad_references_are_rejected(tmp_path, array, kind, message):
    np.save(tmp_path / "r.npy", array, allow_pickle=True)
    with pytest.raises(ReferenceError, match=message):
        load_reference(str(tmp_path / "r.npy"), kind)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ReferenceError, match="no such file"):
        load_reference(str(tmp_path / "missing.npy"))
    (tmp_path / "x.tif").write_bytes(b"")
    with pytest.raises(ReferenceError, match="unknown format"):
        load_reference(str(tmp_path / "x.tif"))
