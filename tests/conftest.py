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
