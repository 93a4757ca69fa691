"""Push fuzzed messages (tests/fuzz.py) to every socket of a receiver job (tests only).

usage: fuzz_sender.py ENDPOINTS SEED N
"""

import sys

import numpy as np
import zmq

from fourdstream.transport import read_endpoints
from fuzz import messages

endpoints, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
urls = [url for rank in read_endpoints(endpoints)["ranks"] for url in rank]
ctx = zmq.Context()
sockets = []
for url in urls:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 10_000)
    s.connect(url)
    sockets.append(s)
rng = np.random.default_rng(seed)
sent = 0
for parts in messages(seed, n):
    if parts:                      # ZeroMQ cannot carry a message of no parts
        sockets[rng.integers(len(sockets))].send_multipart(parts)
        sent += 1
for s in sockets:
    s.close()
ctx.term()
print(f"sent {sent} fuzzed messages")
