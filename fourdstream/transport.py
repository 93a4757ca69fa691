"""ZeroMQ endpoints between senders and receiver ranks, and which side binds.

Every sender holds one PUSH socket per rank and routes a sector by choosing the
socket, which keeps the four sectors of a frame together (a single PUSH socket
would round-robin them over ranks). Every rank holds one PULL socket per module,
so that it can read from the modules that are behind and let the high-water
mark hold back the ones ahead (see :mod:`fourdstream.receive`). Either side may
bind:

* **receivers bind** (default; a workstation): rank ``r`` binds its module-``m``
  socket at ``tcp://HOST:PORT + 4r + m`` (``PORT`` = ``*`` picks free ports) and
  rank 0 writes the bound addresses, and the routing chunk the ranks expect, to
  an endpoints file; senders connect.
* **senders bind** (compute nodes that accept no inbound connections): the
  sender of module ``m`` binds ``tcp://HOST:PORT + r`` for every rank ``r``;
  rank ``r`` connects its module-``m`` socket to ``PORT + r`` of that sender
  (``receive --connect`` lists the senders in module order).

An endpoint spec is ``tcp://HOST:PORT``; :func:`expand` turns it into addresses.
``HOST`` may be an interface name (``tcp://hsn0:6000``): each rank then binds the
address of that interface on its own node, and the endpoints file carries that
address (with ``*`` it carries the host name).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import zmq

from . import security
from .collective import CollectiveError
from .detector import N_SECTORS
from .route import DEFAULT_CHUNK, check_chunk

#: Defaults of the NCEM producers: send high-water mark and send timeout.
DEFAULT_HWM = 1000
DEFAULT_SEND_TIMEOUT = 10.0  # seconds


def expand(spec: str, n: int) -> list[str]:
    """``tcp://host:PORT`` -> ``[tcp://host:PORT, ..., tcp://host:PORT+n-1]``.

    With ``PORT`` = ``*`` every entry is ``tcp://host:*`` (free ports, bind only).
    """
    if not spec.startswith("tcp://") or ":" not in spec[6:]:
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {spec!r}")
    host, port = spec[6:].rsplit(":", 1)
    if port == "*":
        return [spec] * n
    try:
        base = int(port)
    except ValueError:
        raise ValueError(f"endpoint port must be a number or *, got {spec!r}") from None
    return [f"tcp://{host}:{base + i}" for i in range(n)]


def advertised(url: str, host: str | None = None) -> str:
    """Address others can connect to for a socket bound at ``url``."""
    bound_host, port = url[6:].rsplit(":", 1)
    if host is None:
        host = socket.gethostname() if bound_host in ("*", "0.0.0.0") else bound_host
    return f"tcp://{host}:{port}"


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A base port with ``n`` consecutive ports free on ``host``, below the kernel's
    ephemeral range: outgoing connections never take those ports, so a block found free
    stays free until it is bound (ports from the ephemeral range can be taken meanwhile
    by any process's outgoing connection)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    bind_host = "0.0.0.0" if host in ("*", "0.0.0.0") else host
    for _ in range(200):
        base = random.randrange(10000, max(low - n, 10001))
        taken = []
        try:
            for i in range(n):
                s = socket.socket()
                taken.append(s)
                s.bind((bind_host, base + i))
            return base
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports below {low} on {host}")


def write_endpoints(path, urls: list[list[str]], chunk: int = DEFAULT_CHUNK) -> None:
    """Write the ranks' addresses (``urls[rank][module]``) and the routing chunk atomically
    (senders may be polling for the file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"ranks": urls, "chunk": chunk}))
    os.replace(tmp, path)


def read_endpoints(path, wait: float = 60.0) -> dict:
    """``{"ranks": [[address per module] per rank], "chunk": positions}`` from an
    endpoints file, waiting up to ``wait`` s for it to appear."""
    path = Path(path)
    deadline = time.monotonic() + wait
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no endpoints file {path} after {wait:.0f} s: is the receiver "
                               f"job running (fourdstream receive --endpoints-file {path})?")
        time.sleep(0.05)
    found = json.loads(path.read_text())
    return {"ranks": found["ranks"], "chunk": check_chunk(found.get("chunk", DEFAULT_CHUNK))}


def push_sockets(ctx: zmq.Context, urls: list[str], *, bind: bool, hwm: int = DEFAULT_HWM,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT, keys=None) -> list[zmq.Socket]:
    """One PUSH socket per rank, bound or connected to ``urls[r]`` (CURVE clients with
    ``keys``, see :mod:`fourdstream.security`).

    Messages queue only on established connections (``ZMQ_IMMEDIATE``), so a
    rank that is gone blocks its sender at once instead of after ``hwm`` more
    messages. Queued messages get at most ``send_timeout`` s to leave when a
    socket closes.
    """
    sockets = []
    for url in urls:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.LINGER, int(send_timeout * 1000))
        if keys is not None:
            security.as_client(s, keys)
        (s.bind if bind else s.connect)(url)
        sockets.append(s)
    return sockets


def pull_socket(ctx: zmq.Context, *, bind: str | None = None, connect: list[str] = (),
                hwm: int = DEFAULT_HWM, keys=None) -> tuple[zmq.Socket, str | None]:
    """A rank's PULL socket, bound at ``bind`` and/or connected to ``connect`` (a CURVE
    server with ``keys``, whichever side binds).

    Returns the socket and the address it was bound to (resolved ``*`` port).
    """
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        security.as_server(s, keys)
    bound = None
    if bind:
        s.bind(bind)
        bound = s.getsockopt(zmq.LAST_ENDPOINT).decode()
    for url in connect:
        s.connect(url)
    return s, bound


def rank_sockets(ctx: zmq.Context, comm, *, listen: str | None, connect: list[str] = (),
                 endpoints_file=None, advertise: str | None = None, hwm: int = DEFAULT_HWM,
                 chunk: int = DEFAULT_CHUNK, keys=None, say=print) -> list[zmq.Socket]:
    """This MPI rank's PULL sockets, one per module (collective over ``comm``).

    ``listen``: spec the ranks bind; ``connect``: the senders' specs in module
    order (senders bind). Rank 0 writes the bound addresses and the routing
    ``chunk`` to ``endpoints_file``, and ``say``s a warning if the ranks bind
    beyond loopback without CURVE ``keys``.
    """
    if listen and comm.rank == 0:
        security.warn_if_exposed(listen, keys, say)
    if bool(listen) == bool(connect):
        raise ValueError("give either --listen (ranks bind) or --connect (senders bind)")
    if connect and len(connect) != N_SECTORS:
        raise ValueError(f"--connect lists the {N_SECTORS} module senders in module order; "
                         f"got {len(connect)}")
    sockets, bound, problem = [], [], None
    try:
        for m in range(N_SECTORS):
            if listen:
                url = expand(listen, comm.size * N_SECTORS)[comm.rank * N_SECTORS + m]
                sock, address = pull_socket(ctx, bind=url, hwm=hwm, keys=keys)
                bound.append(advertised(address, advertise))
            else:
                sock, _ = pull_socket(ctx, connect=[expand(connect[m], comm.size)[comm.rank]], hwm=hwm,
                                      keys=keys)
            sockets.append(sock)
    except zmq.ZMQError as exc:   # e.g. a port in use: every rank must hear of it
        problem = f"rank {comm.rank}: cannot set up its sockets: {exc}"
    everyone = comm.allgather((bound, problem))
    problems = [p for _, p in everyone if p]
    if problems:
        for sock in sockets:
            sock.close()
        raise CollectiveError(problems[0])
    if comm.rank == 0 and endpoints_file and listen:
        write_endpoints(endpoints_file, [addresses for addresses, _ in everyone], chunk)
    return sockets


def sender_sockets(ctx: zmq.Context, module: int, *, endpoints_file=None, connect: str | None = None,
                   listen: str | None = None, ranks: int = 0, hwm: int = DEFAULT_HWM,
                   send_timeout: float = DEFAULT_SEND_TIMEOUT, wait: float = 60.0, keys=None,
                   say=print) -> tuple[list[zmq.Socket], int | None]:
    """Module ``module``'s PUSH sockets, one per rank, from exactly one endpoint option
    (CURVE clients with ``keys``; binding beyond loopback without them ``say``s a warning).

    Returns the sockets and the routing chunk the ranks announced in the
    endpoints file (None without one).
    """
    given = [o for o in (endpoints_file, connect, listen) if o]
    if len(given) != 1:
        raise ValueError("give exactly one of --endpoints-file, --connect or --listen")
    chunk = None
    if endpoints_file:
        found = read_endpoints(endpoints_file, wait)
        urls, bind, chunk = [rank[module] for rank in found["ranks"]], False, found["chunk"]
    elif ranks < 1:
        raise ValueError("--connect/--listen need --ranks (the receiver job's rank count)")
    elif connect:
        urls, bind = expand(connect, ranks * N_SECTORS)[module::N_SECTORS], False
    else:
        urls, bind = expand(listen, ranks), True
        security.warn_if_exposed(listen, keys, say)
    return push_sockets(ctx, urls, bind=bind, hwm=hwm, send_timeout=send_timeout, keys=keys), chunk
