"""Run under mpiexec: write the scan of ``expected.py`` from frames spread over ranks.

usage: mpi_write.py MODE OUTPUT
  arbitrary  frames dealt round-robin to all ranks but the last (which holds none)
  serial     the same, through the serial-h5py fallback (ranks write in turn)
  kill       rank 1 dies (SIGKILL) in the middle of the collective write
"""

import os
import signal
import sys

import numpy as np
from mpi4py import MPI

from expected import GEOMETRY, expected_frames
from fourdstream import writer
from mpi_util import report

comm = MPI.COMM_WORLD
mode, output = sys.argv[1], sys.argv[2]
everything = expected_frames()
holders = max(comm.size - 1, 1)
mine = everything.take(np.flatnonzero(np.arange(len(everything)) % holders == comm.rank))
if mode == "serial":
    writer._parallel_hdf5 = lambda: False
if mode == "kill":
    original = writer._slab_arrays

    def dying(*args, **kwargs):
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    writer._slab_arrays = dying
rep = writer.write_counted_scan(output, mine, GEOMETRY, electron_counting={"x_ray_threshold": 1.0},
                                provenance={"ranks": comm.size}, comm=comm)
report({"held": len(mine), "n_events": rep.n_events, "fpp": rep.frames_per_position,
        "parallel": rep.parallel})
