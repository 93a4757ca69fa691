"""The deployment a configuration implies, before anything starts (``fourdstream plan``).

From the ``[cluster]`` table of a configuration file (see :mod:`fourdstream.config`),
the receiver's ``listen`` endpoint and the routing ``chunk``: which rank runs on
which node and binds what, which positions each rank owns in the first second of
a scan, the load on each rank and on each node's network at the detector's frame
rate, and whether the rates measured by the benchmark harness meet that load
(and with how many nodes they would).

Ranks are placed as ``srun`` places them by default (block distribution): ranks
``0 .. ranks_per_node-1`` on the first node, and so on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .detector import FRAME_BYTES, N_SECTORS, ScanGeometry, parse_scan_size
from .route import DEFAULT_CHUNK, check_chunk, owner
from .transport import expand

#: The 4D Camera's frame rate (frames/s).
DETECTOR_FPS = 87_000
FRAME_BITS = FRAME_BYTES * 8


@dataclasses.dataclass
class Deployment:
    nodes: int = 1
    ranks_per_node: int = 1
    cores_per_node: int = 128
    network_gbit_per_node: float = 200.0
    node_names: list = None
    frame_rate: float = DETECTOR_FPS
    scan: str = "512x512"
    listen: str = "tcp://*:6000"
    chunk: int = DEFAULT_CHUNK

    @classmethod
    def from_config(cls, data: dict, path="configuration") -> "Deployment":
        """From a loaded configuration (``[cluster]``, ``[receive] listen``, ``chunk``)."""
        from .config import check_cluster

        fields = check_cluster(data.get("cluster", {}), path)
        receive = {k.replace("-", "_"): v for k, v in data.get("receive", {}).items()}
        if "listen" in receive:
            fields["listen"] = receive["listen"]
        chunk = receive.get("chunk", data.get("chunk"))
        if chunk is not None:
            fields["chunk"] = chunk
        d = cls(**fields)
        check_chunk(d.chunk)
        parse_scan_size(d.scan)
        if d.node_names is not None and len(d.node_names) != d.nodes:
            raise ValueError(f"{path}: [cluster] node_names lists {len(d.node_names)} names "
                             f"for {d.nodes} nodes")
        return d

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    def node_of(self, rank: int) -> str:
        i = rank // self.ranks_per_node
        return self.node_names[i] if self.node_names else f"node{i}"

    def bindings(self) -> list[tuple[int, str, list[str]]]:
        """``(rank, node, [module 0..3 endpoints])`` for every rank (``*`` = every interface
        of that node)."""
        urls = expand(self.listen, self.ranks * N_SECTORS)
        return [(r, self.node_of(r), urls[r * N_SECTORS:(r + 1) * N_SECTORS])
                for r in range(self.ranks)]

    def first_second(self) -> np.ndarray:
        """Frames each rank receives in the first second of a scan (shape ``(ranks,)``)."""
        g = ScanGeometry.from_probe_grid(*parse_scan_size(self.scan))
        frames = np.arange(min(int(self.frame_rate), g.n_frames))
        return np.bincount(owner(frames // g.frames_per_position, self.ranks, self.chunk),
                           minlength=self.ranks)

    def loads(self) -> dict:
        """Frames/s and Gbit/s per rank and per node at ``frame_rate``, all ranks at once."""
        share = self.first_second() / max(self.first_second().sum(), 1)
        rank_fps = share * self.frame_rate
        node_fps = rank_fps.reshape(self.nodes, self.ranks_per_node).sum(axis=1)
        return {"rank_fps": rank_fps, "rank_gbit": rank_fps * FRAME_BITS / 1e9,
                "node_fps": node_fps, "node_gbit": node_fps * FRAME_BITS / 1e9}


def latest_record(path) -> dict | None:
    """The last record of a harness results file (JSON lines), or None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def assess(d: Deployment, record: dict) -> dict:
    """The harness's sizing of ``record`` for this deployment's nodes, network and rate."""
    from .bench import sizing

    sz = sizing(record, d.cores_per_node, d.network_gbit_per_node, d.frame_rate)
    # One rank per core is the sizing's unit; this deployment runs ranks_per_node per node.
    usable = min(d.ranks_per_node, d.cores_per_node)
    for stage, s in sz["stages"].items():
        if "frames_per_s_per_core" in s:
            per_node = s["frames_per_s_per_core"] * usable
            s["nodes_at_this_rank_count"] = int(np.ceil(d.frame_rate / per_node))
    sz["meets"] = all(d.nodes >= s.get("nodes_at_this_rank_count", s["nodes"])
                      for s in sz["stages"].values())
    return sz


def _runs(positions: np.ndarray, shown: int = 4) -> str:
    """``0-15, 64-79, ... (N chunks)`` for a sorted array of positions."""
    if len(positions) == 0:
        return "none"
    cut = np.flatnonzero(np.diff(positions) != 1) + 1
    starts, stops = np.r_[positions[:1], positions[cut]], np.r_[positions[cut - 1], positions[-1:]]
    text = ", ".join(f"{a}-{b}" for a, b in zip(starts[:shown], stops[:shown]))
    return text + (f", ... ({len(starts)} runs)" if len(starts) > shown else "")


def report(d: Deployment, record: dict | None, record_name: str = "") -> str:
    """The plan as text."""
    g = ScanGeometry.from_probe_grid(*parse_scan_size(d.scan))
    loads = d.loads()
    lines = [f"deployment: {d.nodes} node(s) x {d.ranks_per_node} rank(s) = {d.ranks} ranks, "
             f"{d.cores_per_node} cores and {d.network_gbit_per_node:g} Gbit/s per node; routing "
             f"chunk {d.chunk} positions",
             f"scan {d.scan} ({g.n_frames:,} frames with the flyback column) at "
             f"{d.frame_rate:,.0f} frames/s: {g.n_frames / d.frame_rate:.1f} s, "
             f"{d.frame_rate * FRAME_BITS / 1e9:,.0f} Gbit/s from the detector", "",
             "rank  node        binds (modules 0-3)"]
    for rank, node, urls in d.bindings():
        lines.append(f"{rank:>4}  {node:<10}  {', '.join(urls)}")
    lines += ["", f"first second of the scan (frames 0-{min(int(d.frame_rate), g.n_frames) - 1}):"]
    frames = np.arange(min(int(d.frame_rate), g.n_frames))
    owners = owner(frames // g.frames_per_position, d.ranks, d.chunk)
    for rank in range(d.ranks):
        mine = np.unique(frames[owners == rank] // g.frames_per_position)
        lines.append(f"{rank:>4}  {len(mine):>7,} positions: {_runs(mine)}")
    lines += ["", "load at the full rate, every rank at once:",
              f"  per rank: {loads['rank_fps'].min():,.0f}-{loads['rank_fps'].max():,.0f} frames/s, "
              f"{loads['rank_gbit'].max():.1f} Gbit/s at most",
              f"  per node: {loads['node_gbit'].max():.1f} Gbit/s at most of "
              f"{d.network_gbit_per_node:g} ({loads['node_gbit'].max() / d.network_gbit_per_node:.0%})"]
    if record is None:
        lines += ["", "no harness record: run `fourdstream bench` (or pass --bench FILE) to check "
                      "the rates against this load"]
        return "\n".join(lines)
    sz = assess(d, record)
    m = record["machine"]
    lines += ["", f"rates measured by the harness ({record_name or 'record'}, {record['timestamp']}, "
                  f"{m['hostname']}, {m['cpu_count']} CPUs), per core, times one busy core per rank "
                  f"({min(d.ranks_per_node, d.cores_per_node)} per node; a rank's other cores "
                  f"are not counted on):"]
    for stage, s in sz["stages"].items():
        if stage == "network":
            lines.append(f"  network     {d.frame_rate * FRAME_BITS / 1e9:,.0f} Gbit/s in all -> "
                         f"{s['nodes']} node(s)")
        else:
            lines.append(f"  {stage:<11} {s['frames_per_s_per_core']:>8,.0f} frames/s/core -> "
                         f"{s['nodes_at_this_rank_count']} node(s) at {d.ranks_per_node} ranks/node "
                         f"({s['nodes']} at one rank per core)")
    need = max(s.get("nodes_at_this_rank_count", s["nodes"]) for s in sz["stages"].values())
    if "end_to_end" not in sz["stages"]:
        lines.append("verdict: none; the record has no run of several ranks with every rank busy "
                     "(run `fourdstream bench --stages scaling`)")
        return "\n".join(lines)
    lines.append(f"verdict: {d.nodes} node(s) {'meet' if sz['meets'] else 'do NOT meet'} "
                 f"{d.frame_rate:,.0f} frames/s; it takes {need} node(s) at {d.ranks_per_node} "
                 f"ranks/node (end to end from {sz['end_to_end_basis']})")
    return "\n".join(lines)
