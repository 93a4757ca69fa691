"""Errors that every MPI rank raises together, so a job ends cleanly instead of hanging.

:func:`agree` runs a step on every rank and, if it failed anywhere, raises the
same :class:`CollectiveError` on all of them; :func:`on_root` runs a step on
rank 0 and shares its result or its error. The command line prints a
CollectiveError once (rank 0) and exits 1; any other error aborts the job.
"""

from __future__ import annotations

import time

#: Seconds between the checks of a rank waiting patiently (see :func:`wait_for_all`).
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


def wait_for_all(comm) -> None:
    """Return once every rank of ``comm`` has called this, sleeping between checks (every
    millisecond). MPI's own waits spin: where ranks outnumber cores, a rank spinning in a
    collective call takes the core that the rank it waits for needs."""
    if comm.size > 1:
        arrived = comm.Ibarrier()
        while not arrived.Test():
            time.sleep(PATIENT_POLL)


def on_root(comm, fn, error=CollectiveError, *, patient: bool = False):
    """Run ``fn`` on rank 0; return its result on every rank, or raise its error on every rank.

    ``patient``: the other ranks sleep while rank 0 works (:func:`wait_for_all`), for a
    long step of rank 0's own.
    """
    result = message = None
    if comm.rank == 0:
        try:
            result = fn()
        except Exception as exc:
            message = str(exc) if isinstance(exc, CollectiveError) else f"{type(exc).__name__}: {exc}"
    if patient:
        wait_for_all(comm)
    result, message = comm.bcast((result, message), root=0)
    if message:
        raise error(message)
    return result
