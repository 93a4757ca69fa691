"""Errors that every MPI rank raises together, so a job ends cleanly instead of hanging.

:func:`agree` runs a step on every rank and, if it failed anywhere, raises the
same :class:`CollectiveError` on all of them; :func:`on_root` runs a step on
rank 0 and shares its result or its error. The command line prints a
CollectiveError once (rank 0) and exits 1; any other error aborts the job.
"""

from __future__ import annotations

import time

#: Seconds between the checks of a rank waiting patiently (see :func:`on_root`).
PATIENT_POLL = 0.001


class CollectiveError(RuntimeError):
    """An error raised on every rank of a communicator at the same point."""


def agree(comm, fn, error=CollectiveError):
    """Run ``fn`` on every rank; if any rank fails, raise ``error`` with its message on all."""
    result = message = None
    try:
        result = fn()
    except Exception as exc:
        message = str(exc) if isinstance(exc, CollectiveError) else f"{type(exc).__name__}: {exc}"
        if comm.size > 1:
            message = f"rank {comm.rank}: {message}"
    failures = [m for m in comm.allgather(message) if m]
    if failures:
        more = f" (and {len(failures) - 1} more ranks)" if len(failures) > 1 else ""
        raise error(failures[0] + more)
    return result


def on_root(comm, fn, error=CollectiveError, *, patient: bool = False):
    """Run ``fn`` on rank 0; return its result on every rank, or raise its error on every rank.

    ``patient``: the other ranks sleep while rank 0 works (checking every millisecond)
    instead of waiting in MPI, which spins: where ranks outnumber cores, spinning ranks
    take the cores rank 0 needs for a long step of its own.
    """
    result = message = None
    if comm.rank == 0:
        try:
            result = fn()
        except Exception as exc:
            message = str(exc) if isinstance(exc, CollectiveError) else f"{type(exc).__name__}: {exc}"
    if patient and comm.size > 1:
        arrived = comm.Ibarrier()
        while not arrived.Test():
            time.sleep(PATIENT_POLL)
    result, message = comm.bcast((result, message), root=0)
    if message:
        raise error(message)
    return result
