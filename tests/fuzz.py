"""Seeded mutations of wire messages (tests only): what a buggy or hostile peer might send.

:func:`messages` yields multipart messages (lists of bytes) derived from the valid
``begin``, sector and ``end`` messages of a small scan: fields replaced by values of
the wrong type or range (strings, floats, negatives, integers over 2**64, None,
nested containers, absurd scan sizes), fields added or removed, headers truncated,
flipped or replaced by random bytes, non-msgpack headers, payloads of the wrong size,
and 0-, 1- and 3-part messages.
"""

from __future__ import annotations

import msgpack
import numpy as np

from fourdstream import wire
from fourdstream.detector import SECTOR_BYTES

ODD_VALUES = ["x", "", 1.5, -1, -(2**63), 2**63, 2**64 - 1, 2**64, 2**64 + 7, None, True, [], [1, 2],
              {}, {"a": 1}, 65535, 65536, 2**32, 2**32 - 1, 0, float("nan"), float("inf"), b"\x00" * 9]


def _pack(obj) -> bytes:
    try:
        return msgpack.packb(obj)
    except (OverflowError, TypeError, ValueError):   # msgpack cannot say integers over 2**64 ...
        return b"\xcf" + b"\xff" * 9                 # ... so send the bytes of one (malformed)


def messages(seed: int, n: int, scan: int = 900, width: int = 5, height: int = 4):
    """``n`` mutated messages (a few of them valid), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    payload = np.zeros(SECTOR_BYTES // 2, np.uint16).tobytes()
    header = [scan, 1, 0, width, height, 0, 0, 0, 0]
    begin = {"type": "begin", "scan": scan, "sender": "0.0", "width": width, "height": height,
             "frames_per_position": 1, "flyback": False, "frames": width * height}
    end = {"type": "end", "scan": scan, "sender": "0.0", "sent": 3, "dropped": 0,
           "first_send": 1.0, "last_send": 2.0}
    for _ in range(n):
        kind = rng.integers(9)
        if kind <= 2:       # a sector header with one or two fields changed
            h = list(header)
            for _ in range(rng.integers(1, 3)):
                h[rng.integers(len(h))] = ODD_VALUES[rng.integers(len(ODD_VALUES))] \
                    if rng.random() < 0.7 else int(rng.integers(0, 70000))
            if rng.random() < 0.2:
                h = h[:rng.integers(0, 10)] + [0] * rng.integers(0, 3)
            yield [_pack(h), payload]
        elif kind <= 4:     # a control message with fields changed, removed or added
            msg = dict(begin if rng.random() < 0.5 else end)
            key = list(msg)[rng.integers(len(msg))]
            action = rng.integers(3)
            if action == 0:
                msg[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
            elif action == 1:
                del msg[key]
            else:
                msg.update(width=65535, height=65535) if rng.random() < 0.5 else \
                    msg.update({"extra": "field", "scan": int(rng.integers(0, 2**40))})
            yield [_pack(msg)] + ([payload] if rng.random() < 0.1 else [])
        elif kind == 5:     # bytes: random, truncated, flipped
            raw = bytearray(_pack(header if rng.random() < 0.5 else begin))
            choice = rng.integers(3)
            if choice == 0:
                raw = bytearray(rng.integers(0, 256, rng.integers(0, 64), dtype=np.uint8).tobytes())
            elif choice == 1 and len(raw) > 1:
                raw = raw[:rng.integers(1, len(raw))]
            elif len(raw):
                raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
            yield [bytes(raw), payload]
        elif kind == 6:     # a valid header with a payload of the wrong size
            size = int(rng.choice([0, 1, SECTOR_BYTES - 1, SECTOR_BYTES + 1, 2 * SECTOR_BYTES]))
            yield [_pack(header), payload[:size] if size <= SECTOR_BYTES else payload * 2]
        elif kind == 7:     # the wrong number of parts
            parts = int(rng.choice([0, 1, 3, 4]))
            yield [_pack(header), payload, b"extra", b"more"][:parts]
        else:               # a valid message: the rank must still handle it
            x, y = int(rng.integers(width)), int(rng.integers(height))
            yield [wire.encode_header(scan, y * width + x + 1, width, height, x, y,
                                      int(rng.integers(4))), payload]
