"""Run under mpiexec: index a raw scan collectively and report what each rank read and got.

usage: mpi_index.py FOLDER MODE
  share  report the files whose headers this rank read, and a digest of its index
  fail   rank 1's first header read fails: every rank must get the same error
  unlike rank 1 lists the folder without its last file (as at another moment): every
         rank must still index rank 0's list
"""

import hashlib
import sys

import numpy as np
from mpi4py import MPI

from fourdstream import rawfile
from fourdstream.collective import CollectiveError
from mpi_util import report

comm = MPI.COMM_WORLD
folder, mode = sys.argv[1], sys.argv[2]
read = []
original = rawfile._read_headers


def recording(path, n, record_size):
    if mode == "fail" and comm.rank == 1:
        raise rawfile.RawFormatError(f"{path.name}: cannot be read here")
    read.append(path.name)
    return original(path, n, record_size)


rawfile._read_headers = recording
if mode == "unlike" and comm.rank == 1:
    listed = rawfile.expand_paths
    rawfile.expand_paths = lambda paths: listed(paths)[:-1]
try:
    scan = rawfile.RawScan([folder], comm=comm)
except CollectiveError as exc:
    report({"error": str(exc)})
    sys.exit(0)
digest = hashlib.sha256()
for a in (scan.frame_number, scan.position, scan.mask, scan._loc):
    digest.update(np.ascontiguousarray(a).tobytes())
report({"read": read, "index": digest.hexdigest(), "frames": len(scan), "duplicates": scan.duplicates,
        "bad_records": [[b.path, b.offset, b.reason] for b in scan.bad_records]})
