"""A module sender with injected faults (tests only).

usage: faulty_sender.py ENDPOINTS MODULE SCAN_SIZE SEED [scan=N] FAULT...
faults (frame numbers are 1-based): drop:F  dup:F  swap:F (send F+1 before F)
  outside:F (header position outside the scan)  garbage:F (undecodable header)
  short:F / long:F (payload 1000 bytes short / long)  geometry:F (scan width + 1)
  string:F / float:F / negative:F (frame number of that type)  big:F (frame 2**64 - 1)
  over64:F (an integer over 2**64: not msgpack)  parts1:F / parts3:F (1- or 3-part message)
  die:F (crash before frame F: no end message)
  badbegin:0 (begin announcing a 65535x65535 scan)  badend:0 (end without its counts)
"""

import os
import sys
import time

from fourdstream import wire
from fourdstream.detector import ScanGeometry, parse_scan_size
from fourdstream.send import Router, SimulatedSource
from fourdstream.simulate import Simulator
from fourdstream.transport import sender_sockets

import msgpack
import zmq

endpoints, module, size, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
faults, scan = {}, 1
for spec in sys.argv[5:]:
    if spec.startswith("scan="):
        scan = int(spec[5:])
        continue
    kind, frame = spec.split(":")
    faults.setdefault(int(frame), []).append(kind)
geometry = ScanGeometry.from_probe_grid(*parse_scan_size(size))
source = SimulatedSource(Simulator(geometry, dose=150, seed=seed, pattern="disc"), module, pool_frames=0)
ctx = zmq.Context()
sockets, chunk = sender_sockets(ctx, module, endpoints_file=endpoints)
router = Router(sockets, sender=f"{module}.0", chunk=chunk)
if "badbegin" in faults.get(0, []):
    router.begin(scan, geometry)   # the router's own bookkeeping; the ranks get the bad one too
    for sock in sockets:
        sock.send(wire.encode_control("begin", scan=scan, sender=f"{module}.0", width=65535,
                                      height=65535, frames_per_position=1, flyback=False, frames=1))
else:
    router.begin(scan, geometry)
sectors = list(source.sectors(scan))
for frame, kinds in faults.items():
    if "swap" in kinds:
        i = frame - 1
        sectors[i], sectors[i + 1] = sectors[i + 1], sectors[i]
for s in sectors:
    kinds = faults.get(s.frame, [])
    if "die" in kinds:
        time.sleep(1.0)   # what was sent goes out ...
        os._exit(0)       # ... then a crash: no end message
    if "drop" in kinds:
        continue
    rank = router.rank_of(scan, s.x, s.y, s.frame)
    header = wire.encode_header(scan, s.frame, geometry.width, geometry.height, s.x, s.y, module)
    payload = s.payload
    if "outside" in kinds:
        header = wire.encode_header(scan, s.frame, geometry.width, geometry.height, 999, s.y, module)
    if "garbage" in kinds:
        header = b"\xc1\xc1 not msgpack"
    if "short" in kinds:
        payload = bytes(s.payload)[:-1000]
    if "long" in kinds:
        payload = bytes(s.payload) + bytes(1000)
    if "geometry" in kinds:
        header = wire.encode_header(scan, s.frame, geometry.width + 1, geometry.height, s.x, s.y, module)
    for kind, value in (("string", "7"), ("float", 7.5), ("negative", -7), ("big", 2**64 - 1)):
        if kind in kinds:
            header = msgpack.packb([scan, value, 0, geometry.width, geometry.height, s.x, s.y, 0, module])
    if "over64" in kinds:
        rest = b"".join(msgpack.packb(v) for v in (0, geometry.width, geometry.height, s.x, s.y, 0, module))
        header = b"\x99" + msgpack.packb(scan) + b"\xcf" + b"\xff" * 9 + rest   # a 72-bit frame number
    if "parts1" in kinds or "parts3" in kinds:
        router.sockets[rank].send_multipart([header] if "parts1" in kinds else [header, payload, b"x"])
        router.scans[scan].sent[rank] += 1
        continue
    router.send(scan, rank, header, payload)
    if "dup" in kinds:
        router.send(scan, rank, header, payload)
if "badend" in faults.get(0, []):
    for sock in sockets:
        sock.send(wire.encode_control("end", scan=scan, sender=f"{module}.0", dropped=0))
else:
    router.end(scan)
router.close()
ctx.term()
