"""The fault suite: a real 2-rank receiver job, real senders, one injected fault per case.

Each case streams scan 1 with the fault, then a clean scan 2, and checks scan 1 against
what was sent (every frame complete, incomplete with the right sector mask, or missing;
every message received, dropped or lost, and every received one used or counted under a
named loss counter), that scan 2 is exact, and that nothing hangs (every wait is bounded).
The README's fault table lists what each case checks.
"""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fourdstream.io import open_counted
from test_streaming import SCAN, SEED, offline, simulated

N = 104             # frames of SCAN (12x8 probe grid + flyback column)
FAULTY = 2          # the module whose sender misbehaves

#: fault -> (faulty_sender arguments, frame indices whose module-2 sector never counts,
#:           {metadata counter of scan 1: expected}, session-level malformed messages)
CASES = {
    "dropped":        (["drop:5"], [4], {"sectors_received": 4 * N - 1}, 0),
    "duplicated":     (["dup:7"], [], {"sectors_duplicate": 1}, 0),
    "reordered":      (["swap:10"], [], {"frames_complete": N}, 0),
    "outside scan":   (["outside:13"], [12], {"messages_malformed": 1}, 0),
    "geometry":       (["geometry:14"], [13], {"messages_malformed": 1}, 0),
    "truncated":      (["short:15"], [14], {"messages_malformed": 1}, 0),
    "oversized":      (["long:16"], [15], {"messages_malformed": 1}, 0),
    "string field":   (["string:17"], [16], {"messages_lost": 1}, 1),
    "float field":    (["float:18"], [17], {"messages_lost": 1}, 1),
    "negative field": (["negative:19"], [18], {"messages_lost": 1}, 1),
    "frame > 2**32":  (["big:20"], [19], {"messages_malformed": 1}, 0),
    "integer > 2**64": (["over64:21"], [20], {"messages_lost": 1}, 1),
    "not msgpack":    (["garbage:22"], [21], {"messages_lost": 1}, 1),
    "1-part message": (["parts1:23"], [22], {"messages_malformed": 1}, 0),
    "3-part message": (["parts3:24"], [23], {"messages_malformed": 1}, 0),
    "absurd begin":   (["badbegin:0"], [], {"frames_complete": N, "messages_malformed": 2}, 0),
    "end without counts": (["badend:0"], [], {"frames_complete": N, "closed_by": "timeout",
                                               "messages_malformed": 2}, 0),
}
#: Messages the faulty sender sends beyond one per sector (a dropped one is never sent).
EXTRA = {"dropped": -1, "duplicated": 1, "absurd begin": 2, "end without counts": 2}


def _clean(s, *args, modules=range(4)):
    for m in modules:
        s.send(m, "--simulate", SCAN, "--seed", SEED, "--pool-frames", 0, *map(str, args))


def _check_accounting(meta, sent=4 * N):
    """Every message sent is received, dropped or lost; every received one is used or counted."""
    assert meta["messages_received"] + meta["messages_dropped_by_senders"] + meta["messages_lost"] \
        == sent, meta
    assert meta["messages_received"] == meta["sectors_received"] + meta["sectors_late"] + \
        meta["sectors_duplicate"] + meta["sectors_conflicting"] + meta["messages_malformed"], meta
    assert meta["frames_complete"] + meta["frames_incomplete"] + meta["frames_missing"] == N


def _check_scan(path, broken, modules=(FAULTY,)):
    scan = open_counted(path)
    events, offsets = offline(simulated(), 28, 700, {k: list(modules) for k in broken})
    assert np.array_equal(scan.offsets, offsets) and np.array_equal(scan.events, events)
    full = 0b1111
    for k in range(N):
        expected = full & ~sum(1 << m for m in modules) if k in broken else full
        assert scan.sector_mask[k] == expected, (k, scan.sector_mask[k])
    return scan.metadata["fourdstream"]


@pytest.mark.parametrize("case", list(CASES))
def test_one_fault_then_a_clean_scan(stream_session, case):
    faults, broken, counters, session_malformed = CASES[case]
    s = stream_session(2, "--scans", 2, "--bg", 28, "--xr", 700, "--timeout", 2)
    _clean(s, modules=[m for m in range(4) if m != FAULTY])
    s.script("faulty_sender.py", FAULTY, SCAN, SEED, *faults)
    s.wait(senders_only=True)
    s.senders.clear()
    _clean(s, "--scan-number", 2)
    code, output, summaries = s.wait(timeout=90)
    assert code == 0 and "Traceback" not in output, output
    summaries.sort(key=lambda x: x["scan"])   # scan 1 may close by timeout after scan 2 is done
    assert [x["scan"] for x in summaries] == [1, 2], output
    meta = _check_scan(summaries[0]["path"], broken)
    for key, value in counters.items():
        assert meta[key] == value, (key, meta[key], output)
    _check_accounting(meta, 4 * N + EXTRA.get(case, 0))
    if session_malformed:
        assert f"{session_malformed} malformed" in output.splitlines()[-1], output
    assert _check_scan(summaries[1]["path"], [])["frames_complete"] == N    # the next scan: exact


def test_sender_killed_with_sigkill_mid_scan(stream_session):
    s = stream_session(2, "--scans", 2, "--bg", 28, "--xr", 700, "--timeout", 2)
    _clean(s, modules=[m for m in range(4) if m != FAULTY])
    victim = subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--module", str(FAULTY),
                               "--endpoints-file", str(s.endpoints), "--simulate", SCAN, "--seed",
                               str(SEED), "--pool-frames", "0", "--rate", "20"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed 3 s after its start: its N frames take 5.2 s at 20 frames/s, after a start-up
    # of 0.3-2 s here, so 20-55 of them are out (at 40 frames/s a quick start-up let it
    # finish, and send its end, just before the kill).
    time.sleep(3.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    s.wait(senders_only=True)
    s.senders.clear()
    time.sleep(3.0)                            # scan 1 closes by timeout (2 s)
    _clean(s, "--scan-number", 2)
    code, output, summaries = s.wait(timeout=90)
    assert code == 0, output
    scan = open_counted(summaries[0]["path"])
    meta = scan.metadata["fourdstream"]
    arrived = (scan.sector_mask & (1 << FAULTY)) > 0
    assert meta["closed_by"] == "timeout" and 0 < arrived.sum() < N
    assert arrived[:arrived.sum()].all()        # what it sent before dying, in order
    _check_scan(summaries[0]["path"], np.flatnonzero(~arrived).tolist())
    assert meta["frames_incomplete"] == N - arrived.sum()
    assert _check_scan(summaries[1]["path"], [])["frames_complete"] == N


def test_rank_stopped_for_10_s_then_continued(stream_session):
    """SIGSTOP one rank for 10 s: the senders wait for it (blocking policy, send timeout
    30 s), the other rank waits in the collective decisions; the scans arrive whole."""
    s = stream_session(2, "--scans", 2, "--bg", 28, "--xr", 700, "--timeout", 2)
    time.sleep(1.0)
    s.signal_rank(signal.SIGSTOP)
    t0 = time.monotonic()
    _clean(s, "--scans", 2, "--send-timeout", 30)
    time.sleep(max(0.0, 10 - (time.monotonic() - t0)))
    s.signal_rank(signal.SIGCONT)
    code, output, summaries = s.wait(timeout=120)
    assert code == 0, output
    for summary in summaries:
        meta = _check_scan(summary["path"], [])
        assert meta["frames_complete"] == N and meta["messages_dropped_by_senders"] == 0
        _check_accounting(meta)


def test_full_disk_fails_that_scan_only_and_the_next_one_is_written(stream_session, tmp_path):
    """A 1 MB tmpfs: scan 1 cannot be written (a clear error, recorded as failed in the
    session summary); then the disk grows and scan 2 is written exactly."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        s = stream_session(2, "--scans", 2, "--bg", 28, "--xr", 700, "-o", disk / "out")
        _clean(s)
        s.wait(senders_only=True)
        s.senders.clear()
        time.sleep(4.0)           # scan 1 closes by its end messages and its write is refused
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        _clean(s, "--scan-number", 2)
        code, output, summaries = s.wait(timeout=90)
        assert code == 0, output
        assert summaries[0]["scan"] == 1 and "not enough space" in summaries[0]["failed"], summaries
        assert "scan 1: NOT written: not enough space" in output and "1 FAILED (scan 1)" in output
        assert _check_scan(summaries[1]["path"], [])["frames_complete"] == N
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_unwritable_output_folder_is_one_clear_error_before_any_data(tmp_path):
    from fourdstream.launch import mpi_environment, mpiexec_command

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = subprocess.run(mpiexec_command(2, [sys.executable, "-m", "fourdstream", "receive", "-o",
                                                  str(ro), "--bg", "28", "--xr", "700"]),
                              env=mpi_environment(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert f"cannot write scan files in {ro}: Read-only file system; choose another --output" \
            in proc.stderr
        assert proc.stderr.count("cannot write scan files") == 1, proc.stderr   # once, not per rank
    finally:
        subprocess.run(["umount", "-l", str(ro)])
