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
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack

from .detector import N_SECTORS, SECTOR_BYTES

CONTROL_TYPES = ("begin", "end")


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
    try:
        head = msgpack.unpackb(_bytes(parts[0]))
    except Exception as exc:
        raise MalformedMessage(f"undecodable header ({type(exc).__name__})") from None
    if isinstance(head, dict):
        if len(parts) != 1 or head.get("type") not in CONTROL_TYPES or "scan" not in head:
            raise MalformedMessage(f"bad control message {head!r:.80}")
        return "control", head, None
    if not isinstance(head, list) or len(head) not in (8, 9) or \
            not all(isinstance(v, int) and v >= 0 for v in head):
        raise MalformedMessage(f"header is not 8 or 9 unsigned integers: {head!r:.80}")
    if len(head) == 9:
        del head[2]   # num_frames_this_thread: not needed
    h = SectorHeader(*head)
    if len(parts) != 2:
        raise MalformedMessage(f"sector message with {len(parts)} parts, expected 2", h.scan)
    size = len(parts[1])
    if size != SECTOR_BYTES:
        raise MalformedMessage(f"payload of {size} bytes, expected {SECTOR_BYTES}", h.scan)
    if h.module >= N_SECTORS:
        raise MalformedMessage(f"module {h.module} in header", h.scan)
    if h.width == 0 or h.height == 0 or h.x >= h.width or h.y >= h.height:
        raise MalformedMessage(f"position x={h.x} y={h.y} outside a {h.width}x{h.height} scan",
                               h.scan)
    return "data", h, parts[1]


def _bytes(part):
    return part.bytes if hasattr(part, "bytes") else part
