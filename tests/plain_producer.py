"""A producer written only against the NCEM wire format: zmq + msgpack + numpy, no fourdstream.

usage: plain_producer.py ENDPOINT FRAMES.npy WIDTH HEIGHT FIELDS MODULE
Sends module MODULE's sector (rows 144m..144m+143) of every frame in FRAMES.npy,
frame k at position k (x = k % WIDTH, y = k // WIDTH), frame number k + 1, scan 1,
as 2-part messages [msgpack header of FIELDS (9 or 8) integers, raw sector], over PUSH.
"""

import sys

import msgpack
import numpy as np
import zmq

endpoint, path, width, height, fields, module = sys.argv[1:7]
width, height, fields, module = int(width), int(height), int(fields), int(module)
frames = np.load(path)
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH)
push.setsockopt(zmq.SNDHWM, 1000)
push.setsockopt(zmq.SNDTIMEO, 10000)
push.connect(endpoint)
for k, frame in enumerate(frames):
    x, y = k % width, k // width
    head = [1, k + 1, len(frames), width, height, x, y, 0, module]
    if fields == 8:
        del head[2]
    push.send_multipart([msgpack.packb(head), np.ascontiguousarray(frame[144 * module:144 * (module + 1)])])
push.close(linger=10000)
ctx.term()
