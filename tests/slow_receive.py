"""The receiver CLI with rank 1 counting slowly (tests only): slow_receive.py receive ARGS..."""

import time

from mpi4py import MPI

from fourdstream import pipeline
from fourdstream.cli import main

if MPI.COMM_WORLD.rank == 1:
    count = pipeline.ScanCounting.count

    def slow_count(self, *args, **kwargs):
        time.sleep(0.05)
        return count(self, *args, **kwargs)

    pipeline.ScanCounting.count = slow_count
main()
