"""Run under mpiexec: each rank holds a different share of the sample frames."""

import numpy as np
from mpi4py import MPI

from fourdstream.detector import ScanGeometry
from fourdstream.pipeline import CountingOptions, ScanCounting
from fourdstream.simulate import Simulator
from mpi_util import report

comm = MPI.COMM_WORLD
sim = Simulator(ScanGeometry(8, 4), dose=150, seed=21)
fn = sim.frame_numbers(0, sim.n_frames)
counting = ScanCounting(CountingOptions(seed=3, samples=300, sample_frames=12, backend="cpu"), comm)
chosen, weights = counting.plan_samples(fn, np.full(len(fn), 0b1111))
mine = {}
for i, (f, w) in enumerate(zip(chosen, weights)):
    if i % comm.size == comm.rank:  # round-robin: every rank holds other frames
        k = int(f) - 1
        mine[int(f)] = (int(w), sim.frames(k, k + 1)[0][0])
cal = counting.calibrate(mine)
report({"held": sorted(mine), "bg": cal.background_threshold.hex(),
        "xr": cal.x_ray_threshold.hex(), "mean": cal.mean.hex(), "variance": cal.variance.hex(),
        "bins": cal.number_of_bins, "frames": list(cal.sample_frame_numbers)})
