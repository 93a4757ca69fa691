"""Starting MPI jobs from Python (the demo, the benchmarks, the tests).

Open MPI refuses to run as root and to put more ranks than cores on a machine
unless told; workstations and CI containers need both, clusters use srun.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def mpiexec_command(n: int, argv: list[str]) -> list[str]:
    """``mpiexec -n N argv...`` (use with :func:`mpi_environment`).

    ``FOURDSTREAM_MPIEXEC`` replaces the launcher, e.g. ``srun`` or ``srun --cpu-bind=cores``
    inside a Slurm allocation (Cray MPICH has no mpiexec).
    """
    launcher = os.environ.get("FOURDSTREAM_MPIEXEC")
    if launcher:
        return [*shlex.split(launcher), "-n", str(n), *argv]
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("mpiexec not found: install Open MPI (scripts/setup.sh does) or set "
                           "FOURDSTREAM_MPIEXEC to your cluster's launcher (e.g. srun)")
    return [exe, "-n", str(n), *argv]


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


def mpi_environment(env: dict | None = None) -> dict:
    """Environment for a local Open MPI run: allow root, oversubscription, loopback only."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("OMPI_MCA_btl", "self,vader")   # shared memory on one node, no network probing
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")  # containers lack CMA
    env.setdefault("OMPI_MCA_hwloc_base_binding_policy", "none")  # oversubscribed: don't pin
    return env
