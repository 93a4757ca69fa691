"""The receiver CLI with rank 1 counting slowly (tests only): slow_receive.py receive ARGS...

Rank 1 sleeps FOURDSTREAM_TEST_SLOW seconds (default 0.05) before each batch it counts.
"""

import os
import time

from mpi4py import MPI

from fourdstream import pipeline
from fourdstream.cli import main

if MPI.COMM_WORLD.rank == 1:
    count = pipeline.ScanCounting.count

    def slow_count(self, *args, **kwargs):
        time.sleep(float(os.environ.get("FOURDSTREAM_TEST_SLOW", "0.05")))
        return count(self, *args, **kwargs)

    pipeline.ScanCounting.count = slow_count
main()
