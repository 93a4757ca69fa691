"""Messages on the wire: NCEM sector messages and fourdstream's control messages.

**Sector data** keeps the format of the NCEM production DAQ, so a real producer
can feed fourdstream: a two-part ZeroMQ message,

1. a msgpack array of 9 unsigned integers
   ``[scan_number, frame_number, num_frames_this_thread, scan_width, scan_height,
   x, y, thread_id, module]`` (fields 4 and 5 are named ``..._m1`` by the DAQ but
   carry the scan width and height), or the older 8-field variant without
   ``num_frames_this_thread``;
2. the raw sector, 165,888 bytes (v5: 144 rows x 576 columns, uint16 LE).

**Control** messages are one-part messages holding a msgpack *map* with a
``"type"`` key, so they cannot be mistaken for sector headers (arrays):

* ``begin``: ``scan, sender, width, height, frames_per_position, flyback, frames``
  (frames the scan holds); sent by every sender to every rank before its data;
* ``end``: ``scan, sender, sent`` (sector messages this sender sent to this rank
  for the scan), ``dropped`` (messages it gave up on), ``first_send`` and
  ``last_send`` (Unix times of its first and last sector of the scan).

Everything a message says is checked here, before a rank acts on it: field types
and ranges, and the size of the scan it announces (at most :data:`MAX_POSITIONS`
positions and :data:`MAX_FRAMES` frames), so that no message can make a rank
allocate more than its configured bounds. Anything else is a
:class:`MalformedMessage`, which the receiver counts.
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack

from .detector import N_SECTORS, SECTOR_BYTES

CONTROL_TYPES = ("begin", "end")

#: Largest scan a message may announce: 4096 x 4096 positions (the 4D Camera's
#: largest scans are 1024 x 1024), and at most 2**24 frames in all (the file's
#: per-frame arrays of such a scan take ~0.5 GB).
MAX_POSITIONS = 4096 * 4096
MAX_FRAMES = 2**24
#: Longest header or control message read (a real one takes < 200 bytes).
MAX_HEADER_BYTES = 4096
#: Scan and frame numbers are stored as uint32.
MAX_NUMBER = 2**32 - 1


class MalformedMessage(ValueError):
    """A message that does not follow the wire format; ``scan`` is set when known."""

    def __init__(self, reason: str, scan: int | None = None):
        super().__init__(reason)
        self.scan = scan


class SectorHeader(NamedTuple):
    scan: int
    frame: int
    width: int
    height: int
    x: int
    y: int
    thread: int
    module: int


def encode_header(scan: int, frame: int, width: int, height: int, x: int, y: int, module: int,
                  thread: int = 0, frames_this_thread: int = 0) -> bytes:
    """msgpack bytes of a 9-field NCEM sector header."""
    return msgpack.packb([scan, frame, frames_this_thread, width, height, x, y, thread, module])


def encode_control(kind: str, **fields) -> bytes:
    if kind not in CONTROL_TYPES:
        raise ValueError(f"unknown control message type {kind!r}")
    return msgpack.packb(dict(fields, type=kind))


def decode(parts):
    """Decode one multipart message.

    Returns ``("data", SectorHeader, payload)`` or ``("control", dict, None)``;
    raises :class:`MalformedMessage` with the reason (and the scan number if the
    header could be read) for anything else.
    """
    if not parts:
        raise MalformedMessage("empty message")
    first = _bytes(parts[0])
    if len(first) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header of {len(first)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        head = msgpack.unpackb(first, strict_map_key=False)
    except Exception as exc:
        raise MalformedMessage(f"undecodable header ({type(exc).__name__})") from None
    if isinstance(head, dict):
        return "control", _control(head, len(parts)), None
    if not isinstance(head, list) or len(head) not in (8, 9) or not all(_uint(v) for v in head):
        raise MalformedMessage(f"header is not 8 or 9 unsigned integers: {head!r:.80}")
    if len(head) == 9:
        del head[2]   # num_frames_this_thread: not needed
    h = SectorHeader(*head)
    if h.scan > MAX_NUMBER:
        raise MalformedMessage(f"scan number {h.scan} beyond {MAX_NUMBER}")
    if h.frame > MAX_NUMBER:
        raise MalformedMessage(f"frame number {h.frame} beyond {MAX_NUMBER}", h.scan)
    if len(parts) != 2:
        raise MalformedMessage(f"sector message with {len(parts)} parts, expected 2", h.scan)
    size = len(parts[1])
    if size != SECTOR_BYTES:
        raise MalformedMessage(f"payload of {size} bytes, expected {SECTOR_BYTES}", h.scan)
    if h.module >= N_SECTORS:
        raise MalformedMessage(f"module {h.module} in header", h.scan)
    _check_size(h.width, h.height, 1, h.scan)
    if h.x >= h.width or h.y >= h.height:
        raise MalformedMessage(f"position x={h.x} y={h.y} outside a {h.width}x{h.height} scan",
                               h.scan)
    return "data", h, parts[1]


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e300


def _check_size(width: int, height: int, frames_per_position: int, scan) -> None:
    """Refuse a scan larger than the receiver's bounds (before anything is allocated)."""
    if not (1 <= width <= 0xFFFF and 1 <= height <= 0xFFFF):
        raise MalformedMessage(f"scan size {width}x{height} outside 1..65535", scan)
    if width * height > MAX_POSITIONS or width * height * frames_per_position > MAX_FRAMES:
        raise MalformedMessage(f"scan of {width}x{height} positions x {frames_per_position} "
                               f"frame(s) exceeds the receiver's limit ({MAX_POSITIONS:,} "
                               f"positions, {MAX_FRAMES:,} frames)", scan)


def _control(msg: dict, n_parts: int) -> dict:
    """Check a control message's fields; the message itself."""
    scan = msg.get("scan")
    scan = scan if _uint(scan) and scan <= MAX_NUMBER else None
    if n_parts != 1 or msg.get("type") not in CONTROL_TYPES or scan is None:
        raise MalformedMessage(f"bad control message {msg!r:.80}")
    sender = msg.get("sender")
    if not (isinstance(sender, str) and len(sender) <= 64 or _uint(sender) and sender <= MAX_NUMBER):
        raise MalformedMessage(f"control message with sender {sender!r:.40}", scan)
    if msg["type"] == "begin":
        fields = ("width", "height", "frames_per_position")
        if not all(_uint(msg.get(k)) for k in fields) or not isinstance(msg.get("flyback"), bool):
            raise MalformedMessage(f"begin message with bad geometry {msg!r:.80}", scan)
        if msg["frames_per_position"] < 1 or msg["flyback"] and msg["width"] < 2:
            raise MalformedMessage(f"begin message with bad geometry {msg!r:.80}", scan)
        _check_size(msg["width"], msg["height"], msg["frames_per_position"], scan)
    else:
        counts = [msg.get("sent")] + [msg[k] for k in ("dropped", "malformed") if k in msg]
        times = [msg[k] for k in ("first_send", "last_send") if k in msg]
        if not all(_uint(v) and v <= MAX_NUMBER for v in counts) or not all(map(_number, times)):
            raise MalformedMessage(f"end message with bad counts {msg!r:.80}", scan)
    return msg


def _bytes(part):
    return part.bytes if hasattr(part, "bytes") else part
