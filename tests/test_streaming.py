"""The streaming pipeline end to end: senders -> mpiexec receiver ranks -> files."""

import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fourdstream import images
from fourdstream.calibrate import calibrate, plan_samples
from fourdstream.counting import ElectronCounter, Thresholds
from fourdstream.detector import FRAME_PIXELS, ScanGeometry, parse_scan_size, sector_slice
from fourdstream.io import open_counted
from fourdstream.simulate import Simulator
from fourdstream.transport import free_port_block

SCAN = "12x8"       # 13x8 positions with the flyback column: 104 frames
SEED = 3


def simulated(size=SCAN, seed=SEED):
    g = ScanGeometry.from_probe_grid(*parse_scan_size(size))
    return Simulator(g, dose=150, seed=seed, pattern="disc").frames(0, g.n_frames)[0]


def offline(frames, bg, xr, missing=None):
    """Events counted in this process; ``missing`` = {frame index: modules zeroed}."""
    frames = frames.copy()
    for k, modules in (missing or {}).items():
        for m in modules:
            frames[(k,) + sector_slice(m)] = 0
    return ElectronCounter(Thresholds(bg, xr)).count(frames)


def send_all(session, *args, skip=()):
    for m in range(4):
        if m not in skip:
            session.send(m, "--simulate", SCAN, "--seed", SEED, "--pool-frames", 0, *args)


def offline_calibration(frames):
    """The offline count's calibration of ``frames`` (seed 0, the first 20 frames)."""
    chosen, weights = plan_samples(np.arange(1, len(frames) + 1), np.ones(len(frames), bool), seed=0)
    values = ElectronCounter().values(frames)
    return calibrate([(int(f), int(w), values[f - 1]) for f, w in zip(chosen, weights)],
                     number_of_samples=1200, seed=0)


def test_a_module_that_starts_late_does_not_change_the_thresholds(stream_session):
    """Pools fill with incomplete frames while module 3 is late; the ranks still wait for the
    scan's first complete frames and calibrate exactly as the offline count does."""
    s = stream_session(2, "--scans", 1, "--window", 16, "--batch-size", 4)
    start = time.time() + 2.0
    for m in range(4):
        s.send(m, "--simulate", SCAN, "--seed", SEED, "--pool-frames", 0, "--hwm", 4,
               "--start-at", start + (1.5 if m == 3 else 0.0))
    rc, output, (summary,) = s.wait()
    assert rc == 0, output
    cal = offline_calibration(simulated())
    ec = open_counted(summary["path"]).metadata["electron_counting"]
    assert list(ec["sample_frame_numbers"]) == list(cal.sample_frame_numbers)
    assert ec["x_ray_threshold"] == cal.x_ray_threshold
    assert summary["complete"] == 104


def test_the_scan_time_starts_at_its_first_sector_not_at_the_senders_begin(stream_session):
    """Senders announce a scan (``begin``) as they start, then wait for ``--start-at``: the
    summary's seconds (and so its frames/s) run from the first sector sent, so the wait
    is not in them."""
    s = stream_session(1, "--scans", 1, "--bg", 28, "--xr", 700)
    start = time.time() + 8.0        # the senders start in 1-4 s (numba's cache cold), then wait
    for m in range(4):
        s.send(m, "--simulate", SCAN, "--seed", SEED, "--pool-frames", 0, "--start-at", start)
    rc, output, (summary,) = s.wait()
    assert rc == 0, output
    timings = open_counted(summary["path"]).metadata["fourdstream"]["timings"]
    assert timings["first_message"] < start - 1.0          # the begins, seconds early
    assert start <= timings["first_send"] < timings["last_message"]
    assert 0 < summary["seconds"] <= time.time() - start


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_two_scans_equal_offline_counting_including_thresholds(stream_session, ranks):
    s = stream_session(ranks, "--scans", 2)
    send_all(s, "--scans", 2)
    rc, output, summaries = s.wait()
    assert rc == 0, output
    assert [x["scan"] for x in summaries] == [1, 2]
    frames = simulated()
    cal = offline_calibration(frames)   # the same frames, the same settings
    events, offsets = offline(frames, cal.background_threshold, cal.x_ray_threshold)
    for summary in summaries:
        scan = open_counted(summary["path"])
        ec = scan.metadata["electron_counting"]
        assert ec["background_threshold"] == cal.background_threshold
        assert ec["x_ray_threshold"] == cal.x_ray_threshold
        assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)
        assert scan.loss_summary()["complete"] == 104
        # The summed pattern each rank kept while counting is the pattern of the file's events.
        with h5py.File(summary["path"]) as f:
            stored, _ = images.read(f)
        assert np.array_equal(stored["pattern"].ravel(), np.bincount(events, minlength=FRAME_PIXELS))
        meta = scan.metadata["fourdstream"]
        assert meta["ranks"] == ranks and meta["frames_missing"] == 0 and meta["closed_by"] == "end"
        # Where the time went from the last frame received to the file closed, step by step.
        steps = dict(meta["turnaround"])
        latency = steps.pop("latency_seconds")
        order = ["counting", "decision", "writer_queue", "gather", "redistribute", "images", "prepare",
                 "collective_write", "stempy_view", "metadata"]
        assert set(steps) == set(order) and list(summary["steps"]) == order + ["rename"]
        assert all(v >= 0 for v in steps.values()) and abs(sum(steps.values()) - latency) <= 1e-6
        assert abs(summary["latency_received"] - latency) <= 0.1 * summary["latency_received"] + 0.005
        assert summary["steps"]["rename"] >= 0
        # Every rank stayed within the memory bound of `receive --help`.
        assert len(summary["peak_rss_mb"]) == ranks
        assert max(summary["peak_rss_mb"]) <= summary["memory_bound_mb"], summary["peak_rss_mb"]


def test_faults_are_counted_and_the_rest_of_the_scan_is_fine(stream_session):
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700)
    send_all(s, skip=(2,))
    s.script("faulty_sender.py", 2, SCAN, SEED, "drop:5", "dup:7", "swap:10", "outside:13",
             "short:15", "garbage:20")
    rc, output, (summary,) = s.wait()
    assert rc == 0, output
    scan = open_counted(summary["path"])
    meta = scan.metadata["fourdstream"]
    broken = {4: [2], 12: [2], 14: [2], 19: [2]}     # frame index -> modules that never arrived
    events, offsets = offline(simulated(), 28, 700, broken)
    assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)
    for k in range(104):
        assert scan.sector_mask[k] == (0b1011 if k in broken else 0b1111), k
    assert (meta["frames_complete"], meta["frames_incomplete"], meta["frames_missing"]) == (100, 4, 0)
    assert meta["sectors_duplicate"] == 1                  # dup:7
    assert meta["messages_malformed"] == 2                 # outside:13, short:15
    assert meta["messages_lost"] == 1                      # garbage:20 never arrived as scan 1's
    assert "1 malformed" in output                         # ... and is reported for the session
    assert meta["sectors_received"] == 4 * 104 - 4         # drop, outside, short, garbage


def test_killed_sender_closes_the_scan_by_timeout_with_the_loss_reported(stream_session):
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700, "--timeout", 2)
    send_all(s, skip=(1,))
    s.script("faulty_sender.py", 1, SCAN, SEED, "die:60")
    t0 = time.time()
    rc, output, (summary,) = s.wait(timeout=60)
    assert rc == 0, output
    assert time.time() - t0 < 30
    scan = open_counted(summary["path"])
    meta = scan.metadata["fourdstream"]
    assert meta["closed_by"] == "timeout" and "no message on any rank for 2 s" in output
    received_1 = (scan.sector_mask & 0b0010) > 0
    assert received_1[:50].all() and not received_1[59:].any()   # it died before frame 60
    assert meta["frames_complete"] + meta["frames_incomplete"] == 104 and meta["frames_incomplete"] >= 45
    events, offsets = offline(simulated(), 28, 700, {k: [1] for k in np.flatnonzero(~received_1)})
    assert np.array_equal(scan.events, events)


@pytest.mark.parametrize("send_timeout", [10.0, 0.02])
def test_slow_rank_holds_back_senders_and_nothing_is_unaccounted(stream_session, send_timeout,
                                                                 monkeypatch):
    # Each sender's share for rank 1 (396 of 792 frames: 66 MB) is more than the loopback
    # connection can hold (Linux lets a socket's receive buffer grow to tcp_rmem's maximum,
    # 32 MB here): whatever the buffers, the senders wait on rank 1 (with 104 frames, 8.6 MB
    # a sender, they once never waited 20 ms and dropped nothing).
    scan = "32x24"
    n = ScanGeometry.from_probe_grid(*parse_scan_size(scan)).n_frames
    monkeypatch.setenv("FOURDSTREAM_TEST_SLOW", "0.05")   # rank 1: 4 frames per 0.05 s
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700, "--window", 8, "--batch-size", 4,
                       "--hwm", 2, "--timeout", 3, script="slow_receive.py")
    for m in range(4):
        s.send(m, "--simulate", scan, "--seed", SEED, "--pool-frames", 0, "--hwm", 2,
               "--send-timeout", send_timeout)
    # Senders that dropped messages say so and exit with status 3.
    rc, output, (summary,) = s.wait(timeout=90, sender_status=0 if send_timeout > 1 else (0, 3))
    assert rc == 0, output
    meta = open_counted(summary["path"]).metadata["fourdstream"]
    dropped = meta["messages_dropped_by_senders"]
    if send_timeout > 1:   # blocking policy: the slow rank slows the senders, loses nothing
        assert dropped == 0 and meta["frames_complete"] == n and meta["frames_evicted"] == 0
    else:                  # senders gave up: every dropped message is reported
        assert dropped > 0
    # Every sector message is accounted for: received, dropped by a sender, or lost (known
    # from the sender's end message; a sender whose end could not be delivered says so) ...
    accounted = meta["messages_received"] + dropped + meta["messages_lost"]
    if any("end of scan not delivered" in o for o in s.sender_outputs):
        assert accounted <= 4 * n, (meta, output)
    else:
        assert accounted == 4 * n, (meta, output)
    # ... and every received one was used or counted as late/duplicate/conflicting/malformed.
    assert meta["messages_received"] == meta["sectors_received"] + meta["sectors_late"] + \
        meta["sectors_duplicate"] + meta["sectors_conflicting"] + meta["messages_malformed"]
    assert meta["frames_complete"] + meta["frames_incomplete"] + meta["frames_missing"] == n


def test_a_scan_much_longer_than_the_timeout_arrives_whole_on_4_ranks(stream_session):
    """Rate-limited senders: each rank waits ~5 s between its chunks, the timeout is 2 s.
    Ranks agree that the scan is alive while any of them receives."""
    s = stream_session(4, "--scans", 1, "--bg", 28, "--xr", 700, "--timeout", 2)
    t0 = time.time()
    send_all(s, "--rate", 12)             # 104 frames at 12 frames/s: ~9 s
    rc, output, (summary,) = s.wait(timeout=90)
    assert rc == 0, output
    assert time.time() - t0 > 4 * 2
    meta = open_counted(summary["path"]).metadata["fourdstream"]
    assert meta["closed_by"] == "end" and meta["frames_complete"] == 104, output
    assert meta["frames_missing"] == 0 and "no message" not in output
    events, offsets = offline(simulated(), 28, 700)
    scan = open_counted(summary["path"])
    assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)


def _processes_mentioning(text: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_senders_give_up_within_the_send_timeout_when_the_receiver_job_dies(stream_session):
    s = stream_session(2, "--bg", 28, "--xr", 700)
    for m in range(4):
        s.send(m, "--simulate", "64x64", "--rate", 200, "--send-timeout", 2)   # ~20 s of scan
    time.sleep(3)
    assert all(p.poll() is None for p in s.senders)          # mid-scan
    job = _processes_mentioning(f"receive -o {s.out}")
    assert job
    for pid in job:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()
    for p in s.senders:
        out, _ = p.communicate(timeout=30)
        assert time.time() - killed < 2 + 5, out
        assert p.returncode == 3, out
        assert "sectors sent" in out and "DROPPED" in out and "no receiver rank took a message" in out
    s.receiver.wait(timeout=10)
    assert _processes_mentioning(str(s.out)) == []


def _free_port() -> int:
    """A base port with 32 free ports above it (see fourdstream.transport.free_port_block)."""
    return free_port_block(32)


@pytest.mark.parametrize("fields", [9, 8])
def test_plain_wire_format_producer_through_the_gateway(stream_session, tmp_path, fields):
    frames = simulated("6x4")
    np.save(tmp_path / "frames.npy", frames)
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700)
    producers = f"tcp://127.0.0.1:{_free_port()}"
    gateway = subprocess.Popen([sys.executable, "-m", "fourdstream", "gateway", "--producers",
                                producers, "--endpoints-file", str(s.endpoints), "--scans", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s.senders.append(gateway)
    for m in range(4):
        s._start([sys.executable, str(__import__("pathlib").Path(__file__).parent / "plain_producer.py"),
                  producers, str(tmp_path / "frames.npy"), "7", "4", str(fields), str(m)])
    rc, output, (summary,) = s.wait(timeout=90)
    assert rc == 0, output
    scan = open_counted(summary["path"])
    events, offsets = offline(frames, 28, 700)
    assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)
    assert scan.metadata["fourdstream"]["frames_complete"] == 28


def test_sigterm_writes_the_scan_in_flight_and_exits_0(stream_session):
    s = stream_session(2, "--bg", 28, "--xr", 700, "--timeout", 60)
    send_all(s)
    for m in range(4):     # scan 2: every module stops after frame 40, no end message
        s.script("faulty_sender.py", m, SCAN, SEED, "scan=2", "die:41")
    s.wait(senders_only=True)
    deadline = time.time() + 30
    while not (s.out / "scan0000000001.h5").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)        # let scan 2's sectors arrive
    s.signal_rank(signal.SIGTERM)        # one rank is told; it stops the others
    rc, output, summaries = s.wait(timeout=60)
    assert rc == 0, output
    assert [x["scan"] for x in summaries] == [1, 2]
    second = open_counted(summaries[-1]["path"])
    meta = second.metadata["fourdstream"]
    assert meta["closed_by"] == "shutdown"
    assert meta["frames_complete"] == 40 and meta["frames_missing"] == 64


def test_demo_streams_a_scan_into_a_file_and_says_how_to_open_it(tmp_path):
    from click.testing import CliRunner

    from fourdstream.cli import main

    r = CliRunner().invoke(main, ["demo", "--scan", "6x4", "--ranks", "2", "--output",
                                  str(tmp_path / "demo"), "--bg", "28", "--xr", "700"])
    assert r.exit_code == 0, r.output
    path = tmp_path / "demo" / "scan0000000001.h5"
    for words in ("28 of 28 (28 complete, 0 incomplete, 0 missing)", "(fixed)", "loss          none",
                  "frames/s", "from the last frame sent to the file closed", f"inspect {path}"):
        assert words in r.output, words
    events, offsets = offline(simulated("6x4", seed=0), 28, 700)
    assert np.array_equal(open_counted(path).events, events)
    # A second run keeps the first file and writes a new one.
    r = CliRunner().invoke(main, ["demo", "--scan", "6x4", "--output", str(tmp_path / "demo"),
                                  "--bg", "28", "--xr", "700"])
    assert r.exit_code == 0 and (tmp_path / "demo" / "scan0000000001.1.h5").exists()


@pytest.mark.parametrize("missing,incomplete", [(1, 0), (0, 3)])
def test_the_demo_fails_with_one_line_when_a_frame_is_missing_or_incomplete(missing, incomplete):
    from fourdstream.demo import DemoError, check_whole

    whole = {"missing": 0, "incomplete": 0, "expected": 104, "path": "scan.h5"}
    assert check_whole(whole) is whole
    with pytest.raises(DemoError, match=f"{missing} frames missing and {incomplete} incomplete of 104"):
        check_whole(dict(whole, missing=missing, incomplete=incomplete))


def test_replayed_raw_files_through_binding_senders_equal_the_offline_file(tmp_path):
    """Replay source, senders that bind (ranks connect), thresholds from a calibration file."""
    from fourdstream.launch import mpi_environment, mpiexec_command
    from fourdstream.simulate import write_scan

    g = ScanGeometry.from_probe_grid(*parse_scan_size(SCAN))
    raw = tmp_path / "raw"
    write_scan(Simulator(g, dose=150, seed=SEED, pattern="disc"), raw, scan_number=7, n_dst=2,
               frames_per_file=30)
    offline_file = tmp_path / "offline.h5"
    proc = subprocess.run(mpiexec_command(2, [sys.executable, "-m", "fourdstream", "count", str(raw),
                                              "-o", str(offline_file)]),
                          env=mpi_environment(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    base = _free_port()
    senders = [subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--module", str(m),
                                 "--replay", str(raw), "--listen", f"tcp://127.0.0.1:{base + 10 * m}",
                                 "--ranks", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for m in range(4)]
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    connect = [a for m in range(4) for a in ("--connect", f"tcp://127.0.0.1:{base + 10 * m}")]
    receiver = subprocess.run(mpiexec_command(2, [
        sys.executable, "-m", "fourdstream", "receive", "-o", str(out), *connect, "--scans", "1",
        "--calibration", str(offline_file), "--summary-json", str(summary)]),
        env=mpi_environment(), capture_output=True, text=True, timeout=120)
    for p in senders:
        assert p.wait(timeout=60) == 0, p.communicate()[0]
    assert receiver.returncode == 0, receiver.stdout + receiver.stderr
    streamed, reference = open_counted(out / "scan0000000007.h5"), open_counted(offline_file)
    assert streamed.metadata["fourdstream"]["thresholds"] == "fixed"
    assert streamed.metadata["electron_counting"]["background_threshold"] == \
        reference.metadata["electron_counting"]["background_threshold"]
    for name in ("events", "offsets", "frame_number", "sector_mask"):
        assert np.array_equal(getattr(streamed, name), getattr(reference, name)), name


def test_several_threads_per_module(stream_session):
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700, "--senders", 8)
    send_all(s, "--threads", 2)
    rc, output, (summary,) = s.wait()
    assert rc == 0, output
    scan = open_counted(summary["path"])
    events, offsets = offline(simulated(), 28, 700)
    assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)
    meta = scan.metadata["fourdstream"]
    assert meta["senders"] == 8 and meta["closed_by"] == "end" and meta["frames_complete"] == 104


def test_a_port_in_use_is_one_clear_error_from_the_receiver_job(tmp_path):
    from fourdstream.launch import mpi_environment, mpiexec_command

    port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 5))    # rank 1, module 1 would bind here
        taken.listen()
        proc = subprocess.run(mpiexec_command(2, [sys.executable, "-m", "fourdstream", "receive", "-o",
                                                  str(tmp_path), "--listen", f"tcp://127.0.0.1:{port}"]),
                              env=mpi_environment(), capture_output=True, text=True, timeout=60)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert proc.returncode == 1 and len(ours) == 1, proc.stdout + proc.stderr
    assert "rank 1: cannot set up its sockets" in ours[0] and "MPI_ABORT" not in proc.stderr
