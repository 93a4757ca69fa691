import os

import numpy as np
import pytest
from click.testing import CliRunner

from fourdstream import backend
from fourdstream.cli import main
from fourdstream.io import open_counted


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_commands_and_each_command_has_help():
    result = invoke("--help")
    assert result.exit_code == 0
    commands = list(main.commands)
    assert {"simulate", "count", "inspect", "demo"} <= set(commands)
    for name in commands:
        r = invoke(name, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, name


def test_simulate_then_count(tmp_path):
    raw = tmp_path / "raw"
    r = invoke("simulate", raw, "--scan", "6x4", "--dose", "100", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert "7x4 positions incl. flyback column" in r.output
    assert len(list(raw.glob("data_scan0000000001_module*_dst*_file*.data"))) == 8
    out = tmp_path / "counted.h5"
    r = invoke("count", raw, "-o", out, "--samples", "50", "--sample-frames", "5")
    assert r.exit_code == 0, r.output
    assert "28 complete" in r.output and "calibrated" in r.output
    scan = open_counted(out)
    assert scan.n_slots == 28 and scan.n_events > 0
    png = tmp_path / "bf.png"
    r = invoke("inspect", out, "--png", png)
    assert r.exit_code == 0, r.output
    assert "7x4 positions (width x height) incl. flyback column" in r.output
    assert f"{scan.n_events:,}" in r.output and "calibrated" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_with_fixed_thresholds_matches_the_kernel(small_scan, tmp_path):
    from fourdstream.counting import ElectronCounter, Thresholds

    folder, frames, _ = small_scan
    out = tmp_path / "c.h5"
    r = invoke("count", folder, "-o", out, "--bg", 30, "--xr", 700, "--batch-size", 7)
    assert r.exit_code == 0 and "fixed" in r.output, r.output
    events, offsets = ElectronCounter(Thresholds(30, 700)).count(frames)
    scan = open_counted(out)
    assert np.array_equal(scan.events, events) and np.array_equal(scan.offsets, offsets)


@pytest.mark.parametrize("args, message", [
    (["--bg", "3"], "give both"),
    (["--bg", "30", "--xr", "10"], "must exceed"),
    (["--dark", "missing.npy"], "no such file"),
    (["--backend", "gpu"], "--backend gpu"),
])
def test_count_errors_are_one_line_with_exit_code_1(small_scan, tmp_path, args, message):
    folder, _, _ = small_scan
    if "--backend" in args and backend.select("auto").xp is not np:
        pytest.skip("a GPU is usable here: --backend gpu is no error")
    r = invoke("count", folder, "-o", tmp_path / "x.h5", *args)
    assert r.exit_code == 1 and message in r.output
    assert r.output.count("\n") == 1 and r.output.startswith("Error:")


def test_existing_output_is_not_overwritten(small_scan, tmp_path):
    folder, _, _ = small_scan
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    r = invoke("count", folder, "-o", out, "--bg", 30, "--xr", 700)
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert out.read_bytes() == b"precious"


def test_bad_scan_size_is_a_usage_error(tmp_path):
    r = invoke("simulate", tmp_path, "--scan", "64")
    assert r.exit_code == 1 and "WIDTHxHEIGHT" in r.output


def test_receive_help_states_the_memory_bound_the_receiver_uses():
    from fourdstream.receive import memory_bound_mb

    text = invoke("receive", "--help").output
    assert f"{memory_bound_mb(256, 100, 32, 1):.0f} MB with the defaults" in text
    assert f"{memory_bound_mb(256, 100, 32, 1, 10e6) - memory_bound_mb(256, 100, 32, 1):.0f} MB per 10 M" \
        in text


def test_count_uses_the_cores_available_by_default(small_scan, tmp_path):
    from fourdstream.io import open_counted

    folder, _, _ = small_scan
    r = invoke("count", folder, "-o", tmp_path / "c.h5", "--bg", "28", "--xr", "700")
    assert r.exit_code == 0, r.output
    meta = open_counted(tmp_path / "c.h5").metadata["fourdstream"]
    assert meta["threads_per_rank"] == len(os.sched_getaffinity(0)) and meta["ranks"] == 1


def test_a_new_mpi_job_does_not_inherit_the_identity_of_an_enclosing_one():
    """A process that initialised MPI passes PMIX_*/OMPI_* job variables to its children;
    an mpiexec started with them exits 1 without a word (seen from `fourdstream session`
    started by a test process that had run MPI in-process)."""
    from fourdstream.launch import mpi_environment

    parent = {"PMIX_RANK": "0", "PMIX_NAMESPACE": "1", "OMPI_MCA_ess": "singleton",
              "OMPI_MCA_orte_launch": "1", "OMPI_APP_CTX_NUM_PROCS": "1", "PATH": "/bin",
              "OMPI_MCA_btl": "self,tcp"}
    env = mpi_environment(parent)
    assert not any(k.startswith(("PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte", "OMPI_APP")) for k in env)
    assert env["PATH"] == "/bin" and env["OMPI_MCA_btl"] == "self,tcp"   # the user's choices stay


def test_a_process_no_launcher_started_uses_shared_memory_mpi_unless_told():
    """Without mpiexec/srun a command is an MPI job of one rank: Open MPI's point-to-point
    layer is ob1 (no search for a network, 0.2 s), unless the user set one; under a
    launcher nothing is changed."""
    import subprocess
    import sys

    from fourdstream.launch import singleton_defaults

    alone = {"PATH": "/bin"}
    singleton_defaults(alone)
    assert alone["OMPI_MCA_pml"] == "ob1" and alone["OMPI_MCA_btl"] == "self,vader"
    assert alone["OMPI_MCA_ess_singleton_isolated"] == "1"
    chosen = {"OMPI_MCA_pml": "ucx"}
    singleton_defaults(chosen)
    assert chosen["OMPI_MCA_pml"] == "ucx"
    launched = {"OMPI_COMM_WORLD_SIZE": "2"}
    singleton_defaults(launched)
    assert not any(k.startswith("OMPI_MCA") for k in launched)
    # The command line applies it before MPI starts: the singleton's MPI reports ob1 and
    # no orted daemon runs beside it.
    code = ("import os, subprocess; from fourdstream import cli; from click.testing import CliRunner; "
            "CliRunner().invoke(cli.main, ['keys', '--help']); from mpi4py import MPI; "
            "children = subprocess.run(['ps', '--ppid', str(os.getpid()), '-o', 'comm='], "
            "capture_output=True, text=True).stdout.split(); "
            "print(os.environ['OMPI_MCA_pml'], MPI.COMM_WORLD.size, 'orted' in children)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["ob1", "1", "False"]


def test_the_program_freezes_its_objects_out_of_the_final_collection():
    """`fourdstream` and `python -m fourdstream` run cli.run: main with the collector's
    raised threshold, then gc.freeze, even when the command exits or fails."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    assert entry_points(group="console_scripts")["fourdstream"].value == "fourdstream.cli:run"
    code = ("import gc, sys; from fourdstream import cli; sys.argv = ['fourdstream'] + sys.argv[1:]\n"
            "try:\n    cli.run()\nexcept SystemExit as e:\n"
            "    print(e.code, gc.get_freeze_count() > 0, gc.get_threshold()[0] == cli.GC_THRESHOLD)\n"
            # a cycle is still collected, without being asked, once enough objects follow it
            "import weakref\nclass Cycle: pass\n"
            "c = Cycle(); c.me = c; alive = weakref.ref(c); del c\n"
            "objects = [Cycle() for _ in range(cli.GC_THRESHOLD // 2)]; print(alive() is None)\n"
            "objects += [Cycle() for _ in range(cli.GC_THRESHOLD)]; print(alive() is None)")
    for args, status in ((["--version"], "0"), (["inspect", "/nonexistent.h5"], "2")):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[-5:] == [status, "True", "True", "False", "True"], out


def test_the_program_runs_blas_on_the_calling_thread():
    """The program loads numpy with BLAS on one thread (no pool of BLAS threads to spin on
    the cores the ranks count on), and passes that on to the processes it starts; a value
    the user gave is kept."""
    import subprocess
    import sys

    names = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
    code = ("import os, sys; from fourdstream import cli; import numpy as np; "
            "np.ones((256, 256)) @ np.ones((256, 256)); "      # a BLAS call: its pool would start
            "print(len(os.listdir('/proc/self/task')), *(os.environ[n] for n in sys.argv[1:]))")
    clean = {k: v for k, v in os.environ.items() if k not in names}
    for given, expected in (({}, ["1", "1"]), ({"OPENBLAS_NUM_THREADS": "2"}, ["2", "1"])):
        out = subprocess.run([sys.executable, "-c", code, *names[:2]], env={**clean, **given},
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[1:] == expected, out
        if not given:
            assert out[0] == "1", out        # the main thread alone: no BLAS threads
    out = subprocess.run([sys.executable, "-c", "import os; from fourdstream import cli; "
                          "print(os.environ.get('OMP_NUM_THREADS'))"], env=clean,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None"]                   # OpenMP threads of other tools are theirs to choose


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_batch_size_defaults_are_the_ones_help_states(small_scan, backend):
    """`--batch-size` unset: count takes 64 frames at a time with the compiled kernel, which
    reads each frame itself; with another kernel, the frames that fit in half of a CPU's
    share of the last-level cache, 8 to 32; the receiver 32."""
    from fourdstream.offline import READ_BATCH, SECTORS_BATCH, count_raw_scan, last_level_cache, read_batch
    from fourdstream.pipeline import CountingOptions, ScanCounting
    from fourdstream.rawfile import RawScan
    from fourdstream.receive import RECEIVE_BATCH

    folder, _, _ = small_scan
    scan = RawScan([folder])
    batches = []
    counting = ScanCounting(CountingOptions(background_threshold=28, xray_threshold=700, backend=backend))
    assert counting.reads_sectors == (backend == "cpu")
    result = count_raw_scan(scan, counting, progress=batches.append)
    size = SECTORS_BATCH if backend == "cpu" else read_batch(last_level_cache())
    assert SECTORS_BATCH == 64 and READ_BATCH == (8, 32) and result.batch_size == size
    assert backend == "cpu" or 8 <= size <= 32
    assert batches == [size] * (len(scan) // size) + [len(scan) % size] * (len(scan) % size > 0)
    text = " ".join(invoke("receive", "--help").output.split())
    assert RECEIVE_BATCH == 32 and "Default: 32 when receiving; when counting files, 64 with the compiled " \
        "kernel (it reads each frame as it counts it), else as many as fit in half of a CPU's share of " \
        "its last-level cache, 8 to 32" in text


def test_the_read_batch_follows_the_last_level_cache(tmp_path):
    """The default batch of `count` from the cache Linux describes: half of one CPU's share
    of the last-level data cache in 663,552-byte frames, 8 to 32; 8 when it is unknown."""
    from fourdstream.offline import last_level_cache, read_batch

    def cpu_caches(*caches):      # (level, type, size, shared_cpu_list) for each index
        root = tmp_path / f"sys{len(list(tmp_path.iterdir()))}"
        for cpu in sorted(os.sched_getaffinity(0)):
            for k, (level, kind, size, shared) in enumerate(caches):
                index = root / f"cpu{cpu}" / "cache" / f"index{k}"
                index.mkdir(parents=True)
                for name, value in (("level", level), ("type", kind), ("size", size),
                                    ("shared_cpu_list", shared)):
                    (index / name).write_text(f"{value}\n")
        return str(root)

    l1 = [(1, "Data", "48K", "0"), (1, "Instruction", "64K", "0"), (2, "Unified", "2048K", "0")]
    intel = cpu_caches(*l1, (3, "Unified", "491520K", "0-1"))      # this project's CI VM
    assert last_level_cache(intel) == (491520 << 10, 2)
    assert read_batch(last_level_cache(intel)) == 32               # 368 frames fit: at most 32
    epyc = cpu_caches(*l1, (3, "Unified", "32M", "0-7,64-71"))     # a Zen 3 CCX, 16 CPUs
    assert last_level_cache(epyc) == (32 << 20, 16)
    assert read_batch(last_level_cache(epyc)) == 8                 # 1 MB a CPU: 1 frame, at least 8
    assert read_batch((16 << 20, 1)) == 12                         # 8 MB: 12 frames of 0.66 MB
    assert read_batch((1 << 30, 1)) == 32
    assert last_level_cache(str(tmp_path / "nowhere")) is None and read_batch(None) == 8
    no_size = cpu_caches((2, "Unified", "", "0"))
    assert last_level_cache(no_size) is None and read_batch(last_level_cache(no_size)) == 8
