"""Under mpiexec: rank 0 works alone for a second in ``on_root``; every rank reports the
CPU time it used meanwhile, waiting patiently or the MPI way."""

import sys
import time

from mpi4py import MPI

from fourdstream.collective import on_root
from mpi_util import report

comm = MPI.COMM_WORLD
patient = sys.argv[1] == "patient"
comm.Barrier()
cpu, wall = time.process_time(), time.perf_counter()
result = on_root(comm, lambda: time.sleep(1.0) or "done", patient=patient)
report({"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "result": result})
