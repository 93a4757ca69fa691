"""A session that outlives a failed receiver job (fourdstream session)."""

import json
import subprocess
import sys
import time

import numpy as np

from fourdstream.io import open_counted
from fourdstream.session import Journal, pinned_listen, scans_by_outcome
from test_streaming import SCAN, SEED, offline, simulated


def test_journal_survives_a_torn_line_and_sorts_scans_by_outcome(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.opened(1)
    j.append("written", 1, path="a.h5")
    j.opened(2)
    with j.path.open("a") as f:
        f.write('{"event": "writ')                  # a job killed mid-line
    events = Journal.read(j.path)
    assert [e["event"] for e in events] == ["opened", "written", "opened"]
    assert scans_by_outcome(events) == {"opened": {1, 2}, "written": {1}, "failed": set()}
    assert Journal.read(tmp_path / "none.jsonl") == []


def test_restarts_reuse_fixed_ports():
    assert pinned_listen("tcp://10.0.0.1:6000", (), 2) == "tcp://10.0.0.1:6000"
    assert pinned_listen(None, ("tcp://daq:7000",), 2) is None          # senders bind
    pinned = pinned_listen(None, (), 2)                                   # default: free ports
    assert pinned.startswith("tcp://127.0.0.1:") and not pinned.endswith("*")


def _rank_pids(out):
    found = subprocess.run(["pgrep", "-f", f"receive -o {out}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()
            if b"mpiexec" not in open(f"/proc/{p}/cmdline", "rb").read()]


def test_a_rank_killed_during_scan_2_of_4_leaves_scans_1_3_and_4_complete(tmp_path):
    out, endpoints, summary = tmp_path / "out", tmp_path / "ep.json", tmp_path / "summary.json"
    session = subprocess.Popen([sys.executable, "-m", "fourdstream", "session", "-n", "2", "--restarts", "2",
                                "--", "-o", str(out), "--endpoints-file", str(endpoints), "--bg", "28",
                                "--xr", "700", "--scans", "4", "--timeout", "3", "--summary-json",
                                str(summary)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    senders = []
    try:
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            assert session.poll() is None and time.monotonic() < deadline, session.communicate()[0]
            time.sleep(0.1)
        senders = [subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--module", str(m),
                                     "--endpoints-file", str(endpoints), "--simulate", SCAN, "--seed",
                                     str(SEED), "--pool-frames", "0", "--scans", "4", "--rate", "40",
                                     "--send-timeout", "60"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for m in range(4)]
        first = out / "scan0000000001.h5"
        while not first.exists():                   # scan 1 written: scan 2 is arriving
            assert time.monotonic() < deadline + 60, "scan 1 was not written"
            time.sleep(0.05)
        time.sleep(1.0)
        pids = _rank_pids(out)
        assert pids
        subprocess.run(["kill", "-9", str(pids[-1])])
        for p in senders:   # they wait for the new job and reconnect by themselves
            text, _ = p.communicate(timeout=120)
            assert p.returncode == 0, text
        output, _ = session.communicate(timeout=120)
    finally:
        for p in senders + [session]:
            if p.poll() is None:
                p.kill()
    assert session.returncode == 3, output                 # a scan was lost: status 3
    assert "restarting it (1/2)" in output and "scan 2 lost with the receiver job" in output, output
    entries = json.loads(summary.read_text())
    assert [e["scan"] for e in entries] == [1, 2, 3, 4]
    assert "failed" in entries[1] and "in flight" in entries[1]["failed"]
    events, offsets = offline(simulated(), 28, 700)
    for e in (entries[0], entries[2], entries[3]):
        scan = open_counted(e["path"])
        assert scan.metadata["fourdstream"]["frames_complete"] == 104
        assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)
    assert not (out / "scan0000000002.h5").exists()        # no fragment under scan 2's name
