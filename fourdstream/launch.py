"""Starting MPI jobs from Python (the demo, the benchmarks, the tests).

Open MPI refuses to run as root and to put more ranks than cores on a machine
unless told; workstations and CI containers need both, clusters use srun.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def launcher() -> list[str]:
    """The command that starts MPI jobs: ``FOURDSTREAM_MPIEXEC`` if set (e.g. ``srun`` or
    ``srun --mpi=pmix --overlap`` inside a Slurm allocation; Cray MPICH has no mpiexec),
    else Open MPI's ``mpiexec``."""
    custom = os.environ.get("FOURDSTREAM_MPIEXEC")
    if custom:
        return shlex.split(custom)
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("mpiexec not found: install Open MPI (scripts/setup.sh does) or set "
                           "FOURDSTREAM_MPIEXEC to your cluster's launcher (e.g. srun)")
    return [exe]


def mpiexec_command(n: int, argv: list[str]) -> list[str]:
    """``LAUNCHER -n N argv...`` (see :func:`launcher`; use with :func:`mpi_environment`)."""
    return [*launcher(), "-n", str(n), *argv]


def mpi_library() -> str:
    """The MPI library mpi4py is built against (first line of ``MPI_Get_library_version``),
    read without initialising MPI."""
    import mpi4py

    mpi4py.rc.initialize = False
    from mpi4py import MPI

    return MPI.Get_library_version().strip().splitlines()[0]


def srun_mpi_plugin(library: str | None = None) -> str:
    """The ``srun --mpi=`` plugin that starts ranks of ``library`` (default: mpi4py's MPI).

    Slurm's default plugin is a per-site setting (``MpiDefault``, ``none`` on a default
    install), and with the wrong one every rank of Open MPI dies in ``MPI_Init``. Open MPI
    (4.x and later) is started through PMIx; MPICH and its derivatives (Intel MPI, MVAPICH)
    through PMI-2; Cray MPICH by the site's own default (``cray_shasta`` on Perlmutter), for
    which this returns ``""`` (keep the site's default). ``FOURDSTREAM_SRUN_MPI`` overrides.
    """
    override = os.environ.get("FOURDSTREAM_SRUN_MPI")
    if override is not None:
        return override
    library = mpi_library() if library is None else library
    if library.startswith("Open MPI"):
        return "pmix"
    if "CRAY MPICH" in library.upper():
        return ""
    if any(name in library for name in ("MPICH", "Intel(R) MPI", "MVAPICH")):
        return "pmi2"
    return ""


def cores_per_rank(comm) -> int:
    """This rank's share of the cores it may run on: the cores of its affinity mask
    divided by the ranks of the job on the same node (at least 1)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return max(len(os.sched_getaffinity(0)) // node.size, 1)
    finally:
        node.Free()


def python_argv(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


#: Variables by which Open MPI and PMIx tell a process which job it belongs to. A process
#: that initialised MPI (even as a singleton) passes them on to its children, and an
#: ``mpiexec`` that inherits them fails at once without a word: a job started from such a
#: process must not see them.
ENCLOSING_JOB = ("PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte_", "OMPI_MCA_pmix", "OMPI_APP_CTX",
                 "OMPI_COMM_WORLD", "OMPI_UNIVERSE_SIZE", "ORTE_SCHIZO")


#: Variables a launcher (mpiexec, srun, a PMI server) gives each rank it starts.
LAUNCHED = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "SLURM_STEP_ID")


def singleton_defaults(env=os.environ) -> None:
    """Open MPI settings for a process that no launcher started (an MPI job of one rank,
    as ``fourdstream count`` without mpiexec), unless the user chose otherwise:
    point-to-point over ob1 (self and shared memory), which needs no network (Open MPI's
    search for UCX takes 0.2 of the 0.35 s that MPI takes to start here), and no orted
    daemon forked for the singleton (``ess_singleton_isolated``; it would only serve
    MPI_Comm_spawn, which fourdstream does not use). Call before mpi4py's
    ``MPI`` is imported."""
    if not any(k in env for k in LAUNCHED):
        env.setdefault("OMPI_MCA_pml", "ob1")
        env.setdefault("OMPI_MCA_btl", "self,vader")
        env.setdefault("OMPI_MCA_ess_singleton_isolated", "1")


def mpi_environment(env: dict | None = None) -> dict:
    """Environment for a new Open MPI job: no trace of an enclosing MPI job; allow root,
    oversubscription, loopback only."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if not k.startswith(ENCLOSING_JOB)}
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("OMPI_MCA_pml", "ob1")          # shared memory on one node, no network probing
    env.setdefault("OMPI_MCA_btl", "self,vader")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")  # containers lack CMA
    env.setdefault("OMPI_MCA_hwloc_base_binding_policy", "none")  # oversubscribed: don't pin
    # Open MPI 4.1 maps the hwloc topology into shared memory at an address it guesses; when
    # the guess collides, mpiexec/orted segfault in hwloc_shmem_topology_write (seen here about
    # once in a few hundred jobs). Each process reading the topology itself costs milliseconds.
    env.setdefault("OMPI_MCA_rtc_hwloc_vmhole", "none")
    return env


if __name__ == "__main__":   # used by jobs/*.sbatch: srun ${plugin:+--mpi=$plugin}
    if sys.argv[1:] != ["srun-mpi"]:
        sys.exit("usage: python -m fourdstream.launch srun-mpi")
    print(srun_mpi_plugin())
