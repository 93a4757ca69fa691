"""A throwaway Slurm cluster on this machine, for the tests of ``jobs/*.sbatch``.

Debian's ``slurm-wlm`` runs several ``slurmd`` on one host (one per fake node,
each with its own port, spool, log and TmpFS) and, as root, needs no systemd.
Everything lives in one folder: munge's key and socket, the configuration, the
controller's state, the nodes' spools. :meth:`SlurmCluster.stop` kills what
:meth:`SlurmCluster.start` started, by the pids it recorded, whatever state the
jobs are in.

The nodes advertise ``Features=cpu`` (as Perlmutter's CPU nodes do) so the job
scripts' ``--constraint=cpu`` holds; each has at least 4 CPUs (more than a small host
has: ranks are oversubscribed, as with ``mpiexec`` on a workstation).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel")


def missing() -> str | None:
    """Why a cluster cannot start here (None when it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): "
                f"scripts/setup.sh --test installs slurm-wlm and munge as root on Debian")
    if os.geteuid() != 0:
        return "the throwaway Slurm cluster runs its daemons as root"
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """``nodes`` fake nodes (``n1``, ``n2``, ...) and one partition ``test``."""

    def __init__(self, root: Path, nodes: int = 2):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = max(os.cpu_count() or 1, 4)   # 4 ranks on one fake node (oversubscribed)
        self.pids: list[int] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict:
        """Environment for ``sbatch``/``srun``/``squeue`` against this cluster."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        for name in list(env):   # a test run inside another allocation must not leak into ours
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del env[name]
        return env

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
            for node in self.nodes:
                self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, then kill the daemons (and anything left in their process groups)."""
        if self.pids and self.conf.exists():
            subprocess.run(["scancel", "--full", "--partition=test"], env=self.env,
                           capture_output=True, timeout=20)
        for pid in reversed(self.pids):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.05)
                if not _alive(pid):
                    break
        self.pids.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- jobs -----------------------------------------------------------------------------------
    def sbatch(self, script, *args, options=(), cwd=None) -> int:
        """Submit ``script args...`` with sbatch ``options``; the job id."""
        out = subprocess.run(["sbatch", "--parsable", "--partition=test", *options, str(script),
                              *map(str, args)],
                             env=self.env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def _field(self, job: int, name: str, default: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", str(job), "-o"], env=self.env,
                             capture_output=True, text=True, timeout=10)
        for field in out.stdout.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return default

    def state(self, job: int) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...)."""
        return self._field(job, "JobState", "UNKNOWN")

    def exit_code(self, job: int) -> str:
        return self._field(job, "ExitCode", "?")

    def wait(self, job: int, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED",
                                                      "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")):
        """Wait until the job reaches one of ``until``; its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in until:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout:.0f} s")

    def scancel(self, job: int, signal_name: str | None = None) -> None:
        args = ["scancel", *([f"--signal={signal_name}", "--full"] if signal_name else []), str(job)]
        subprocess.run(args, env=self.env, check=True, capture_output=True, timeout=20)

    def logs(self) -> str:
        """The daemons' logs (for a failing test's report)."""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    # -- internals ------------------------------------------------------------------------------
    def _spawn(self, argv, name):
        log = open(self.root / f"{name}.out", "wb")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.pids.append(proc.pid)

    def _start_munge(self):
        folder = self.munge_socket.parent
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        key = folder / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
                     f"--log-file={self.root / 'munged.log'}",
                     f"--seed-file={folder / 'munged.seed'}"], "munged")
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not start:\n" + self.logs())
            time.sleep(0.05)

    def _write_conf(self):
        host = socket.gethostname()
        ctld, *node_ports = free_ports(1 + len(self.nodes))
        for sub in ("state", "spool", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        for node in self.nodes:
            (self.root / "tmp" / node).mkdir(exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=fourdstream-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            f"TmpFS={r / 'tmp'}/%n",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none",            # Slurm's own default: the job scripts must choose
            "SlurmdParameters=config_overrides",
            "ReturnToService=2", "SchedulerType=sched/builtin",
            "KillWait=5", "MinJobAge=600", "InactiveLimit=0",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} Features=cpu State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=FORCE:4")
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env,
                                 capture_output=True, text=True, timeout=10)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s:\n" + self.logs())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie of ours counts as gone once reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True
