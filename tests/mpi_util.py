"""Helper for scripts run under mpiexec by the tests."""

import json

from mpi4py import MPI


def report(result: dict, comm=MPI.COMM_WORLD) -> None:
    """Gather every rank's result to rank 0, which prints them as one JSON line."""
    results = comm.gather(dict(result, rank=comm.rank), root=0)
    if comm.rank == 0:
        print(json.dumps(results), flush=True)
