"""Authenticated streams: ZeroMQ CURVE between senders and receiver ranks.

``fourdstream keys DIR`` makes a key folder::

    DIR/receiver.key, receiver.key_secret    the ranks' key pair (CURVE server)
    DIR/sender.key, sender.key_secret        the senders' and gateways' key pair (client)
    DIR/allowed/sender.key                   the allow-list: public keys the ranks accept

With ``--curve-keys DIR`` every data socket is encrypted and authenticated: a rank
is a CURVE server whichever side binds, runs a ZAP handler that accepts only the
public keys in ``DIR/allowed``, and counts and logs every refused handshake (a key
not on the list, or a peer speaking plain ZeroMQ); a sender needs the ranks'
public key and its own pair. Secret keys never leave their machines: copy
``receiver.key_secret`` only to the compute side and ``sender.key_secret`` only to
the DAQ servers; adding a DAQ server's own pair means dropping its public key into
``allowed/``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import shutil
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

ALLOWED = "allowed"


@dataclasses.dataclass(frozen=True)
class Keys:
    """Keys of one side: its own pair, and the ranks' public key (senders only)."""
    public: bytes
    secret: bytes
    server_public: bytes | None = None
    allowed: Path | None = None      # ranks: the folder of accepted public keys


def make_keys(folder, overwrite: bool = False) -> dict[str, Path]:
    """Create the key pairs and the allow-list in ``folder``; the files made, by name."""
    folder = Path(folder)
    existing = [p for p in (folder / "receiver.key_secret", folder / "sender.key_secret") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: keys in use would stop working; "
                              f"pass --overwrite to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    made = {}
    for name in ("receiver", "sender"):
        public, secret = zmq.auth.create_certificates(folder, name)
        Path(secret).chmod(0o600)
        made[name], made[f"{name}_secret"] = Path(public), Path(secret)
    (folder / ALLOWED).mkdir(exist_ok=True)
    made["allowed"] = Path(shutil.copy(made["sender"], folder / ALLOWED / "sender.key"))
    return made


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: create keys with `fourdstream keys DIR` "
                                f"and copy the files this side needs")
    try:
        public, private = zmq.auth.load_certificate(path)
    except ValueError as exc:
        raise ValueError(f"{path}: not a ZeroMQ certificate ({exc})") from None
    if secret and private is None:
        raise ValueError(f"{path} holds no secret key")
    return public, private


def receiver_keys(folder) -> Keys:
    """The ranks' keys: their pair and the allow-list folder."""
    folder = Path(folder)
    public, secret = _load(folder / "receiver.key_secret", secret=True)
    allowed = folder / ALLOWED
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise FileNotFoundError(f"{allowed} holds no public keys: no sender could connect")
    return Keys(public, secret, allowed=allowed)


def sender_keys(folder) -> Keys:
    """A sender's (or gateway's) keys: its pair and the ranks' public key."""
    folder = Path(folder)
    public, secret = _load(folder / "sender.key_secret", secret=True)
    server, _ = _load(folder / "receiver.key", secret=False)
    return Keys(public, secret, server_public=server)


def as_server(sock: zmq.Socket, keys: Keys) -> None:
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret


def as_client(sock: zmq.Socket, keys: Keys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret


def start_authenticator(ctx: zmq.Context, keys: Keys) -> ThreadAuthenticator:
    """The ZAP handler of a rank's context: only public keys in ``keys.allowed`` get in.

    Must run before the rank's sockets take connections (without a handler, CURVE lets
    in any client that knows the server key)."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("fourdstream.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.allowed))
    return auth


class HandshakeWatch:
    """Counts and logs refused handshakes on a rank's sockets (socket monitor events).

    ``refused``: ``{"key not allowed": n, "not CURVE / wrong key": n}``.
    """

    EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key not allowed",
              zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "not CURVE / wrong key",
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "not CURVE / wrong key"}

    def __init__(self, sockets: list[zmq.Socket], log=lambda message: None):
        mask = 0
        for event in self.EVENTS:
            mask |= event
        self.monitors = [s.get_monitor_socket(mask) for s in sockets]
        self.sockets, self.log = sockets, log
        self.refused = {reason: 0 for reason in set(self.EVENTS.values())}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="handshake-watch", daemon=True)
        self._thread.start()

    def _run(self):
        poller = zmq.Poller()
        for m in self.monitors:
            poller.register(m, zmq.POLLIN)
        while not self._stop.is_set():
            for monitor, _ in poller.poll(100):
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                reason = self.EVENTS.get(event["event"])
                if reason:
                    with self._lock:
                        self.refused[reason] += 1
                    self.log(f"refused a connection on {event['endpoint'].decode(errors='replace')}: "
                             f"{reason}")

    def total(self) -> int:
        with self._lock:
            return sum(self.refused.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock, monitor in zip(self.sockets, self.monitors):
            sock.disable_monitor()
            monitor.close(linger=0)


def exposed(url: str) -> bool:
    """Whether a bind address ``tcp://HOST:PORT`` takes connections from other machines."""
    host = url[6:].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:   # "*", a host or interface name
        return True


def warn_if_exposed(url: str, keys: Keys | None, say) -> None:
    """One line when a socket binds beyond loopback without CURVE."""
    if keys is None and exposed(url):
        say(f"warning: {url} takes connections from other machines without authentication or "
            f"encryption; on a facility network use --curve-keys DIR (see `fourdstream keys`)")
