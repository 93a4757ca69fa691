"""The local end-to-end demo: 4 simulated senders -> an mpiexec receiver job -> counted HDF5.

What ``make demo`` runs. It starts the receiver job (``mpiexec -n RANKS python -m
fourdstream receive``, ranks binding free loopback ports and publishing them in an
endpoints file), then one ``fourdstream send`` process per detector module
streaming a simulated scan, waits for the counted file, and returns the
receiver's summary. A frame missing or incomplete in the file is a
:class:`DemoError` (the demo is a check that the whole path works).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from .launch import mpi_environment, mpiexec_command, python_argv
from .transport import read_endpoints


#: Seconds the senders get to start (imports, simulated frames) before the scan begins.
SENDER_START_SECONDS = 4.0


class DemoError(RuntimeError):
    """A process of the demo failed; the message says which and how."""


def run_demo(output: str, *, scan: str = "64x64", ranks: int = 2, dose: float = 150.0,
             seed: int = 0, pool_frames: int = 512, rate: float = 0.0, counting_args=(),
             receiver_args=(), timeout: float = 600.0, echo=print) -> dict:
    """Run the demo; returns the summary of the written scan (see module docstring).

    ``counting_args`` and ``receiver_args`` are passed on to ``fourdstream receive``.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    endpoints, summary_file = out / "endpoints.json", out / "summary.json"
    for stale in (endpoints, summary_file):
        stale.unlink(missing_ok=True)
    receiver_cmd = mpiexec_command(ranks, python_argv(
        "fourdstream", "receive", "-o", str(out), "--endpoints-file", str(endpoints), "--scans", "1",
        "--summary-json", str(summary_file), *counting_args, *receiver_args))
    receiver = subprocess.Popen(receiver_cmd, env=mpi_environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    echoing = threading.Thread(target=_echo_lines, args=(receiver.stdout, echo, "receiver"), daemon=True)
    echoing.start()
    senders = []
    try:
        _wait_for_endpoints(endpoints, receiver)
        t0 = time.time()
        start_at = t0 + SENDER_START_SECONDS   # all modules start together, as on a trigger
        for m in range(4):
            senders.append(subprocess.Popen(python_argv(
                "fourdstream", "send", "--module", str(m), "--simulate", scan, "--dose", str(dose),
                "--seed", str(seed), "--pool-frames", str(pool_frames), "--rate", str(rate),
                "--start-at", str(start_at), "--endpoints-file", str(endpoints)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for m, p in enumerate(senders):
            text, _ = p.communicate(timeout=timeout)
            echo(f"[sender {m}] {text.strip()}")
            if p.returncode:
                raise DemoError(f"sender of module {m} failed (exit {p.returncode})")
        if receiver.wait(timeout=timeout):
            raise DemoError(f"the receiver job failed (exit {receiver.returncode}); see its output above")
        echoing.join(timeout=5)
    except subprocess.TimeoutExpired:
        raise DemoError(f"the demo did not finish within {timeout:.0f} s") from None
    finally:
        for p in senders + [receiver]:
            if p.poll() is None:
                p.kill()
    summaries = json.loads(summary_file.read_text()) if summary_file.exists() else []
    if not summaries or "failed" in summaries[0]:
        raise DemoError("the receiver wrote no scan; see its output above")
    return check_whole(dict(summaries[0], wall_seconds=time.time() - t0))


def check_whole(summary: dict) -> dict:
    """``summary`` if its scan arrived whole, else a :class:`DemoError` saying what is missing."""
    s = summary
    if s["missing"] or s["incomplete"]:
        raise DemoError(f"{s['missing']:,} frames missing and {s['incomplete']:,} incomplete of "
                        f"{s['expected']:,} in {s['path']}; see the receiver's output above")
    return s


def _wait_for_endpoints(path: Path, receiver: subprocess.Popen, wait: float = 60.0) -> None:
    deadline = time.monotonic() + wait
    while not path.exists():
        if receiver.poll() is not None:
            raise DemoError(f"the receiver job exited early (exit {receiver.returncode}); is MPI set "
                            f"up? (scripts/setup.sh)")
        if time.monotonic() > deadline:
            raise DemoError(f"the receiver job published no endpoints within {wait:.0f} s")
        time.sleep(0.05)
    read_endpoints(path)


def _echo_lines(stream, echo, label: str) -> None:
    for line in stream:
        echo(f"[{label}] {line.rstrip()}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: fourdstream demo")
