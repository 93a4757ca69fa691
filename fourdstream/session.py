"""A streaming session that outlives a failed receiver job.

If a rank dies, MPI ends the whole job. :func:`supervise` (``fourdstream session``)
runs the receiver job (``mpiexec``, or ``srun`` inside a Slurm allocation through
``FOURDSTREAM_MPIEXEC``) and starts it again, up to ``restarts`` times, on the same
ports: senders block while no rank takes their messages (up to their
``--send-timeout``) and ZeroMQ reconnects them by itself, so the next scan reaches
the restarted job. A lost job costs the scans in flight only: they are recorded
as failed, and the restarted job ignores what is left of them (counted as late
messages) instead of writing a fragment under the scan's name.

The job tells the supervisor what it did through a **journal**: a JSON-lines file
to which rank 0 appends, as it happens, ``{"event": "opened", "scan": N}`` when a
scan's first message arrives, ``{"event": "written", "scan": N, ...summary}`` and
``{"event": "failed", "scan": N, "reason": ...}`` (``receive --journal FILE``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from .detector import N_SECTORS
from .launch import mpi_environment, mpiexec_command, python_argv
from .transport import free_port_block


class Journal:
    """Append-only JSON lines, one event per line, flushed as written (rank 0's pen)."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: str, scan: int, **fields) -> None:
        line = json.dumps({"event": event, "scan": scan, "time": time.time(), **fields})
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")

    def opened(self, scan: int) -> None:
        self.append("opened", scan)

    @staticmethod
    def read(path) -> list[dict]:
        """The events in ``path`` (none if it does not exist; a torn last line is ignored)."""
        path = Path(path)
        if not path.exists():
            return []
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


def scans_by_outcome(events: list[dict]) -> dict[str, set[int]]:
    """``{"opened", "written", "failed"}`` -> scan numbers."""
    out = {"opened": set(), "written": set(), "failed": set()}
    for e in events:
        out.setdefault(e["event"], set()).add(e["scan"])
    return out


def pinned_listen(listen: str | None, connect, ranks: int) -> str | None:
    """The ``--listen`` the restarts share: ``*`` ports become one fixed free block, so a
    restarted job binds the addresses the senders already use (None: senders bind)."""
    if connect:
        return None
    listen = listen or "tcp://127.0.0.1:*"
    host, port = listen[6:].rsplit(":", 1)
    if port != "*":
        return listen
    return f"tcp://{host}:{free_port_block(ranks * N_SECTORS, host)}"


def supervise(ranks: int, receive_args: list[str], *, journal, listen: str | None, connect=(),
              scans: int = 0, restarts: int = 3, say=print) -> dict:
    """Run ``fourdstream receive receive_args`` on ``ranks`` ranks, restarting it after a
    failure; returns ``{"written", "failed", "restarts", "status"}``.

    ``listen``/``connect``/``scans`` are the receiver's own (``scans``: stop once this
    many scans are written or failed). SIGINT/SIGTERM to this process go to the job,
    which writes the scans in flight and ends; no restart follows.
    """
    journal = Journal(journal)
    listen = pinned_listen(listen, connect, ranks)
    stopping = threading.Event()
    child: list[subprocess.Popen] = []

    def forward(signum, frame):
        stopping.set()
        for p in child:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    attempt, status = 0, 0
    try:
        while True:
            done = scans_by_outcome(Journal.read(journal.path))
            left = scans - len(done["written"] | done["failed"]) if scans else 0
            if scans and left <= 0:
                break
            argv = ["receive", *receive_args, "--journal", str(journal.path),
                    *(["--listen", listen] if listen else []),
                    *(["--scans", str(left)] if scans else []),
                    *[a for scan in sorted(done["failed"]) for a in ("--skip-scan", str(scan))]]
            child[:] = [subprocess.Popen(mpiexec_command(ranks, python_argv("fourdstream", *argv)),
                                         env=mpi_environment(), start_new_session=True)]
            status = child[0].wait()
            if status == 0 or stopping.is_set():
                break
            done = scans_by_outcome(Journal.read(journal.path))
            for scan in sorted(done["opened"] - done["written"] - done["failed"]):
                journal.append("failed", scan, reason=f"the receiver job ended (status {status}) "
                                                      f"while the scan was in flight")
                say(f"session: scan {scan} lost with the receiver job (status {status})")
            if attempt >= restarts:
                say(f"session: the receiver job failed (status {status}) and {restarts} "
                    f"restart(s) are used up")
                break
            attempt += 1
            say(f"session: the receiver job ended with status {status}; restarting it "
                f"({attempt}/{restarts}) on {listen or 'the senders addresses'}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    events = Journal.read(journal.path)
    return {"written": [e for e in events if e["event"] == "written"],
            "failed": [e for e in events if e["event"] == "failed"],
            "restarts": attempt, "status": 0 if stopping.is_set() else status}
