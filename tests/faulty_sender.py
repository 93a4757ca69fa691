"""A module sender with injected faults (tests only).

usage: faulty_sender.py ENDPOINTS MODULE SCAN_SIZE SEED [scan=N] FAULT...
faults (frame numbers are 1-based): drop:F  dup:F  swap:F (send F+1 before F)
  outside:F (header position outside the scan)  garbage:F (undecodable header)
  short:F (payload 1000 bytes short)  die:F (crash before frame F: no end message)
"""

import os
import sys
import time

from fourdstream import wire
from fourdstream.detector import ScanGeometry, parse_scan_size
from fourdstream.send import Router, SimulatedSource
from fourdstream.simulate import Simulator
from fourdstream.transport import sender_sockets

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
    router.send(scan, rank, header, payload)
    if "dup" in kinds:
        router.send(scan, rank, header, payload)
router.end(scan)
router.close()
ctx.term()
