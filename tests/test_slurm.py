"""The job scripts in ``jobs/`` under a real Slurm: a throwaway two-node cluster on this
machine (``tests/slurm_cluster.py``), submitted to with ``sbatch`` exactly as a user does.

The fake nodes share one host, so Open MPI is kept off shared memory between them
(``OMPI_MCA_btl=self,tcp``): its shared-memory transport crashes between ranks that
believe they are on different nodes. A real cluster needs nothing of the kind.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fourdstream.detector import ScanGeometry, parse_scan_size
from fourdstream.io import open_counted
from fourdstream.simulate import Simulator, write_scan
from fourdstream.transport import free_port_block
from slurm_cluster import SlurmCluster, missing
from test_streaming import SCAN, SEED, offline, offline_calibration, simulated

JOBS = Path(__file__).parent.parent / "jobs"
pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c:
        yield c
        leftover = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=c.env, capture_output=True,
                                  text=True).stdout.strip()
    left = _job_processes(c, "fourdstream")
    assert not left, f"a job left processes behind: {left}"
    assert not leftover or "COMPLETING" in leftover, leftover


def _job_processes(cluster, text: str) -> list[str]:
    """``PID COMMAND`` of the processes started in ``cluster``'s jobs (its ``SLURM_CONF`` in
    their environment; not a shell outside it) whose command line holds ``text``."""
    mark = f"SLURM_CONF={cluster.conf}".encode()
    out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        try:
            environ = Path(f"/proc/{line.split()[0]}/environ").read_bytes().split(b"\0")
        except OSError:          # ended since
            continue
        if mark in environ:
            found.append(line)
    return found


def _job_env(cluster) -> dict:
    return dict(cluster.env, FOURDSTREAM_ENV=sys.prefix, OMPI_MCA_btl="self,tcp",
                PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def _submit(cluster, script, *args, nodes, tasks_per_node, log, env=None):
    options = [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
               f"--output={log}", "--time=00:10:00"]
    out = subprocess.run(["sbatch", "--parsable", "--partition=test", *options, str(JOBS / script),
                          *map(str, args)], env={**_job_env(cluster), **(env or {})},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def _finished(cluster, job, log, timeout, expect="COMPLETED"):
    state = cluster.wait(job, timeout)
    text = Path(log).read_text() if Path(log).exists() else "(no job output)"
    assert state == expect, f"job {job} {state}, exit {cluster.exit_code(job)}:\n{text}\n{cluster.logs()}"
    return text


def test_the_scripts_choose_the_mpi_plugin_of_mpi4py_and_slurm_default_is_none(cluster):
    from fourdstream.launch import srun_mpi_plugin

    assert "MpiDefault=none" in cluster.conf.read_text()
    assert srun_mpi_plugin() == "pmix"        # the Open MPI that the set-up installs
    for script in JOBS.glob("*.sbatch"):
        text = script.read_text()
        assert "python -m fourdstream.launch srun-mpi" in text, script
        assert "srun ${PLUGIN:+--mpi=$PLUGIN}" in text, script


def test_count_sbatch_on_two_nodes_writes_the_same_file_as_fourdstream_count(cluster, tmp_path):
    g = ScanGeometry.from_probe_grid(*parse_scan_size(SCAN))
    raw = tmp_path / "raw"
    write_scan(Simulator(g, dose=150, seed=SEED, pattern="disc"), raw, scan_number=7, n_dst=2,
               frames_per_file=30)
    reference = tmp_path / "reference.h5"
    proc = subprocess.run([sys.executable, "-m", "fourdstream", "count", str(raw), "-o", str(reference)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, log = tmp_path / "job.h5", tmp_path / "count.log"
    job = _submit(cluster, "count.sbatch", raw, out, nodes=2, tasks_per_node=1, log=log)
    _finished(cluster, job, log, timeout=180)
    a, b = open_counted(out), open_counted(reference)
    assert a.metadata["fourdstream"]["ranks"] == 2 and b.metadata["fourdstream"]["ranks"] == 1
    for name in ("events", "offsets", "frame_number", "sector_mask", "position"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.scan_shape == b.scan_shape
    for key in ("background_threshold", "x_ray_threshold"):
        assert a.metadata["electron_counting"][key] == b.metadata["electron_counting"][key], key


def _stream_job(cluster, tmp_path, scans: int, tasks_per_node: int):
    """stream.sbatch on 2 nodes with one configuration file for the job (FOURDSTREAM_CONFIG,
    which sbatch passes on) and the senders outside it (--config); (job, site, out, log)."""
    out, log = tmp_path / "session", tmp_path / "stream.log"
    site = tmp_path / "site.toml"
    site.write_text(f"""timeout = 20.0
[receive]
output = "session"
listen = "tcp://*:{free_port_block(4 * 2 * tasks_per_node, '*')}"
endpoints_file = "session/endpoints.json"
summary_json = "session/session.json"
[send]
endpoints_file = "session/endpoints.json"
simulate = "{SCAN}"
seed = {SEED}
pool_frames = 0
scans = {scans}
send_timeout = 60.0
""")
    job = _submit(cluster, "stream.sbatch", nodes=2, tasks_per_node=tasks_per_node, log=log,
                  env={"FOURDSTREAM_CONFIG": str(site)})
    deadline = time.monotonic() + 120
    while not (out / "endpoints.json").exists():
        assert cluster.state(job) in ("PENDING", "CONFIGURING", "RUNNING"), Path(log).read_text()
        assert time.monotonic() < deadline, "no endpoints file from the job"
        time.sleep(0.2)
    return job, site, out, log


def _send(site, *args):
    senders = [subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--config", str(site),
                                 "--module", str(m), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for m in range(4)]
    try:
        for p in senders:
            assert p.wait(timeout=120) == 0, p.communicate()[0]
    finally:
        for p in senders:
            p.kill()


def _wait_for(paths, log, timeout=60):
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in paths):
        assert time.monotonic() < deadline, f"scans not written:\n{Path(log).read_text()}"
        time.sleep(0.2)


def _check_exact(path, ranks):
    frames = simulated()
    cal = offline_calibration(frames)
    events, offsets = offline(frames, cal.background_threshold, cal.x_ray_threshold)
    scan = open_counted(path)
    assert scan.metadata["fourdstream"]["ranks"] == ranks
    assert scan.sector_mask.all() and len(scan.frame_number) == len(frames)
    assert np.array_equal(scan.offsets, offsets) and np.array_equal(scan.events, events), path


def test_stream_sbatch_two_nodes_two_scans_from_senders_outside_then_scancel(cluster, tmp_path):
    """2 nodes x 2 ranks, two scans, then scancel ends the session cleanly."""
    job, site, out, log = _stream_job(cluster, tmp_path, scans=2, tasks_per_node=2)
    files = [out / f"scan{n:010d}.h5" for n in (1, 2)]
    try:
        _send(site)
        _wait_for(files, log)
    finally:
        cluster.scancel(job)
    text = _finished(cluster, job, log, timeout=60, expect="CANCELLED")
    assert "session: 2 scan(s) written" in text, text   # printed on the way out: a clean end
    assert len(json.loads((out / "session.json").read_text())) == 2
    for f in files:
        _check_exact(f, ranks=4)


def test_stream_sbatch_restarts_the_receiver_in_the_allocation_when_a_rank_dies(cluster, tmp_path):
    """A rank killed between scans: the job script starts a new step on the same ports and
    the next scan, from senders that were never told, is written by it."""
    job, site, out, log = _stream_job(cluster, tmp_path, scans=1, tasks_per_node=1)
    first, second = out / f"scan{1:010d}.h5", out / f"scan{2:010d}.h5"
    try:
        _send(site)
        _wait_for([first], log)
        ranks = [line.split()[0] for line in _job_processes(cluster, "fourdstream receive")]
        assert ranks, "no rank found"
        subprocess.run(["kill", "-9", ranks[-1]])
        # scan 2 starts once the new step is up (one sent into the dying step would be lost
        # with it, and recorded as failed: that is the design, tested on the workstation)
        deadline = time.monotonic() + 120
        while Path(log).read_text().count("receiving on") < 2:
            assert time.monotonic() < deadline, Path(log).read_text()
            time.sleep(0.2)
        _send(site, "--scan-number", 2)
        _wait_for([second], log)
    finally:
        cluster.scancel(job)
    text = _finished(cluster, job, log, timeout=60, expect="CANCELLED")
    assert "restarting it (1/3)" in text, text
    for f in (first, second):
        _check_exact(f, ranks=2)


@pytest.mark.timeout(600)    # the whole quick harness, one repeat: 4-5 minutes here
def test_bench_sbatch_quick_reports_every_stage_with_ranks_started_by_srun(cluster, tmp_path):
    """The harness inside an allocation starts its MPI jobs with srun (FOURDSTREAM_MPIEXEC
    from the script, with the plugin chosen for mpi4py's MPI)."""
    from fourdstream.bench import DEFAULT_STAGES

    results, log, scratch = tmp_path / "bench.jsonl", tmp_path / "bench.log", tmp_path / "scratch"
    scratch.mkdir()
    job = _submit(cluster, "bench.sbatch", results, "--quick", "--repeats", 1, nodes=1,
                  tasks_per_node=4, log=log,   # one repeat after the warm-up: half the time
                  env={"SCRATCH": str(scratch)})
    text = _finished(cluster, job, log, timeout=900)
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["machine"]["launcher"].startswith("srun --mpi=pmix"), record["machine"]
    # Its files on the scratch file system, from which the disk figures' files were evicted.
    assert record["machine"]["folder"].startswith(str(scratch) + "/"), record["machine"]
    assert record["stages"]["count_command"]["cold_still_cached"] == 0
    assert set(record["stages"]) == set(DEFAULT_STAGES)
    assert record["stages"]["scaling"]["ranks"].keys() == {"1", "2", "4"}
    assert all(r["complete"] == r["frames"] for r in record["stages"]["scaling"]["ranks"].values())
    assert "nodes needed" in text and f"record appended to {results}" in text
