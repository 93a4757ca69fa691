"""The collective writer and the counted file: real mpiexec runs, stempy interop, faults."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from expected import DROPPED, GEOMETRY, NO_EVENTS, PARTIAL, expected_frames
from fourdstream import images
from fourdstream.counting import ElectronCounter, Thresholds
from fourdstream.detector import ScanGeometry
from fourdstream.io import open_counted
from fourdstream.launch import mpi_environment, mpiexec_command
from fourdstream.simulate import Simulator, write_scan

from conftest import run_mpi


def run_count(n, raw, out, *args, timeout=120):
    cmd = mpiexec_command(n, [sys.executable, "-m", "fourdstream", "count", str(raw), "-o", str(out),
                              *map(str, args)])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_environment())


def check_expected_scan(path):
    scan = open_counted(path)
    want = expected_frames()
    fpp = GEOMETRY.frames_per_position
    assert scan.scan_shape == (5, 7) and scan.frames_per_position == fpp
    assert scan.n_slots == GEOMETRY.n_frames and scan.n_events == want.n_events
    for k in range(scan.n_slots):
        if k == DROPPED:
            assert scan.sector_mask[k] == 0 and len(scan.slot(k // fpp, k % fpp)) == 0
            continue
        i = k - (k > DROPPED)
        assert np.array_equal(scan.slot(k // fpp, k % fpp), want.frame(i)), k
        assert scan.frame_number[k] == want.frame_number[i] and scan.position[k] == k // fpp
    assert scan.sector_mask[PARTIAL] == 0b0111 and scan.sector_mask[NO_EVENTS] == 0b1111
    assert scan.loss_summary() == {"slots": 70, "complete": 68, "incomplete": 1, "empty": 1}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_frames_anywhere_on_any_ranks_give_the_same_file(tmp_path, n):
    out = tmp_path / "scan.h5"
    ranks = run_mpi(n, "mpi_write.py", "arbitrary", str(out))
    assert all(r["parallel"] for r in ranks)
    if n > 1:
        assert ranks[-1]["held"] == 0  # a rank with nothing to write took part
    check_expected_scan(out)


def test_serial_h5py_fallback_writes_the_same_file(tmp_path):
    out = tmp_path / "scan.h5"
    ranks = run_mpi(3, "mpi_write.py", "serial", str(out))
    assert not any(r["parallel"] for r in ranks)
    check_expected_scan(out)


def test_stempy_opens_our_file_as_it_is(tmp_path):
    sio = pytest.importorskip("stempy.io")
    out = tmp_path / "scan.h5"
    run_mpi(2, "mpi_write.py", "arbitrary", str(out))
    array = sio.SparseArray.from_hdf5(str(out))
    assert array.scan_shape == [5, 7] or tuple(array.scan_shape) == (5, 7)
    assert tuple(array.frame_shape) == (576, 576) and array.data.shape == (35, 2)
    ours = open_counted(out)
    for position in range(35):
        for j in range(2):
            assert np.array_equal(array.data[position, j], ours.slot(position, j))
    cropped = sio.SparseArray.from_hdf5(str(out), keep_flyback=False)
    assert tuple(cropped.scan_shape) == (5, 6)
    assert np.array_equal(cropped.data[6, 1], ours.slot(7, 1))  # row 1, column 0


@pytest.fixture(scope="module")
def raw_scans(tmp_path_factory):
    """Raw scans with 1 and 2 frames per position, with and without flyback."""
    out = {}
    for fpp in (1, 2):
        for flyback in (True, False):
            g = ScanGeometry.from_probe_grid(5, 4, flyback=flyback, frames_per_position=fpp)
            sim = Simulator(g, dose=120, seed=fpp + 10 * flyback)
            folder = tmp_path_factory.mktemp(f"raw{fpp}{flyback}")
            write_scan(sim, folder, scan_number=3, n_dst=2, frames_per_file=7)
            out[fpp, flyback] = (folder, g, sim.frames(0, sim.n_frames)[0])
    return out


@pytest.mark.parametrize("fpp", [1, 2])
@pytest.mark.parametrize("flyback", [True, False])
def test_counted_file_opens_in_stempy_with_the_right_shape(raw_scans, tmp_path, fpp, flyback):
    sio = pytest.importorskip("stempy.io")
    folder, g, frames = raw_scans[fpp, flyback]
    out = tmp_path / "c.h5"
    proc = run_count(2, folder, out, "--bg", 28, "--xr", 700,
                     "--flyback" if flyback else "--no-flyback")
    assert proc.returncode == 0, proc.stderr
    array = sio.SparseArray.from_hdf5(str(out))
    assert tuple(array.scan_shape) == (4, 5 + flyback) and array.data.shape[1] == fpp
    events, offsets = ElectronCounter(Thresholds(28, 700)).count(frames)
    for k in range(len(frames)):  # frame k of the simulator is at position k // fpp
        assert np.array_equal(array.data[k // fpp, k % fpp], events[offsets[k]:offsets[k + 1]])
    meta = open_counted(out).metadata["fourdstream"]
    assert meta["flyback"] == flyback and meta["frames_expected"] == len(frames)


def test_count_gives_identical_files_on_1_to_4_ranks_and_threads(raw_scans, tmp_path):
    folder, _, frames = raw_scans[2, True]
    files = {}
    threads = {1: 1, 2: 2, 3: 1, 4: 3, "1x4": 4}
    for n, t in threads.items():
        files[n] = tmp_path / f"c{n}.h5"
        proc = run_count(int(str(n)[0]), folder, files[n], "--samples", 100, "--sample-frames", 8,
                         "--seed", 4, "--threads", t, "--batch-size", 3)
        assert proc.returncode == 0, proc.stderr
    one = open_counted(files[1])
    ec = one.metadata["electron_counting"]
    assert list(ec["sample_frame_numbers"]) == list(range(1, 9)) and ec["seed"] == 4
    # One process counting the same frames with the file's thresholds gives the same events.
    events, offsets = ElectronCounter(Thresholds(ec["background_threshold"],
                                                 ec["x_ray_threshold"])).count(frames)
    assert np.array_equal(one.events, events) and np.array_equal(one.offsets, offsets)
    for n in (2, 3, 4, "1x4"):
        other = open_counted(files[n])
        assert other.metadata["fourdstream"]["ranks"] == int(str(n)[0])
        assert other.metadata["fourdstream"]["threads_per_rank"] == threads[n]
        theirs = other.metadata["electron_counting"]   # thresholds agree bit for bit
        assert theirs.keys() == ec.keys()
        assert all(np.array_equal(theirs[k], ec[k]) for k in ec), n
        for name in ("events", "offsets", "frame_number", "position", "sector_mask"):
            assert np.array_equal(getattr(other, name), getattr(one, name)), (n, name)
        with h5py.File(files[1]) as a, h5py.File(files[n]) as b:   # and the same images
            (ia, da), (ib, db) = images.read(a), images.read(b)
            assert da == db and all(np.array_equal(ia[k], ib[k]) for k in ia), n


def test_our_reader_opens_a_file_written_by_stempy(tmp_path):
    sio = pytest.importorskip("stempy.io")
    out = tmp_path / "ours.h5"
    run_mpi(1, "mpi_write.py", "arbitrary", str(out))
    ours = open_counted(out)
    theirs_path = tmp_path / "stempy.h5"
    sio.save_electron_counts(str(theirs_path), ours.to_stempy())
    theirs = open_counted(theirs_path)
    assert theirs.source == "stempy v3" and theirs.scan_shape == (5, 7)
    assert theirs.frames_per_position == 2
    assert np.array_equal(theirs.events, ours.events) and np.array_equal(theirs.offsets, ours.offsets)
    assert np.array_equal(theirs.counts_image(), ours.counts_image())


def test_killed_rank_mid_write_leaves_no_file_and_no_hang(tmp_path):
    out = tmp_path / "scan.h5"
    cmd = mpiexec_command(3, [sys.executable, "mpi_write.py", "kill", str(out)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=mpi_environment(),
                          cwd=str(__import__("pathlib").Path(__file__).parent))
    assert proc.returncode != 0
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".partial")] == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 kB tmpfs (needs root and mount); skipped where it cannot be made."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clear_error_on_every_rank(raw_scans, tiny_disk):
    folder, _, _ = raw_scans[2, True]
    out = tiny_disk / "c.h5"
    proc = run_count(2, folder, out, "--bg", 1, "--xr", 700)   # low bg: many events
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(ours) == 1 and "not enough space" in ours[0]  # once, from rank 0
    assert list(tiny_disk.iterdir()) == []


def test_disk_filling_up_after_the_estimate_is_caught_before_collective_io(tiny_disk, monkeypatch):
    from fourdstream import writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 40}))
    heavy = expected_frames()
    heavy.offsets = heavy.offsets * 200               # ~1.6 MB of events: more than the disk
    heavy.events = np.zeros(int(heavy.offsets[-1]), np.uint32)
    with pytest.raises(writer.WriteError, match="cannot reserve .* No space left"):
        writer.write_counted_scan(tiny_disk / "x.h5", heavy, GEOMETRY, electron_counting={},
                                  provenance={})
    assert list(tiny_disk.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(raw_scans, tmp_path):
    folder, _, _ = raw_scans[1, True]
    out = tmp_path / "c.h5"
    out.write_bytes(b"precious")
    proc = run_count(2, folder, out, "--bg", 28, "--xr", 700)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    assert out.read_bytes() == b"precious"
    proc = run_count(2, folder, out, "--bg", 28, "--xr", 700, "--overwrite")
    assert proc.returncode == 0 and h5py.is_hdf5(out)


def test_missing_output_folder_is_a_clear_error(raw_scans, tmp_path):
    folder, _, _ = raw_scans[1, True]
    proc = run_count(1, folder, tmp_path / "nope" / "c.h5", "--bg", 28, "--xr", 700)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


@pytest.mark.parametrize("per_frame", [0, 3])
def test_frames_with_equal_event_counts_are_written(tmp_path, per_frame):
    """Equal-length vlen pieces are a numpy/h5py trap (they broadcast as a 2-D array)."""
    from fourdstream.sparse import CountedFrames
    from fourdstream.writer import write_counted_scan

    g = ScanGeometry(4, 3)
    n = g.n_frames
    events = np.tile(np.arange(per_frame, dtype=np.uint32) * 7, n)
    counted = CountedFrames(events, np.arange(n + 1, dtype=np.int64) * per_frame,
                            np.arange(n, dtype=np.uint32), np.arange(n), np.full(n, 15, np.uint8))
    out = tmp_path / "even.h5"
    write_counted_scan(out, counted, g, electron_counting={}, provenance={})
    scan = open_counted(out)
    assert scan.n_events == n * per_frame
    assert all(np.array_equal(scan.slot(p), events[:per_frame]) for p in range(n))
    with h5py.File(out) as f:
        assert [len(x) for x in f["electron_events/frames"][()]] == [per_frame] * n


def test_bad_input_under_mpi_is_one_error_and_a_clean_exit(raw_scans, tmp_path):
    folder, _, _ = raw_scans[1, True]
    proc = run_count(3, folder, tmp_path / "c.h5", "--dark", tmp_path / "missing.npy")
    ours = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert proc.returncode == 1 and len(ours) == 1 and "missing.npy: no such file" in ours[0]
    assert "MPI_ABORT" not in proc.stderr and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("events_per_step", [16 * 2**20, 50, 1])
def test_stempy_view_written_from_pointers_equals_the_object_array_way(tmp_path, monkeypatch,
                                                                        events_per_step):
    """The vlen view is written as (length, pointer) pairs into the events buffer, a bounded
    number of events at a time (one frame larger than the bound is one step); frame by frame
    it holds what h5py writes from one numpy array per frame (the old way)."""
    import h5py
    from mpi4py import MPI

    from expected import GEOMETRY, NO_EVENTS, PARTIAL, expected_frames
    from fourdstream import writer
    from fourdstream.io import events_as_objects
    from fourdstream.writer import write_counted_scan

    monkeypatch.setattr(writer, "VLEN_EVENTS", events_per_step)
    frames = expected_frames()
    path = tmp_path / "view.h5"
    write_counted_scan(path, frames, GEOMETRY, electron_counting={}, provenance={},
                       comm=MPI.COMM_SELF)
    scan = open_counted(path)
    old_way = tmp_path / "old.h5"
    with h5py.File(old_way, "w") as f:
        d = f.create_dataset("frames", (scan.n_slots,), dtype=h5py.vlen_dtype(np.uint32))
        d.write_direct(events_as_objects(scan.events, scan.offsets))
    with h5py.File(path) as new, h5py.File(old_way) as old:
        new_view, old_view = new["electron_events/frames"][()], old["frames"][()]
    assert len(new_view) == len(old_view) == GEOMETRY.n_frames
    for k, (a, b) in enumerate(zip(new_view, old_view)):
        assert a.dtype == b.dtype == np.uint32 and np.array_equal(a, b), k
    assert len(new_view[NO_EVENTS]) == 0 and scan.sector_mask[PARTIAL] == 0b0111
    # ... and what stempy reads is the expected frames, slot for slot.
    for i in range(len(frames)):
        k = int(frames.position[i]) * 2 + int(frames.frame_number[i] - 100) % 2
        assert np.array_equal(new_view[k], frames.frame(i)), i


@pytest.mark.parametrize("step", ["redistribute", "scan_images", "_create_file", "_write_collective",
                                  "_write_vlen", "_write_attrs"])
def test_a_failure_in_any_step_leaves_no_file_under_the_final_name(tmp_path, monkeypatch, step):
    from mpi4py import MPI

    from expected import GEOMETRY, expected_frames
    from fourdstream import writer

    def broken(*args, **kwargs):
        raise OSError(f"injected failure in {step}")

    monkeypatch.setattr(writer, step, broken)
    with pytest.raises(Exception, match="injected failure"):
        writer.write_counted_scan(tmp_path / "scan.h5", expected_frames(), GEOMETRY,
                                  electron_counting={}, provenance={}, comm=MPI.COMM_SELF)
    assert list(tmp_path.iterdir()) == []     # neither the file nor its temporary


def test_ranks_sleep_while_rank_0_finishes_the_file_alone():
    """While rank 0 writes the stempy view, the other ranks wait in on_root(patient=True):
    asleep, where MPI's own wait spins (a second of CPU per second) and, with more ranks
    than cores, takes the core rank 0 needs."""
    patient = run_mpi(3, "mpi_patient.py", "patient")
    assert all(r["result"] == "done" and r["wall"] >= 0.95 for r in patient)
    assert all(r["cpu"] < 0.3 for r in patient[1:]), patient
    spinning = run_mpi(3, "mpi_patient.py", "mpi")
    assert all(r["result"] == "done" for r in spinning)
    assert sum(r["cpu"] for r in spinning[1:]) > 0.5, spinning   # what the patient wait saves
