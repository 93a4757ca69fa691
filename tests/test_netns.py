"""Nodes with a network of their own: a DAQ host and two compute nodes in Linux network
namespaces, joined by veth pairs and a bridge, the DAQ's link shaped by ``tc``.

The receiver job spans the two nodes the way Open MPI spans real hosts: ``mpiexec
--host`` starts one ``orted`` per node through a launch agent that enters the
node's namespace (as ``ssh`` enters a host), and the ranks talk over TCP on the
bridge. Ranks bind their node's own address by interface name (``tcp://IFACE:PORT``),
so the endpoints file carries real addresses; senders run inside the DAQ namespace,
so their frames cross the shaped link. Only addresses of the namespaces made here
are used, and everything is removed at the end.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fourdstream.detector import FRAME_PIXELS, ScanGeometry, parse_scan_size
from fourdstream.io import open_counted
from fourdstream.launch import mpi_environment, mpiexec_command
from fourdstream.simulate import Simulator
from test_streaming import offline

SCAN, SEED = "24x16", 5                 # 25x16 = 400 frames
LINK_MBIT = 1000                        # the DAQ host's link (tbf)
LINK_DELAY_MS = 1                       # added with netem where the kernel has it
IFACE = "fsnet0"                        # every node's interface, named alike in each namespace


_SERIAL = itertools.count()


def _ip(*args, ns=None, check=True):
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=20)


class Nodes:
    """Namespaces ``<tag>-daq``, ``<tag>-n1``, ``<tag>-n2`` on a bridge, subnet 10.<a>.<b>.0/24."""

    def __init__(self, tmp_path):
        serial = next(_SERIAL)   # fresh names per test: a veth of a deleted namespace lingers a while
        tag = f"fs{os.getpid() % 100000}{serial}"
        self.bridge, self.names = f"{tag}br", {role: f"{tag}-{role}" for role in ("daq", "n1", "n2")}
        a, b = 200 + os.getpid() % 50, (os.getpid() // 50 + serial) % 250
        self.subnet = f"10.{a}.{b}"
        self.address = {"daq": f"{self.subnet}.2", "n1": f"{self.subnet}.11", "n2": f"{self.subnet}.12"}
        self.agent = tmp_path / "netns-agent"
        self.delay = None
        self.made = []

    def up(self):
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for role, ns in self.names.items():
            _ip("netns", "add", ns)
            self.made.append(("netns", ns))
            host_end = f"{self.bridge}{role}"[:15]
            _ip("link", "add", host_end, "type", "veth", "peer", "name", IFACE, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge, "up")
            _ip("addr", "add", f"{self.address[role]}/24", "dev", IFACE, ns=ns)
            _ip("link", "set", IFACE, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        daq = ["ip", "netns", "exec", self.names["daq"], "tc", "qdisc", "add", "dev", IFACE, "root"]
        netem = subprocess.run(daq + ["netem", "delay", f"{LINK_DELAY_MS}ms", "rate", f"{LINK_MBIT}mbit"],
                               capture_output=True, text=True)
        if netem.returncode == 0:
            self.delay = LINK_DELAY_MS
        else:   # this kernel lacks sch_netem (CONFIG_NET_SCH_NETEM): bandwidth only
            subprocess.run(daq + ["tbf", "rate", f"{LINK_MBIT}mbit", "burst", "256kb", "latency", "50ms"],
                           check=True, capture_output=True, text=True)
        self.agent.write_text('#!/bin/sh\n# mpiexec launch agent: "ssh HOST CMD" = run CMD in namespace HOST\n'
                              'host=$1; shift\nexec ip netns exec "$host" sh -c "$*"\n')
        self.agent.chmod(0o755)
        return self

    def down(self):
        for kind, name in reversed(self.made):
            if kind == "netns":
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split()
                for pid in pids:
                    subprocess.run(["kill", "-9", pid], capture_output=True)
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)

    def in_ns(self, role, argv):
        return ["ip", "netns", "exec", self.names[role], *argv]

    def receiver(self, *args):
        """``mpiexec`` of 4 receiver ranks, 2 on each compute node."""
        env = mpi_environment(dict(os.environ, OMPI_MCA_plm_rsh_agent=str(self.agent),
                                   OMPI_MCA_btl="self,tcp",
                                   OMPI_MCA_btl_tcp_if_include=f"{self.subnet}.0/24",
                                   OMPI_MCA_oob_tcp_if_include=f"{self.subnet}.0/24"))
        cmd = mpiexec_command(4, [sys.executable, "-m", "fourdstream", "receive", *map(str, args)])
        cmd[1:1] = ["--host", f"{self.names['n1']}:2,{self.names['n2']}:2"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sender(self, module, *args):
        return subprocess.Popen(self.in_ns("daq", [sys.executable, "-m", "fourdstream", "send", "--module",
                                                   str(module), "--simulate", SCAN, "--seed", str(SEED),
                                                   "--pool-frames", "0", *map(str, args)]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    return None


@pytest.fixture
def nodes(tmp_path):
    if _why_not():
        pytest.skip(_why_not())
    n = Nodes(tmp_path)
    try:
        n.up()
    except subprocess.CalledProcessError as exc:
        n.down()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    yield n
    n.down()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in leftover for name in n.names.values())


def _finish(receiver, senders, timeout=120):
    try:
        for p in senders:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out
        output, _ = receiver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in senders + [receiver]:
            p.kill()
        raise AssertionError(f"did not finish: {receiver.communicate()[0]}") from None
    assert receiver.returncode == 0, output
    return output


def _check_scan(path, summary_path):
    g = ScanGeometry.from_probe_grid(*parse_scan_size(SCAN))
    frames = Simulator(g, dose=150, seed=SEED, pattern="disc").frames(0, g.n_frames)[0]
    events, offsets = offline(frames, 28, 700)
    scan = open_counted(path)
    assert scan.metadata["fourdstream"]["ranks"] == 4 and scan.sector_mask.all()
    assert np.array_equal(scan.offsets, offsets) and np.array_equal(scan.events, events)
    summary = json.loads(summary_path.read_text())[0]
    fps = summary["frames"] / summary["seconds"]   # first sector received -> file closed
    # Every frame crossed the DAQ's shaped link: nothing can arrive faster than it carries.
    capacity = LINK_MBIT * 1e6 / (FRAME_PIXELS * 2 * 8)
    assert fps <= 1.05 * capacity, (fps, capacity)
    assert fps >= 0.3 * capacity, (fps, capacity)   # and the link was used well
    return fps


def test_ranks_bind_their_nodes_addresses_and_senders_cross_a_shaped_link(nodes, tmp_path):
    out, endpoints, summary = tmp_path / "out", tmp_path / "endpoints.json", tmp_path / "s.json"
    receiver = nodes.receiver("-o", out, "--listen", f"tcp://{IFACE}:6000", "--endpoints-file", endpoints,
                              "--scans", 1, "--bg", 28, "--xr", 700, "--summary-json", summary)
    deadline = time.monotonic() + 60
    while not endpoints.exists():
        assert receiver.poll() is None, receiver.communicate()[0]
        assert time.monotonic() < deadline, "no endpoints file"
        time.sleep(0.1)
    ranks = json.loads(endpoints.read_text())["ranks"]
    hosts = [{url[6:].rsplit(":", 1)[0] for url in urls} for urls in ranks]
    assert hosts == [{nodes.address["n1"]}] * 2 + [{nodes.address["n2"]}] * 2   # real addresses
    senders = [nodes.sender(m, "--endpoints-file", endpoints) for m in range(4)]
    _finish(receiver, senders)
    fps = _check_scan(out / "scan0000000001.h5", summary)
    print(f"\nDAQ link {LINK_MBIT} Mbit/s, delay {nodes.delay or 'none (no netem)'} ms: "
          f"{fps:.0f} frames/s, ranks listen")


def test_senders_bind_on_the_daq_host_and_ranks_connect_out(nodes, tmp_path):
    """For sites whose compute nodes accept no inbound connections."""
    out, summary = tmp_path / "out", tmp_path / "s.json"
    daq = nodes.address["daq"]
    senders = [nodes.sender(m, "--listen", f"tcp://{IFACE}:{7000 + 10 * m}", "--ranks", 4)
               for m in range(4)]
    connect = [a for m in range(4) for a in ("--connect", f"tcp://{daq}:{7000 + 10 * m}")]
    receiver = nodes.receiver("-o", out, *connect, "--scans", 1, "--bg", 28, "--xr", 700,
                              "--summary-json", summary)
    _finish(receiver, senders)
    fps = _check_scan(out / "scan0000000001.h5", summary)
    print(f"\nDAQ link {LINK_MBIT} Mbit/s: {fps:.0f} frames/s, senders listen")
