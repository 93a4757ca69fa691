"""Shared fixtures: small simulated scans on disk, and running code under mpiexec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fourdstream.detector import ScanGeometry
from fourdstream.launch import mpi_environment, mpiexec_command
from fourdstream.simulate import Simulator, write_scan

HERE = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption("--fuzz-messages", type=int, default=3000,
                     help="messages per fuzz test (default 3,000: seconds; more runs longer)")


@pytest.fixture(scope="session")
def small_sim():
    """A 9x6 scan (8x6 probe grid + flyback column), 150 e-/frame."""
    return Simulator(ScanGeometry.from_probe_grid(8, 6, flyback=True), dose=150, seed=11)


@pytest.fixture(scope="session")
def small_scan(tmp_path_factory, small_sim):
    """``(folder, frames, truth)`` of ``small_sim`` written as raw files (3 files/module)."""
    folder = tmp_path_factory.mktemp("raw")
    write_scan(small_sim, folder, scan_number=5, n_dst=3, frames_per_file=8)
    frames, truth = small_sim.frames(0, small_sim.n_frames)
    return folder, frames, truth


@pytest.fixture(scope="session")
def counted_small_scan(small_scan, tmp_path_factory):
    """``small_scan`` counted by ``fourdstream count`` (one process): the file's path."""
    folder, _, _ = small_scan
    out = tmp_path_factory.mktemp("counted") / "scan.h5"
    proc = subprocess.run([sys.executable, "-m", "fourdstream", "count", str(folder), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def run_mpi(n: int, script: str, *args: str, timeout: float = 120) -> list[dict]:
    """Run ``tests/<script>`` under ``mpiexec -n n`` (it reports with ``mpi_util.report``).

    Returns the result of every rank, ordered by rank. A hang fails the test
    through the timeout instead of blocking the suite.
    """
    cmd = mpiexec_command(n, [sys.executable, str(HERE / script), *args])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=mpi_environment())
    assert proc.returncode == 0, f"mpiexec failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[{")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    out = json.loads(lines[0])
    assert [r["rank"] for r in out] == list(range(n))
    return out


def stempy_events(frame, **kw) -> np.ndarray:
    """Events of one frame counted by the reference, stempy."""
    image = pytest.importorskip("stempy.image")
    return np.sort(np.asarray(image.electron_count_frame(frame, **kw).data[0, 0]))


class StreamSession:
    """A receiver job under mpiexec plus sender processes, for streaming tests.

    Every wait is bounded: a hang fails the test instead of blocking the suite.
    """

    def __init__(self, tmp_path: Path, ranks: int, *receiver_args: str, script: str | None = None):
        import subprocess

        from fourdstream.transport import read_endpoints

        self.out, self.endpoints = tmp_path / "out", tmp_path / "endpoints.json"
        self.summary = tmp_path / "summary.json"
        argv = [sys.executable, str(HERE / script)] if script else [sys.executable, "-m", "fourdstream"]
        cmd = mpiexec_command(ranks, argv + ["receive", "-o", str(self.out), "--endpoints-file",
                                             str(self.endpoints), "--summary-json", str(self.summary),
                                             *map(str, receiver_args)])
        self.receiver = subprocess.Popen(cmd, env=mpi_environment(), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
        self.senders, self.sender_outputs = [], []
        try:
            read_endpoints(self.endpoints, wait=60)
        except TimeoutError:
            self.receiver.kill()
            raise AssertionError(self.receiver.communicate()[0]) from None

    def send(self, module: int, *args) -> None:
        """``fourdstream send --module M ARGS`` to this session's ranks."""
        self._start([sys.executable, "-m", "fourdstream", "send", "--module", str(module),
                     "--endpoints-file", str(self.endpoints), *map(str, args)])

    def script(self, name: str, *args) -> None:
        """Run ``tests/<name> ARGS`` (a test producer) with the endpoints file as first argument."""
        self._start([sys.executable, str(HERE / name), str(self.endpoints), *map(str, args)])

    def _start(self, argv) -> None:
        import subprocess

        self.senders.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True))

    def signal_rank(self, sig) -> None:
        """Send ``sig`` to one rank of the job (not to mpiexec), as a scheduler's kill would."""
        import os

        found = subprocess.run(["pgrep", "-f", f"receive -o {self.out}"], capture_output=True, text=True)
        ranks = [int(p) for p in found.stdout.split()
                 if b"mpiexec" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert ranks, "no rank of the receiver job is running"
        os.kill(ranks[-1], sig)

    def wait(self, timeout: float = 120, senders_only: bool = False, sender_status=0):
        """Wait for the senders (and the receiver); returns (exit code, output, summaries).

        Every sender must exit with ``sender_status`` (an int or a tuple of them).
        """
        import subprocess

        try:
            for p in self.senders:
                out, _ = p.communicate(timeout=timeout)
                self.sender_outputs.append(out)
                assert p.returncode in np.atleast_1d(sender_status), \
                    f"sender exited {p.returncode}, expected {sender_status}: {out}"
            if senders_only:
                return None
            output, _ = self.receiver.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in self.senders + [self.receiver]:
                p.kill()
            raise AssertionError(f"streaming session did not finish within {timeout} s:\n"
                                 f"{self.receiver.communicate()[0]}") from None
        summaries = json.loads(self.summary.read_text()) if self.summary.exists() else []
        return self.receiver.returncode, output, summaries


@pytest.fixture
def stream_session(tmp_path):
    sessions = []

    def start(ranks, *receiver_args, script=None):
        sessions.append(StreamSession(tmp_path, ranks, *receiver_args, script=script))
        return sessions[-1]

    yield start
    for s in sessions:
        for p in s.senders + [s.receiver]:
            if p.poll() is None:
                p.kill()
