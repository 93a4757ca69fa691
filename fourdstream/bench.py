"""Benchmark harness: every stage measured against its ceiling, in one run, on one machine.

Stages and their ceilings (each measured in the same run, right next to the stage):

* **counting**: the compiled kernel's frames/s on one core at 15, 150 and 1,500
  electrons/frame, plain, with a dark, with a dark and a gain, vs one read of as
  many frames (the fastest of numpy's ``frames.max()`` and a compiled pass, timed on
  every dose's frames), and vs stempy's ``electron_count_frame``; the kernel's
  compilation, uncached and cached;
* **count command**: ``fourdstream count`` on raw files, process start to file
  closed, vs stempy's threaded count of the same files and vs numpy reading them
  (the faster of 1 and all threads; from the disk also twice as many threads), with
  the files in the page cache (each run after one untimed read of them, so that none
  pays the first read after a disk run) and again read from the disk (evicted from the
  page cache before each run, as a production scan's are); 1 vs all threads, vs the same
  read's 1 vs all threads (the command reads every byte, so it cannot gain more from
  threads than reading does); and the most that a count paying only the start-up of its
  libraries (numpy, click, h5py, MPI, numba and its kernel from the cache, timed in a
  fresh process) could reach on either figure;
* **index**: the raw files' index (:class:`~fourdstream.rawfile.RawScan`, what
  ``fourdstream count`` builds first) of a 256x256 scan (512x512 with ``--full``;
  header-only files, the sector payloads left as holes) on 1, 2 and 4 ranks, the
  slowest rank's seconds: the ranks sharing the header reads (each every N-th
  file's) vs each rank's share of those reads alone (the ceiling), and vs every
  rank reading them all;
* **transport**: 4 module senders -> one rank's 4 sockets, decoded and assembled
  into frames (fourdstream's own path), vs raw pyzmq PUSH/PULL of the same
  messages (a sector header and a 165,888-byte payload) with the same 4 processes;
* **write**: GB/s of events written collectively by 1..N ranks vs the same ranks
  writing the same bytes raw (each its contiguous share with ``pwrite``, into a new
  file in the same folder, without fsync as HDF5's close);
* **end to end**: a streamed scan, first sector sent -> file closed, vs the lower
  of two ceilings: raw pyzmq carrying the same messages with the same processes
  (4 senders routing each sector to its rank, R receiving processes doing nothing
  else) and the counting alone (R ranks counting frames already in memory); plus
  the latency from the last frame sent to the file closed, and what counting
  costs the stream (against the same run with the ranks receiving and assembling
  but not counting; not a ceiling: the full run measured 0.95-1.05 of it on 2
  shared cores, where counting is a few percent of the work, less than the noise);
* **scaling**: end to end and counting alone with 1, 2, 4 ranks, and the rank
  concurrency: the fraction of the scan's duration during which every rank
  had frames in flight (from the ranks' per-0.1-s activity);
* **scale** (only when asked for, about 10 minutes here): one production-size
  scan (512x512 + flyback, 262,656 frames, 174 GB over loopback) into 1, 2 and
  4 ranks: time, frames/s, peak memory per rank, frames missing, and the
  turnaround step by step (last frame sent and received -> file closed); then
  into 4 ranks with the senders paced at 80% of the rate the ranks sustained,
  as a detector whose job keeps up: the turnaround from its last frame.

Every figure is repeated after a warm-up and reported as min/median/max. A ratio
compares the best repeat of the stage with the best repeat of its ceiling: on a
shared machine noise only ever slows a run, so each one's best repeat is the
figure nearest its real speed (a median ratio would let a slowed ceiling fall
below its stage). The record (machine, versions, parameters, figures, sizing for the 4D Camera line
rate) is appended to a JSON-lines file; ``--compare`` flags regressions against
an earlier record; a PNG shows the scaling and the per-stage rates.

Workers (``python -m fourdstream.bench _worker ...``) run the parts that need
their own processes or an mpiexec job.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import __version__
from .detector import FRAME_BYTES, FRAME_PIXELS, SECTOR_BYTES
from .launch import launcher
from .transport import free_port_block

LINE_RATE_FPS = 87_000           #: 4D Camera frames/s
LINE_RATE_GBPS = 57.7            #: 4D Camera pixel payload, GB/s
NETWORK_GBIT_PER_NODE = 200.0    #: a Perlmutter node's Slingshot-11 NIC, Gbit/s (sizing input)
REGRESSION_TOLERANCE = 0.15      #: --compare flags changes worse than this fraction
CONCURRENT = 0.9                 #: rank concurrency a run needs for the end-to-end sizing
#: How far two best-of-10 rates of the same loop differ here (measured: up to 2.1 %, the
#: kernel's block test alone, in 5 runs): a stage within this of its ceiling is at it,
#: one further above it beats it (the ceiling is wrong).
RESOLUTION = 0.03


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of one harness run."""

    repeats: int = 3
    #: Repeats of the counting kernels' figures, at least: a call takes milliseconds, and
    #: the best of a few is at the mercy of a shared machine's noise.
    kernel_repeats: int = 10
    count_frames: int = 256
    command_frames: int = 8192
    stempy_frames: int = 8
    transport_frames: int = 1000
    write_events: int = 40_000_000
    write_ranks: tuple = (1, 2, 4)
    stream_scan: str = "96x96"
    stream_ranks: int = 2
    scaling_ranks: tuple = (1, 2, 4)
    scale_scan: str = "512x512"
    scale_ranks: tuple = (1, 2, 4)
    index_scan: str = "256x256"
    index_ranks: tuple = (1, 2, 4)
    cores_per_node: int = 128
    network_gbit_per_node: float = NETWORK_GBIT_PER_NODE


QUICK = Config()
FULL = Config(repeats=5, count_frames=1024, command_frames=8192, stempy_frames=32, transport_frames=4000,
              write_events=40_000_000, write_ranks=(1, 2, 3, 4), stream_scan="128x128",
              index_scan="512x512")


def _stats(values) -> dict:
    values = [float(v) for v in values]
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "values": values}


def _rate(stats: dict) -> float:
    """The best repeat of a rate (the highest)."""
    return stats["max"]


def _seconds(stats: dict) -> float:
    """The best repeat of a duration (the shortest)."""
    return stats["min"]


def _interleaved(fns: dict, repeats: int, *, before: dict | None = None) -> dict:
    """Seconds of ``repeats`` calls of each of ``fns`` (name -> function), taken in turn
    round by round after one warm-up round, so that drift on a shared machine hits each
    alike: name -> list of seconds. ``before``: name -> function called, untimed, right
    before each call of that name: the kernel itself, so that it finds its tables in the
    CPU cache as it does all through a scan (not where the one before left them), or the
    eviction of the files a command reads from the page cache."""
    before = before or {}
    out = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            t0 = time.perf_counter()
            fn()
            if round_:
                out[name].append(time.perf_counter() - t0)
    return out


def _timed(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    return _interleaved({"run": fn}, repeats)["run"]


def _python(*args) -> list[str]:
    return [sys.executable, "-m", "fourdstream.bench", *map(str, args)]


# == stages =========================================================================
def bench_counting(cfg: Config, log) -> dict:
    """Kernels per core at 15, 150 and 1,500 electrons/frame, plain, with a dark, with a dark and
    a gain, against one read of as many frames: the fastest of numpy's ``max`` and a 64-lane
    block test over every block, as the kernel's skip loop with nothing to count, with and
    without its prefetch (:func:`read_pass`), each timed on every dose's frames."""
    from . import backend
    from .compiled import PREFETCH_LOCALITY, TARGET_CPU, CompiledCounter, read_pass
    from .counting import ElectronCounter, Thresholds
    from .detector import ScanGeometry
    from .pipeline import CountingOptions, ScanCounting
    from .simulate import Simulator

    n = cfg.count_frames
    repeats = max(cfg.repeats, cfg.kernel_repeats)     # the kernels' figures: a call takes milliseconds
    gain = np.random.default_rng(0).uniform(0.8, 1.25, (576, 576)).astype(np.float32)
    out = {"frames": n, "repeats": repeats, "by_dose": {}, "compile_seconds": _compile_seconds(),
           "prefetch": {"cpu": TARGET_CPU, "locality": PREFETCH_LOCALITY}}
    sims = {dose: Simulator(ScanGeometry(n, 1), dose=dose, seed=1, pattern="disc")
            for dose in (15, 150, 1500)}
    # Thresholds: the NCEM calibration (dark = zeros) of the 150 e-/frame frames; with a dark,
    # the same thresholds less the mean dark level (as far above the background).
    calib = ScanCounting(CountingOptions(backend="numpy"))
    sample = sims[150].frames(0, 20)[0]
    chosen, weights = calib.plan_samples(np.arange(1, 21), np.full(20, 0b1111))
    cal = calib.calibrate({int(f): (int(w), sample[f - 1]) for f, w in zip(chosen, weights)})
    level = float(sims[150].dark.mean())
    plain = cal.thresholds
    darkened = Thresholds(plain.background - level, plain.xray - level)
    out["thresholds"] = {"plain": [plain.background, plain.xray],
                         "with_dark": [darkened.background, darkened.xray]}
    reads = ("numpy max", "compiled read", "compiled read, prefetched")
    variants = ("plain", "dark", "dark+gain")
    for dose, sim in sims.items():
        frames = sim.frames(0, n)[0]
        counters = dict(zip(variants, (CompiledCounter(plain), CompiledCounter(darkened, sim.dark),
                                       CompiledCounter(darkened, sim.dark, gain))))
        fns = dict(zip(reads, (lambda: frames.max(axis=(1, 2)), lambda: read_pass(frames),
                               lambda: read_pass(frames, prefetch=True))),
                   **{v: functools.partial(c.count, frames) for v, c in counters.items()})
        runs = _interleaved(fns, repeats, before=fns)
        fps = {name: _stats(n / t for t in seconds) for name, seconds in runs.items()}
        out["by_dose"][str(dose)] = figures = {"reads_fps": {r: fps[r] for r in reads}}
        for variant in counters:
            figures[variant] = {"compiled_fps": fps[variant]}
        if dose == 150:
            reference = ElectronCounter(darkened, sim.dark)
            figures["dark"]["numpy_fps"] = _stats(n / t for t in _timed(lambda: reference.count(frames),
                                                                        cfg.repeats))
            headline = (frames, sim.dark, counters["dark"])
        log(f"counting, {dose} e-/frame: " + ", ".join(
            f"{v} {figures[v]['compiled_fps']['median']:,.0f} frames/s" for v in variants))
    # The ceiling: the fastest of the reads at any dose. A read's speed does not depend on
    # the pixels' values (no block reaches 0xFFFF), and each dose's frames have the same size
    # and layout, so the three doses' reads are three measures of one memory pass: the
    # kernel without a dark at 15 e-/frame, the read's own loop and nearly nothing more,
    # came out at 1.04 of its own dose's best read in one run (2026-11-28, Intel VM).
    memory = max((f["reads_fps"][r] for f in out["by_dose"].values() for r in reads), key=_rate)
    for figures in out["by_dose"].values():
        figures["memory_pass_fps"] = memory
        for variant in variants:
            figures[variant]["ratio_to_memory_pass"] = _rate(figures[variant]["compiled_fps"]) / _rate(memory)
    frames, dark, counter = headline
    out["row_dark"] = _row_dark_counting(frames, dark, darkened, cfg, repeats, memory)
    out["threads"] = _counting_threads(frames, counter, repeats)
    c = out["by_dose"]["150"]
    out["compiled_fps"] = c["dark"]["compiled_fps"]
    out["numpy_fps"] = c["dark"]["numpy_fps"]
    out["memory_pass_fps"] = c["memory_pass_fps"]
    out["ratio_to_memory_pass"] = c["dark"]["ratio_to_memory_pass"]
    bg, xr = out["thresholds"]["with_dark"]
    try:
        from stempy.image import electron_count_frame
        k = cfg.stempy_frames
        out["stempy_fps"] = _stats(k / t for t in _timed(
            lambda: [electron_count_frame(f, darkreference=dark, background_threshold=bg,
                                          xray_threshold=xr) for f in frames[:k]], cfg.repeats))
        out["speedup_vs_stempy"] = _rate(out["compiled_fps"]) / _rate(out["stempy_fps"])
    except ImportError:
        out["stempy_fps"] = None
    chosen = backend.select("auto")
    if chosen.xp is not np:
        gpu = ElectronCounter(darkened, dark, xp=chosen.xp)
        dev = chosen.xp.asarray(frames)

        def on_gpu():
            gpu.count(dev)
            chosen.xp.cuda.Device().synchronize()
        out["cupy_fps"] = _stats(n / t for t in _timed(on_gpu, cfg.repeats))
    out["backends"] = ["compiled", "numpy"] + (["cupy"] if chosen.xp is not np else [])
    return out


def _row_dark_counting(frames, dark, thresholds, cfg: Config, repeats: int, memory: dict) -> dict:
    """The kernel with a dark and row-dark (each half-row scaled by its mean or median), on
    one core, against the memory pass and against the numpy reference on
    ``cfg.stempy_frames`` of the frames (frames/s)."""
    from .compiled import CompiledCounter
    from .counting import ElectronCounter

    out, k = {}, cfg.stempy_frames
    for statistic in ("mean", "median"):
        ours = CompiledCounter(thresholds, dark, row_dark=statistic)
        reference = ElectronCounter(thresholds, dark, row_dark=statistic)
        compiled = _stats(len(frames) / t for t in _timed(lambda: ours.count(frames), repeats))
        out[statistic] = {"compiled_fps": compiled, "ratio_to_memory_pass": _rate(compiled) / _rate(memory),
                          "numpy_fps": _stats(k / t for t in _timed(lambda: reference.count(frames[:k]),
                                                                    cfg.repeats))}
        out[statistic]["speedup_vs_numpy"] = _rate(compiled) / _rate(out[statistic]["numpy_fps"])
    return out


def _counting_threads(frames, counter, repeats: int) -> dict:
    """The kernel on 1 thread and on every core, each thread counting its share of the same
    ``frames`` in memory (as a receiving rank's threads do), beside the memory pass split
    the same way: how far counting threads scale where no file read bounds them."""
    from concurrent.futures import ThreadPoolExecutor

    from .compiled import read_pass

    cpus = len(os.sched_getaffinity(0))
    shares = np.array_split(frames, cpus)
    read = functools.partial(read_pass, prefetch=True)
    with ThreadPoolExecutor(cpus) as pool:
        runs = _interleaved({"one": lambda: counter.count(frames), "all": lambda: list(pool.map(counter.count, shares)),
                             "read_one": lambda: read(frames), "read_all": lambda: list(pool.map(read, shares))},
                            repeats)
    fps = {name: _stats(len(frames) / t for t in seconds) for name, seconds in runs.items()}
    return {"cpus": cpus, "one_fps": fps["one"], "all_fps": fps["all"],
            "memory_pass_one_fps": fps["read_one"], "memory_pass_all_fps": fps["read_all"],
            "speedup": _rate(fps["all"]) / _rate(fps["one"]),
            "memory_pass_speedup": _rate(fps["read_all"]) / _rate(fps["read_one"]),
            "ratio_to_memory_pass": _rate(fps["all"]) / _rate(fps["read_all"])}


def _compile_seconds() -> dict:
    """First count of a fresh process with an empty numba cache, and with the cache filled."""
    code = ("import time; t = time.perf_counter(); import numpy as np; "
            "from fourdstream.compiled import CompiledCounter; from fourdstream.counting import Thresholds; "
            "CompiledCounter(Thresholds(28, 700)).count(np.zeros((1, 576, 576), np.uint16)); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                     text=True, check=True).stdout) for _ in range(2)]
    return {"uncached": runs[0], "cached": runs[1]}


#: The read ceiling of the count command: the raw files read by numpy alone, on the
#: number of threads given, each reading its files in 8 MB chunks into one buffer it
#: reuses (from the page cache or from the disk, as the count reads them). Prints the
#: seconds of the read itself, without the process's start-up (the ceiling of the
#: command's counting step).
_READ_FILES = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
threads, files = int(sys.argv[1]), sys.argv[2:]
def read(k):
    buffer = memoryview(np.empty(8 << 20, np.uint8))
    for name in files[k::threads]:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buffer) == len(buffer):
                pass
start = time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    list(pool.map(read, range(threads)))
print(time.perf_counter() - start)
"""


#: The start-up any count on this project's stack pays before it reads a byte, in a
#: fresh process as ``fourdstream count`` starts (its collector settings, Open MPI's
#: singleton settings): numpy, click and h5py imported, MPI initialised, numba imported
#: and the counting kernel loaded from numba's cache by the command's own warm-up
#: (:meth:`~fourdstream.pipeline.ScanCounting.warm_up`). The command's other modules,
#: index, calibration and write come on top of it.
_START_UP = """
import gc
gc.set_threshold({gc_threshold})
import click, h5py
from fourdstream import launch
launch.singleton_defaults()
from mpi4py import MPI
from fourdstream.pipeline import CountingOptions, ScanCounting
counting = ScanCounting(CountingOptions())
counting.warm_up(sectors=counting.reads_sectors)
gc.freeze()
"""


def _evict(paths) -> float | None:
    """Drop the files ``paths`` from the page cache (their pages written back first), so
    that the next read of them comes from the disk. Returns the fraction of their bytes
    still in memory after it (``fincore``, util-linux >= 2.30; None without it): 1 on
    tmpfs, whose files live in memory and cannot be evicted."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore") is None:
        return None
    resident = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                              capture_output=True, text=True, check=True).stdout.split()
    return sum(map(int, resident)) / sum(os.path.getsize(path) for path in paths)


def _read_through(paths) -> None:
    """Read the files ``paths`` once, whole (untimed), so that the next read of them finds
    their pages as every later one does. The first read of a file after the disk brought
    it into the page cache is slower than those after it (on this project's Intel VM,
    2026-11-28: 0.63-0.64 s against 0.52-0.56 for the numpy read on 2 threads, 1.9-2.2 s
    against 1.7 for the count command), and a page-cache figure that followed a disk
    figure would pay that where the others do not."""
    buffer = memoryview(bytearray(8 << 20))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer) == len(buffer):
                pass


def _page_cache_states(runs, files, still_cached: list) -> dict:
    """What :func:`bench_count_command` does, untimed, before each of its ``runs`` (names):
    a disk run (``cold_``) finds the ``files`` evicted from the page cache (the fraction
    still in memory appended to ``still_cached``), a page-cache run finds them read
    through once since (:func:`_read_through`): the read ceiling and the command each
    find the pages in the same state, whichever ran after a disk run."""
    evict = lambda: still_cached.append(_evict(files))
    return {name: evict if name.startswith("cold_") else functools.partial(_read_through, files)
            for name in runs}


def bench_count_command(cfg: Config, folder: Path, log) -> dict:
    """``fourdstream count`` on raw files, process start to file closed, vs stempy's threaded
    count of the same files and vs reading them with numpy alone (all in fresh processes, on
    the same cores); and 1 vs all threads, whole command and its counting step (the file's
    ``timings``), beside the numpy read's own 1 vs all threads. The count and the read are
    timed with the files in the page cache (read through once before each run), and again
    from the disk (``cold_``: the files evicted from the page cache before each run), where
    a production scan's files are: at 174 GB they do not fit in a node's memory
    (:func:`_page_cache_states`). Beside them, the start-up of the stack alone
    (``_START_UP``, a fresh process) and what it leaves within reach: a count paying
    nothing else, reading as fast as numpy, against the read (``ratio_to_read_bound``),
    and the command's 1 vs all threads with no other fixed cost (``threads_speedup_bound``).

    Both counts calibrate their thresholds with the NCEM production settings and no dark
    (stempy 3.6's threshold calculation fails with a dark reference on these files)."""
    from .cli import GC_THRESHOLD
    from .detector import ScanGeometry
    from .io import open_counted
    from .simulate import Simulator, write_scan

    n = cfg.command_frames
    width = int(np.sqrt(n))
    sim = Simulator(ScanGeometry(width, n // width), dose=150, seed=2, pattern="disc")
    raw = folder / "command_raw"
    files = write_scan(sim, raw, scan_number=1, n_dst=2, frames_per_file=1024)
    cpus = len(os.sched_getaffinity(0))
    log(f"count command: {sim.n_frames:,} frames ({sum(f.stat().st_size for f in files) / 1e9:.2f} GB), "
        f"1 and {cpus} threads, stempy with {cpus} threads")
    output = folder / "command.h5"
    ours = lambda t: [sys.executable, "-m", "fourdstream", "count", str(raw), "-o",
                      str(output), "--overwrite", "--threads", str(t)]
    stempy_count = [sys.executable, "-c",
              "import glob, os, sys, numpy as np, stempy.io, stempy.image; "
              "os.path.exists(sys.argv[3]) and os.remove(sys.argv[3]); "
              "files = sorted(glob.glob(sys.argv[1] + '/*.data')); "
              "r = stempy.io.reader(files, version=stempy.io.FileVersion.VERSION5, backend='multi-pass', "
              "threads=int(sys.argv[4])); "
              "a = stempy.image.electron_count(r, number_of_samples=1200, "
              "threshold_num_blocks=20, xray_threshold_n_sigma=175, background_threshold_n_sigma=4, "
              "scan_dimensions=(int(sys.argv[5]), int(sys.argv[6]))); "
              "stempy.io.save_electron_counts(sys.argv[3], a)",
              str(raw), "", str(folder / "stempy.h5"), str(cpus),
              str(sim.geometry.width), str(sim.geometry.height)]
    read = lambda t: [sys.executable, "-c", _READ_FILES, str(t), *map(str, files)]
    start_up = [sys.executable, "-c", _START_UP.format(gc_threshold=GC_THRESHOLD)]
    steps = {}     # run name -> seconds of its step: the command's counting step, the read itself

    def run(cmd) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        return proc.stdout

    batches = set()     # the frames a batch the command chose

    def wall(name, cmd):
        def run_once():
            printed = run(cmd)
            if "ours" in name:
                made = open_counted(output).metadata["fourdstream"]
                steps.setdefault(name, []).append(made["timings"]["count"])
                batches.add(int(made["frames_per_batch"]))
            elif "read" in name:
                steps.setdefault(name, []).append(float(printed))
        return name, run_once

    runs = dict([wall("read_seconds", read(cpus)), wall("read_1_thread_seconds", read(1)),
                 wall("ours_1_thread_seconds", ours(1)), wall("ours_seconds", ours(cpus)),
                 wall("start_up_seconds", start_up),
                 wall("cold_read_seconds", read(cpus)), wall("cold_read_1_thread_seconds", read(1)),
                 wall("cold_read_double_threads_seconds", read(2 * cpus)),
                 wall("cold_ours_seconds", ours(cpus))])
    still_cached = []     # after each eviction: the fraction of the files still in memory
    seconds = _interleaved(runs, min(cfg.repeats, 3), before=_page_cache_states(runs, files, still_cached))
    out = {"frames": sim.n_frames, "cpus": cpus, "frames_per_batch": sorted(batches),
           **{k: _stats(v) for k, v in seconds.items()},
           "cold_still_cached": None if None in still_cached else max(still_cached)}
    step = {name: _stats(v[1:]) for name, v in steps.items()}    # after the warm-up round
    out["counting_step_1_thread_seconds"] = step["ours_1_thread_seconds"]
    out["counting_step_seconds"] = step["ours_seconds"]
    out["cold_counting_step_seconds"] = step["cold_ours_seconds"]
    for name in ("read_seconds", "read_1_thread_seconds"):
        out[name.replace("_seconds", "_step_seconds")] = step[name]     # the read without start-up
    if importlib.util.find_spec("stempy") is not None:
        out["stempy_seconds"] = _stats(_timed(lambda: run(stempy_count), 1))   # 20 s a run at 8,192 frames
        out["speedup_vs_stempy"] = _seconds(out["stempy_seconds"]) / _seconds(out["ours_seconds"])
    else:
        out["stempy_seconds"] = None
    # The read ceiling: the fastest numpy read, on 1 or on all threads (a disk may serve one
    # stream faster than several), from the disk also on twice as many (or more requests in
    # flight faster: this VM's disk served 2 threads' reads in 3.1-4.6 s, 1 thread's in
    # 6.9-10.5 s, and the command, whose index asks for many pages at once, once beat the
    # best of 3 reads on 1 and 2 threads by 1.15): the whole command against the whole read.
    for cold in ("", "cold_"):
        reads = ("read_seconds", "read_1_thread_seconds") + (("read_double_threads_seconds",) if cold else ())
        ceiling = min(_seconds(out[cold + r]) for r in reads)
        out[cold + "read_ceiling_seconds"] = ceiling
        out[cold + "ratio_to_read"] = ceiling / _seconds(out[cold + "ours_seconds"])
        out[cold + "fixed_seconds"] = (_seconds(out[cold + "ours_seconds"])
                                       - _seconds(out[cold + "counting_step_seconds"]))
    # From the page cache, also the command's counting step (reading and counting: the part
    # that grows with the scan) against the read itself, each without its process's fixed
    # costs (start-up, imports; the command's index, kernel load, calibration and write).
    # Not from the disk: there the index and the calibration have read part of the files
    # (a 4 kB page per record, the sample frames) before the counting step starts.
    ceiling = min(_seconds(out["read_step_seconds"]), _seconds(out["read_1_thread_step_seconds"]))
    out["read_step_ceiling_seconds"] = ceiling
    out["counting_step_ratio_to_read"] = ceiling / _seconds(out["counting_step_seconds"])
    out["threads_speedup"] = _seconds(out["ours_1_thread_seconds"]) / _seconds(out["ours_seconds"])
    # The command reads every byte, so its speed-up from threads is bounded by the read's.
    out["read_threads_speedup"] = _seconds(out["read_1_thread_seconds"]) / _seconds(out["read_seconds"])
    out["counting_step_threads_speedup"] = (_seconds(out["counting_step_1_thread_seconds"])
                                            / _seconds(out["counting_step_seconds"]))
    # What the stack's start-up leaves within reach: a count that paid nothing but it
    # (no index, calibration or write) and read the files as fast as numpy does, against
    # the read; and the command's 1 vs all threads if its fixed costs were that start-up
    # alone (more fixed cost, on one thread, only lowers it).
    floor = _seconds(out["start_up_seconds"])
    out["ratio_to_read_bound"] = out["read_ceiling_seconds"] / (floor + ceiling)
    out["threads_speedup_bound"] = ((floor + _seconds(out["counting_step_1_thread_seconds"]))
                                    / (floor + _seconds(out["counting_step_seconds"])))
    for path in (output, folder / "stempy.h5"):
        path.unlink(missing_ok=True)
    return out


def bench_index(cfg: Config, folder: Path, log) -> dict:
    """The raw scan's index on ``cfg.index_ranks`` ranks (see :func:`_index_worker`), from
    header-only files of a ``cfg.index_scan`` scan (+ flyback) in the page cache."""
    from .detector import ScanGeometry, parse_scan_size

    geometry = ScanGeometry.from_probe_grid(*parse_scan_size(cfg.index_scan), flyback=True)
    raw = folder / "index_raw"
    log(f"index: {cfg.index_scan} (+ flyback) scan, {4 * geometry.n_frames:,} records, "
        f"ranks {list(cfg.index_ranks)}")
    files = _header_only_scan(raw, geometry)
    out = {"scan": cfg.index_scan, "records": 4 * geometry.n_frames, "files": len(files), "ranks": {}}
    for n in cfg.index_ranks:
        runs = _run_mpi(n, "_index_worker", str(raw), cfg.repeats + 1)
        fig = out["ranks"][str(n)] = {f"{way}_seconds": _stats(runs[way][1:])     # the first: warm-up
                                      for way in ("shared", "reads", "every")}
        fig["ratio"] = _seconds(fig["reads_seconds"]) / _seconds(fig["shared_seconds"])
        fig["speedup_vs_every"] = _seconds(fig["every_seconds"]) / _seconds(fig["shared_seconds"])
    shutil.rmtree(raw)
    return out


def _header_only_scan(folder: Path, geometry, n_dst: int = 4, frames_per_file: int = 2048) -> list[Path]:
    """Raw v5 files of a scan of ``geometry`` laid out as :class:`~fourdstream.rawfile.RawScanWriter`
    lays them out (frame k + 1 at position k, in file ``k % n_dst`` of its module), holding
    the records' headers and nothing else: the payloads are holes, so the index of a
    production-size scan (174 GB of frames) takes a 4 kB block a record."""
    from .detector import record_dtype
    from .rawfile import raw_filename, record_headers

    folder.mkdir()
    rec = record_dtype(5).itemsize
    frame = np.arange(geometry.n_frames)
    header = record_headers(1, geometry, frame + 1, frame // geometry.frames_per_position)
    paths = []
    for module in range(4):
        for dst in range(n_dst):
            mine = header[frame % n_dst == dst]
            for f, start in enumerate(range(0, len(mine), frames_per_file)):
                part = mine[start:start + frames_per_file]
                paths.append(folder / raw_filename(1, module, dst, f))
                fd = os.open(paths[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    os.ftruncate(fd, len(part) * rec)
                    for k, one in enumerate(part):
                        os.pwrite(fd, one.tobytes(), k * rec)
                finally:
                    os.close(fd)
    return paths


def bench_transport(cfg: Config, folder: Path, log) -> dict:
    from .security import make_keys

    n = cfg.transport_frames
    log(f"transport: 4 senders -> 4 sockets of one rank, {n} frames ({4 * n} messages), "
        f"plain and with CURVE")
    keys = folder / "curve-keys"
    make_keys(keys)
    raw, ours, curve = [], [], []
    for _ in range(cfg.repeats + 1):     # the first round is the warm-up
        raw.append(_transport_once(n, raw=True))
        ours.append(_transport_once(n, raw=False))
        curve.append(_transport_once(n, raw=False, keys=keys))
    raw, ours, curve = raw[1:], ours[1:], curve[1:]
    fps = lambda secs: _stats(n / s for s in secs)
    gbps = lambda secs: _stats(4 * n * SECTOR_BYTES / s / 1e9 for s in secs)
    out = {"frames": n, "raw_pyzmq_fps": fps(raw), "raw_pyzmq_gbps": gbps(raw),
           "fourdstream_fps": fps(ours), "fourdstream_gbps": gbps(ours),
           "curve_fps": fps(curve), "curve_gbps": gbps(curve)}
    out["ratio"] = _rate(out["fourdstream_fps"]) / _rate(out["raw_pyzmq_fps"])
    out["curve_cost"] = 1 - _rate(out["curve_fps"]) / _rate(out["fourdstream_fps"])
    return out


def _transport_once(n: int, raw: bool, keys: Path | None = None) -> float:
    """Seconds from the first to the last of 4n sector messages at one consumer (with
    ``keys``: CURVE-encrypted and authenticated, as ``--curve-keys`` does)."""
    import zmq

    from . import security, wire
    from .assembly import FramePool, ScanShare
    from .detector import ScanGeometry

    base = free_port_block(4)
    ctx = zmq.Context()
    server = security.receiver_keys(keys) if keys else None
    auth = security.start_authenticator(ctx, server) if server else None
    socks = []
    for m in range(4):
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.RCVHWM, 100)
        if server:
            security.as_server(s, server)
        s.bind(f"tcp://127.0.0.1:{base + m}")
        socks.append(s)
    width = max(int(np.ceil(np.sqrt(n))), 1)
    height = -(-n // width)
    if raw:      # the end-to-end ceiling's senders, to one rank: header + payload, as ours send
        procs = [subprocess.Popen(_python("_raw_route", base + m, 1, 1, n, 0), stdout=subprocess.DEVNULL)
                 for m in range(4)]
    else:
        procs = [subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--module", str(m),
                                   "--simulate", f"{width}x{height}", "--no-flyback", "--pool-frames", "64",
                                   "--connect", f"tcp://127.0.0.1:{base}", "--ranks", "1",
                                   *(["--curve-keys", str(keys)] if keys else [])],
                                  stdout=subprocess.DEVNULL) for m in range(4)]
    pool = FramePool(256)
    share = ScanShare(1, ScanGeometry(width, height), pool)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    expected = 4 * (n if raw else width * height)
    received, t0 = 0, None
    deadline = time.time() + 120
    while received < expected and time.time() < deadline:
        for s in dict(poller.poll(100)):
            while True:
                try:
                    parts = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                t0 = t0 or time.perf_counter()
                if raw:
                    received += 1
                    continue
                kind, h, payload = wire.decode(parts)
                if kind == "data":
                    received += 1
                    share.add(h.frame, h.module, h.y * width + h.x, payload)
                    if share.ready:
                        pool.give(slot for slot, *_ in share.ready)
                        share.ready.clear()
    seconds = time.perf_counter() - t0 if t0 else float("nan")
    for p in procs:
        p.wait(timeout=60)
    for s in socks:
        s.close(linger=0)
    if auth:
        auth.stop()
    ctx.term()
    if received < expected:
        raise RuntimeError(f"transport benchmark: {received} of {expected} messages arrived")
    return seconds * n / (expected / 4)   # seconds per n frames


def bench_write(cfg: Config, folder: Path, log) -> dict:
    nbytes = cfg.write_events * 4
    log(f"write: {cfg.write_events / 1e6:.0f} M events ({nbytes / 1e6:.0f} MB) collectively, "
        f"ranks {list(cfg.write_ranks)}")
    out = {"bytes": nbytes, "ranks": {}}
    for n in cfg.write_ranks:
        worker = _run_mpi(n, "_write_worker", str(folder / f"write_{n}.h5"), cfg.write_events,
                          cfg.repeats + 1)
        runs = worker["runs"][1:]   # the first one is the warm-up
        fig = out["ranks"][str(n)] = {
            "slabs_seconds": _stats(r["slabs"] for r in runs),
            "interleaved_seconds": _stats(r["interleaved"] for r in runs),
            "collective_gbps": _stats(nbytes / r["collective"] / 1e9 for r in runs),
            "raw_write_gbps": _stats(nbytes / r["raw"] / 1e9 for r in runs),
            "total_gbps": _stats(nbytes / r["total"] / 1e9 for r in runs),
            "stempy_view_seconds": _stats(r["stempy_view"] for r in runs),
            "parallel_hdf5": worker["parallel"]}
        fig["ratio"] = _rate(fig["collective_gbps"]) / _rate(fig["raw_write_gbps"])
    return out


def bench_stream(cfg: Config, ranks: int, folder: Path, log, *, ceilings: bool) -> dict:
    """End to end with ``ranks`` ranks; with ``ceilings``, also raw pyzmq with the same
    processes (:func:`_raw_stream_once`), the counting alone, the transport alone (the
    ranks do not count), and the full run with the live view on (``--live``) where its
    packages are installed (else ``live_fps`` and ``live_cost`` are None)."""
    from .liveserver import require

    out = {"ranks": ranks, "scan": cfg.stream_scan}
    try:
        require()
        live = ("live",)
    except RuntimeError as exc:
        live, out["live_fps"], out["live_cost"], out["live_missing"] = (), None, None, str(exc)
    modes = ("full", "transport", "raw_pyzmq", *live) if ceilings else ("full",)
    runs = {mode: [] for mode in modes}
    for i in range(cfg.repeats + 1):       # interleaved, so drift hits every mode alike
        for mode in modes:
            runs[mode].append(_raw_stream_once(cfg.stream_scan, ranks) if mode == "raw_pyzmq" else
                              _stream_once(cfg.stream_scan, ranks, mode, folder / f"{mode}{ranks}_{i}"))
    for mode in modes:
        done = runs[mode][1:]              # the first round is the warm-up
        out[f"{mode}_fps"] = _stats(r["frames"] / r["seconds"] for r in done)
        if mode == "full":
            out["latency_seconds"] = _stats(r["latency"] for r in done)
            out["turnaround_seconds"] = {step: _stats(r["steps"][step] for r in done)
                                         for step in done[0]["steps"]}
            out["rank_concurrency"] = _stats(r["rank_concurrency"] for r in done)
            out["peak_rss_mb"] = max(max(r["peak_rss_mb"]) for r in done)
            out["frames"] = done[0]["frames"]
            out["complete"] = min(r["complete"] for r in done)
        log(f"stream {mode}, {ranks} rank(s): {out[f'{mode}_fps']['median']:,.0f} frames/s")
    counting = _run_mpi(ranks, "_count_worker", 256, cfg.repeats)
    out["counting_alone_fps"] = _stats(counting["fps"])
    if ceilings:
        if live:
            out["live_cost"] = 1 - _rate(out["live_fps"]) / _rate(out["full_fps"])
        out["counting_cost"] = 1 - _rate(out["full_fps"]) / _rate(out["transport_fps"])
        ceiling = min(_rate(out["raw_pyzmq_fps"]), _rate(out["counting_alone_fps"]))
        out["ceiling_fps"] = ceiling
        out["ratio"] = _rate(out["full_fps"]) / ceiling
    return out


def _stream_once(scan: str, ranks: int, mode: str, folder: Path, timeout: float = 300,
                 rate: float = 0.0) -> dict:
    """One streamed scan, 4 senders starting together (at ``rate`` frames/s, 0: as fast as
    they go); the receiver's summary."""
    from .demo import SENDER_START_SECONDS
    from .launch import mpi_environment, mpiexec_command
    from .transport import read_endpoints

    folder.mkdir(parents=True)
    endpoints, summary = folder / "endpoints.json", folder / "summary.json"
    receiver = subprocess.Popen(mpiexec_command(ranks, _python(
        "_receive", mode, "receive", "-o", folder, "--endpoints-file", endpoints, "--scans", 1,
        "--summary-json", summary, *(["--live", "127.0.0.1:0"] if mode == "live" else []))),
        env=mpi_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        read_endpoints(endpoints, wait=60)
        start_at = time.time() + SENDER_START_SECONDS
        senders = [subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--module", str(m),
                                     "--simulate", scan, "--pool-frames", "256", "--start-at",
                                     str(start_at), "--endpoints-file", str(endpoints),
                                     "--rate", str(rate)],
                                    stdout=subprocess.DEVNULL) for m in range(4)]
        for p in senders:
            p.wait(timeout=timeout)
        _, err = receiver.communicate(timeout=timeout)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    if receiver.returncode or not summary.exists():
        raise RuntimeError(f"benchmark receiver ({mode}) failed: {err[-2000:]}")
    (s,) = json.loads(summary.read_text())
    return s


def bench_scale(cfg: Config, folder: Path, log) -> dict:
    """A production-size scan streamed into each of ``cfg.scale_ranks`` rank counts, once
    each with the senders as fast as they go (the rate the ranks sustain, their memory and
    the turnaround, which then includes the senders' queues draining); then, with the most
    ranks, once more with the senders paced at :data:`PACED` of that rate, as a detector
    whose job keeps up with it: the turnaround from the detector's last frame."""
    runs = {}
    for ranks in cfg.scale_ranks:
        log(f"scale: {cfg.scale_scan} (+ flyback) into {ranks} rank(s) (minutes)")
        runs[str(ranks)] = _scale_run(cfg.scale_scan, ranks, folder / f"scale_{ranks}")
    ranks = max(cfg.scale_ranks)
    rate = PACED * runs[str(ranks)]["fps"]
    log(f"scale: {cfg.scale_scan} into {ranks} rank(s), senders paced at {rate:,.0f} frames/s")
    paced = _scale_run(cfg.scale_scan, ranks, folder / "scale_paced", rate=rate)
    return {"scan": cfg.scale_scan, "ranks": runs, "paced": dict(paced, ranks=ranks, rate=rate)}


#: The paced run of the scale stage sends at this fraction of the rate the ranks sustained.
PACED = 0.8


def _scale_run(scan: str, ranks: int, folder: Path, rate: float = 0.0) -> dict:
    t0 = time.perf_counter()
    s = _stream_once(scan, ranks, "full", folder, timeout=3600, rate=rate)
    wall = time.perf_counter() - t0
    (written,) = folder.glob("*.h5")
    size = written.stat().st_size
    raw = _raw_file_write(folder / "raw.bin", size)   # while the file still holds its pages
    for leftover in (written, folder / "raw.bin"):
        leftover.unlink()
    return {"frames": s["frames"], "expected": s["expected"], "missing": s["missing"],
            "file_bytes": size, "raw_file_write_seconds": raw,
            "incomplete": s["incomplete"], "seconds": s["seconds"], "wall_seconds": wall,
            "fps": s["frames"] / s["seconds"], "gbps": s["frames"] * FRAME_BYTES / s["seconds"] / 1e9,
            "latency": s["latency"], "latency_received": s["latency_received"],
            "turnaround": s["steps"], "rank_concurrency": s["rank_concurrency"],
            "peak_rss_mb": s["peak_rss_mb"], "memory_bound_mb": s["memory_bound_mb"]}


def _raw_file_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` (from memory already touched) into a new file in blocks
    reserved beforehand, no fsync: what writing the scan's file costs at the least on this
    machine in the state the scan left it (a virtual machine may hand out page-cache pages
    slowly after a while without using them)."""
    data = np.ones(nbytes, np.uint8)
    _reserved_file(path, nbytes)
    fd = os.open(path, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        os.pwrite(fd, data, 0)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _reserved_file(path, nbytes: int) -> None:
    """A new file of ``nbytes`` with its blocks reserved (``posix_fallocate``), as the writer
    reserves its file's before writing: the ceilings write into the same kind of file."""
    Path(path).unlink(missing_ok=True)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, nbytes)


def _run_mpi(n: int, worker: str, *args) -> dict:
    from .launch import mpi_environment, mpiexec_command

    proc = subprocess.run(mpiexec_command(n, _python(worker, *args)), env=mpi_environment(),
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmark worker {worker} on {n} ranks failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# == sizing, record, report ==========================================================
def sizing(record: dict, cores_per_node: int, network_gbit_per_node: float = NETWORK_GBIT_PER_NODE,
           frame_rate: float = LINE_RATE_FPS) -> dict:
    """Nodes needed for ``frame_rate`` (frames/s), from the rates of ``record``.

    Assumptions, all inputs: one rank per core, ``cores_per_node`` cores and
    ``network_gbit_per_node`` Gbit/s into each node. Only rates measured with every
    rank receiving at once size the job: the end-to-end rate of the best run of
    several ranks whose concurrency is >= ``CONCURRENT`` (per core of this machine,
    senders included), and the network. The one-rank stages (the counting kernel,
    transport into one rank) are listed under ``single_rank`` for reference only.
    """
    cpus = record["machine"]["cpu_count"]
    st = record["stages"]
    gbit = frame_rate * FRAME_BYTES * 8 / 1e9
    out = {"frame_rate_fps": frame_rate, "gbit_per_s": gbit, "cores_per_node": cores_per_node,
           "network_gbit_per_node": network_gbit_per_node, "stages": {}, "single_rank": {}}

    def need(rate: float) -> dict:      # a rate 10x another is 10 ranks, not 11 by rounding
        ranks = int(np.ceil(round(frame_rate / rate, 9)))
        return {"frames_per_s_per_core": rate, "ranks": ranks,
                "nodes": int(np.ceil(ranks / cores_per_node))}

    if "counting" in st:
        out["single_rank"]["counting"] = need(st["counting"]["compiled_fps"]["median"])
    if "transport" in st:   # the whole machine ran it: rate per core used
        out["single_rank"]["transport"] = need(st["transport"]["fourdstream_fps"]["median"] / cpus)
    concurrent = {n: r for n, r in st.get("scaling", {}).get("ranks", {}).items()
                  if int(n) > 1 and r["rank_concurrency"]["median"] >= CONCURRENT}
    if concurrent:
        n, best = max(concurrent.items(), key=lambda item: item[1]["full_fps"]["median"])
        out["stages"]["end_to_end"] = need(best["full_fps"]["median"] / cpus)
        out["end_to_end_basis"] = (f"{n} ranks, every rank busy "
                                   f"{best['rank_concurrency']['median']:.0%} of the scan")
    out["stages"]["network"] = {"nodes": int(np.ceil(gbit / network_gbit_per_node))}
    out["nodes"] = max(s["nodes"] for s in out["stages"].values())
    out["bottleneck"] = max(out["stages"], key=lambda s: out["stages"][s]["nodes"])
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "launcher": " ".join(launcher())}


def versions() -> dict:
    out = {"fourdstream": __version__}
    for name in ("numpy", "zmq", "h5py", "mpi4py", "stempy", "cupy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


STAGES = ("counting", "count_command", "index", "transport", "write", "end_to_end", "scaling", "scale")
#: Stages run unless --stages says otherwise (scale takes minutes).
DEFAULT_STAGES = STAGES[:-1]


def run(cfg: Config, stages=DEFAULT_STAGES, log=print) -> dict:
    """Run the harness; returns the JSON record."""
    record = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
              "versions": versions(), "parameters": dataclasses.asdict(cfg), "stages": {}}
    with tempfile.TemporaryDirectory(prefix="fourdstream-bench-") as tmp:
        folder = Path(tmp)
        # Its file system sets the write and disk figures (TMPDIR chooses it).
        record["machine"]["folder"] = str(folder)
        if "counting" in stages:
            record["stages"]["counting"] = bench_counting(cfg, log)
        if "count_command" in stages:
            record["stages"]["count_command"] = bench_count_command(cfg, folder, log)
        if "index" in stages:
            record["stages"]["index"] = bench_index(cfg, folder, log)
        if "transport" in stages:
            record["stages"]["transport"] = bench_transport(cfg, folder, log)
        if "write" in stages:
            record["stages"]["write"] = bench_write(cfg, folder, log)
        if "end_to_end" in stages:
            record["stages"]["end_to_end"] = bench_stream(cfg, cfg.stream_ranks, folder, log,
                                                          ceilings=True)
        if "scaling" in stages:
            runs = {}
            for n in cfg.scaling_ranks:
                e2e = record["stages"].get("end_to_end", {})
                runs[str(n)] = e2e if e2e.get("ranks") == n else bench_stream(cfg, n, folder, log,
                                                                              ceilings=False)
            record["stages"]["scaling"] = {"ranks": runs}
        if "scale" in stages:
            record["stages"]["scale"] = bench_scale(cfg, folder, log)
    record["sizing"] = sizing(record, cfg.cores_per_node, cfg.network_gbit_per_node)
    return record


def table(record: dict) -> str:
    """The human-readable report."""
    st, rows = record["stages"], []

    def row(stage, rate, ceiling, ratio):
        rows.append((stage, rate, ceiling, ratio))

    def bounded(x: float) -> str:   # a stage above its ceiling: the ceiling is wrong, not the stage fast
        if x <= 1:
            return f"{x:.2f}"
        if x <= 1 + RESOLUTION:
            return f"{x:.2f} (at the ceiling: within the {RESOLUTION:.0%} two timings of one loop differ by)"
        return f"{x:.2f}  CEILING WRONG (a stage cannot beat its ceiling)"

    if "counting" in st:
        c = st["counting"]
        for dose, figures in c["by_dose"].items():
            for variant in ("plain", "dark", "dark+gain"):
                k = figures[variant]
                row(f"counting, compiled, {dose} e-/frame, {variant} (1 core)",
                    f"{_rate(k['compiled_fps']):,.0f} frames/s",
                    f"memory pass {_rate(figures['memory_pass_fps']):,.0f} frames/s",
                    bounded(k['ratio_to_memory_pass']))
        for statistic, k in c.get("row_dark", {}).items():     # not in the records before run Q
            row(f"counting, compiled, 150 e-/frame, dark, row-dark by the {statistic} (1 core)",
                f"{_rate(k['compiled_fps']):,.0f} frames/s",
                f"memory pass {_rate(c['memory_pass_fps']):,.0f} frames/s", bounded(k["ratio_to_memory_pass"]))
            row("  against the numpy reference", f"{_rate(k['compiled_fps']):,.0f} frames/s",
                f"numpy {_rate(k['numpy_fps']):,.0f} frames/s", f"{k['speedup_vs_numpy']:.1f}x")
        if "threads" in c:
            t = c["threads"]
            row(f"  150 e-/frame, dark, 1 vs {t['cpus']} threads",
                f"{_rate(t['one_fps']):,.0f} vs {_rate(t['all_fps']):,.0f} frames/s ({t['speedup']:.2f}x)",
                f"memory pass on {t['cpus']} threads {_rate(t['memory_pass_all_fps']):,.0f} frames/s "
                f"({t['memory_pass_speedup']:.2f}x)", bounded(t["ratio_to_memory_pass"]))
        row("counting, numpy reference, 150, dark", f"{_rate(c['numpy_fps']):,.0f} frames/s",
            f"compiled {_rate(c['compiled_fps']):,.0f} frames/s",
            f"{_rate(c['numpy_fps']) / _rate(c['compiled_fps']):.2f}")
        if c.get("stempy_fps"):
            row("counting vs stempy 3.6 (1 core)", f"{_rate(c['compiled_fps']):,.0f} frames/s",
                f"stempy {_rate(c['stempy_fps']):,.0f} frames/s", f"{c['speedup_vs_stempy']:.0f}x")
        p = c.get("prefetch")       # not in the records before 2026-11-28T07:00
        row("kernel compilation", f"{c['compile_seconds']['uncached']:.2f} s once, "
            f"{c['compile_seconds']['cached']:.2f} s from the cache",
            f"for CPU {p['cpu']}, prefetch locality {p['locality']}" if p else "", "")
        if c.get("cupy_fps"):
            row("counting, cupy (GPU)", f"{_rate(c['cupy_fps']):,.0f} frames/s", "", "")
    if "count_command" in st:
        k = st["count_command"]
        batch = (f", {'/'.join(map(str, k['frames_per_batch']))} frames a batch"
                 if "frames_per_batch" in k else "")      # not in the records before run J
        row(f"fourdstream count, {k['frames']:,} frames, {k['cpus']} threads{batch}",
            f"{_seconds(k['ours_seconds']):.2f} s", f"numpy read of the files, 1 or {k['cpus']} threads "
            f"{k['read_ceiling_seconds']:.2f} s", bounded(k['ratio_to_read']))
        if "cold_ours_seconds" in k:
            cached = k.get("cold_still_cached", 0)
            row("  the same, files read from the disk" + (
                " (not checked: no fincore)" if cached is None else
                f" ({cached:.0%} of them in memory: tmpfs?)" if cached > 0.01 else ""),
                f"{_seconds(k['cold_ours_seconds']):.2f} s",
                f"the same read from the disk {k['cold_read_ceiling_seconds']:.2f} s",
                bounded(k['cold_ratio_to_read']))
        if k.get("stempy_seconds"):
            row("  vs stempy's threaded count", f"{_seconds(k['ours_seconds']):.2f} s",
                f"stempy {_seconds(k['stempy_seconds']):.2f} s", f"{k['speedup_vs_stempy']:.1f}x")
        row("  1 vs all threads", f"{_seconds(k['ours_1_thread_seconds']):.2f} s vs "
            f"{_seconds(k['ours_seconds']):.2f} s", f"numpy read of the files, 1 vs all threads "
            f"{k['read_threads_speedup']:.2f}x", f"{k['threads_speedup']:.2f}x")
        if "counting_step_seconds" in k:
            row("  1 vs all threads, its counting step", f"{_seconds(k['counting_step_1_thread_seconds']):.2f} s vs "
                f"{_seconds(k['counting_step_seconds']):.2f} s", "", f"{k['counting_step_threads_speedup']:.2f}x")
        if "counting_step_ratio_to_read" in k:
            row(f"  its counting step, start-up etc. {k['fixed_seconds']:.2f} s apart",
                f"{_seconds(k['counting_step_seconds']):.2f} s",
                f"the numpy read without its start-up {k['read_step_ceiling_seconds']:.2f} s",
                bounded(k['counting_step_ratio_to_read']))
            row(f"  from the disk, start-up etc. {k['cold_fixed_seconds']:.2f} s apart",
                f"{_seconds(k['cold_counting_step_seconds']):.2f} s", "(the index has read a page of "
                "each record: no ceiling)", "")
        if "start_up_seconds" in k:       # not in the records before run W
            floor = _seconds(k["start_up_seconds"])
            row("  at most, with only the start-up of numpy, click, h5py, MPI, numba and the kernel",
                f"{floor:.2f} s + the numpy read's step {k['read_step_ceiling_seconds']:.2f} s",
                f"numpy read of the files {k['read_ceiling_seconds']:.2f} s", f"{k['ratio_to_read_bound']:.2f}")
            row("  at most, 1 vs all threads, with only that start-up",
                f"{floor + _seconds(k['counting_step_1_thread_seconds']):.2f} s vs "
                f"{floor + _seconds(k['counting_step_seconds']):.2f} s", "", f"{k['threads_speedup_bound']:.2f}x")
    if "index" in st:
        x = st["index"]
        for n, r in x["ranks"].items():
            row(f"index, {x['scan']} + flyback ({x['records']:,} records), {n} rank(s)",
                f"{_seconds(r['shared_seconds']):.2f} s (each rank reading all: "
                f"{_seconds(r['every_seconds']):.2f} s)",
                f"its share of the header reads alone {_seconds(r['reads_seconds']):.2f} s",
                bounded(r["ratio"]))
    if "transport" in st:
        t = st["transport"]
        row("transport 4 senders -> rank", f"{_rate(t['fourdstream_fps']):,.0f} frames/s "
            f"({_rate(t['fourdstream_gbps']):.2f} GB/s)", f"raw pyzmq {_rate(t['raw_pyzmq_fps']):,.0f} "
            f"frames/s ({_rate(t['raw_pyzmq_gbps']):.2f} GB/s)", bounded(t['ratio']))
        row("  with CURVE (--curve-keys)", f"{_rate(t['curve_fps']):,.0f} frames/s "
            f"({_rate(t['curve_gbps']):.2f} GB/s)", f"plain {_rate(t['fourdstream_fps']):,.0f} frames/s",
            f"cost {t['curve_cost']:.0%}")
    if "write" in st:
        w = st["write"]
        for n, r in w["ranks"].items():
            row(f"collective write, {n} rank(s)", f"{_rate(r['collective_gbps']):.2f} GB/s "
                f"(+ stempy view {_seconds(r['stempy_view_seconds']):.2f} s)",
                f"{n} rank(s) writing the same bytes raw {_rate(r['raw_write_gbps']):.2f} GB/s",
                bounded(r['ratio']))
            row(f"  events to slabs + write vs interleaved, {n} rank(s)",
                f"{_seconds(r['slabs_seconds']):.3f} s vs {_seconds(r['interleaved_seconds']):.3f} s", "",
                f"{_seconds(r['interleaved_seconds']) / _seconds(r['slabs_seconds']):.2f}")
    if "end_to_end" in st:
        e = st["end_to_end"]
        row(f"end to end, {e['ranks']} ranks, {e['scan']}", f"{_rate(e['full_fps']):,.0f} frames/s",
            f"min(raw pyzmq, same processes {_rate(e['raw_pyzmq_fps']):,.0f}, "
            f"counting alone {_rate(e['counting_alone_fps']):,.0f})", bounded(e['ratio']))
        row("latency: last frame sent -> file closed", f"{_seconds(e['latency_seconds']):.2f} s", "", "")
        row("  the transport alone (ranks receive, do not count)", f"{_rate(e['transport_fps']):,.0f} frames/s",
            f"counting too {_rate(e['full_fps']):,.0f} frames/s", f"cost {e['counting_cost']:.0%}")
        if e.get("live_fps"):
            row("  with the live view (--live)", f"{_rate(e['live_fps']):,.0f} frames/s",
                f"without {_rate(e['full_fps']):,.0f} frames/s", f"cost {e['live_cost']:.0%}")
        elif "live_missing" in e:
            row("  with the live view (--live)", "not measured: " + e["live_missing"], "", "")
    if "scaling" in st:
        for n, r in st["scaling"]["ranks"].items():
            row(f"scaling, {n} rank(s)", f"{_rate(r['full_fps']):,.0f} frames/s end to end, every "
                f"rank busy {_rate(r['rank_concurrency']):.0%}",
                f"counting alone {_rate(r['counting_alone_fps']):,.0f} frames/s", "")
        for n, r in st["scaling"]["ranks"].items():
            steps = {k: _seconds(v) for k, v in r["turnaround_seconds"].items()}
            row(f"  last frame received -> file closed, {n} rank(s)", f"{sum(steps.values()):.2f} s",
                ", ".join(f"{k} {v:.2f}" for k, v in steps.items() if v >= 0.005), "")
    if "scale" in st:
        c = st["scale"]
        runs = [(f"{r} rank(s)", run) for r, run in c["ranks"].items()]
        runs.append((f"{c['paced']['ranks']} rank(s), senders paced at {c['paced']['rate']:,.0f} frames/s",
                     c["paced"]))
        for label, run in runs:
            row(f"scale: {c['scan']} into {label}", f"{run['fps']:,.0f} frames/s "
                f"({run['gbps']:.2f} GB/s), {run['seconds']:.0f} s, {run['missing']:,} missing, "
                f"{run['incomplete']:,} incomplete", f"peak {max(run['peak_rss_mb']):.0f} MB/rank "
                f"(bound {run['memory_bound_mb']:.0f})", f"busy {run['rank_concurrency']:.0%}")
            row("  last frame sent / received -> file closed",
                f"{run['latency']:.2f} s / {run['latency_received']:.2f} s",
                ", ".join(f"{k} {v:.2f}" for k, v in run["turnaround"].items() if v >= 0.005), "")
            row("  the file's bytes written raw, right after", f"{run['raw_file_write_seconds']:.2f} s "
                f"({run['file_bytes'] / 1e6:,.0f} MB)", "", "")
    widths = [max(len(r[i]) for r in rows + [("stage", "rate (best)", "ceiling (best)", "ratio")])
              for i in range(4)]
    lines = [f"{'stage':<{widths[0]}}  {'rate (best)':<{widths[1]}}  {'ceiling (best)':<{widths[2]}}  ratio"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    m = record["machine"]
    kernels = st.get("counting", {}).get("repeats")
    lines.append(f"machine: {m['hostname']}, {m['cpu_count']} CPUs ({m['cpu']}); "
                 f"best of {record['parameters']['repeats']} repeats after a warm-up"
                 + (f" (the counting kernels: best of {kernels})" if kernels else ""))
    sz = record.get("sizing", {})
    if sz.get("stages"):
        lines.append(f"sizing for {sz['frame_rate_fps']:,.0f} frames/s ({sz['gbit_per_s']:.0f} Gbit/s), "
                     f"assuming {sz['cores_per_node']} cores and {sz['network_gbit_per_node']:g} Gbit/s "
                     f"per node, one rank per core, from the median rates:")
        for stage, s in sz["stages"].items():
            if stage == "network":
                lines.append(f"  {'network':<11} {sz['gbit_per_s']:>8,.0f} Gbit/s in all -> "
                             f"{s['nodes']} node(s)")
            else:
                lines.append(f"  {stage:<11} {s['frames_per_s_per_core']:>8,.0f} frames/s/core -> "
                             f"{s['ranks']:,} ranks, {s['nodes']} node(s)  (from {sz['end_to_end_basis']})")
        if "end_to_end" not in sz["stages"]:
            lines.append(f"  end to end: not sized, no run of several ranks had every rank busy "
                         f">= {CONCURRENT:.0%} of the scan")
        lines.append(f"  nodes needed: {sz['nodes']} (bottleneck: {sz['bottleneck']})")
        for stage, s in sz["single_rank"].items():
            lines.append(f"  (one rank alone, not used for sizing: {stage} "
                         f"{s['frames_per_s_per_core']:,.0f} frames/s/core -> {s['ranks']:,} ranks)")
    return "\n".join(lines)


def _figures(record: dict, prefix: str = ""):
    """(path, median, higher_is_better) for every figure of a record."""
    def walk(node, path):
        if isinstance(node, dict):
            if "median" in node and "values" in node:
                yield path, node["median"], not path.endswith("seconds")
                return
            for k, v in node.items():
                yield from walk(v, f"{path}/{k}" if path else k)
    yield from walk(record.get("stages", {}), prefix)


def compare(old: dict, new: dict, tolerance: float = REGRESSION_TOLERANCE) -> list[str]:
    """Lines describing each figure that got worse by more than ``tolerance``."""
    before = {p: v for p, v, _ in _figures(old)}
    out = []
    for path, value, higher_better in _figures(new):
        if path not in before or not before[path]:
            continue
        change = value / before[path] - 1
        worse = -change if higher_better else change
        if worse > tolerance:
            out.append(f"REGRESSION {path}: {before[path]:.4g} -> {value:.4g} ({change:+.0%})")
    return out


def load_record(path) -> dict:
    """A single JSON record, or the last record of a JSON-lines results file."""
    text = Path(path).read_text().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def plot(record: dict, path) -> bool:
    """Scaling and per-stage rates as a PNG; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = record["stages"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if "scaling" in st:
        ranks = sorted(st["scaling"]["ranks"], key=int)
        x = [int(r) for r in ranks]
        for key, label in (("full_fps", "end to end"), ("counting_alone_fps", "counting alone")):
            ax1.errorbar(x, [st["scaling"]["ranks"][r][key]["median"] for r in ranks],
                         yerr=[[st["scaling"]["ranks"][r][key]["median"] - st["scaling"]["ranks"][r][key]["min"]
                                for r in ranks],
                               [st["scaling"]["ranks"][r][key]["max"] - st["scaling"]["ranks"][r][key]["median"]
                                for r in ranks]], marker="o", capsize=3, label=label)
        ax1.set_xticks(x)
        ax1.set_xlabel("MPI ranks")
        ax1.set_ylabel("frames/s")
        ax1.set_title(f"scaling ({record['machine']['cpu_count']} CPUs)")
        ax1.legend()
    bars = []
    if "counting" in st:
        bars += [("count compiled", st["counting"]["compiled_fps"]["median"]),
                 ("count numpy", st["counting"]["numpy_fps"]["median"]),
                 ("memory pass", st["counting"]["memory_pass_fps"]["median"])]
        if st["counting"].get("stempy_fps"):
            bars.append(("stempy", st["counting"]["stempy_fps"]["median"]))
    if "transport" in st:
        bars += [("transport", st["transport"]["fourdstream_fps"]["median"]),
                 ("raw pyzmq", st["transport"]["raw_pyzmq_fps"]["median"])]
    if "end_to_end" in st:
        bars.append(("end to end", st["end_to_end"]["full_fps"]["median"]))
    if bars:
        ax2.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="tab:blue")
        ax2.set_xscale("log")
        ax2.set_xlabel("frames/s (log)")
        ax2.set_title("stages and ceilings (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# == workers =========================================================================
def _raw_stream_once(scan: str, ranks: int, timeout: float = 300) -> dict:
    """The end-to-end stage's loopback-ZeroMQ ceiling: a ``scan`` (+ flyback) streamed by
    raw pyzmq with the processes and sockets of a streamed scan, and nothing else. 4
    sender processes send each frame's sector as a message of the same parts and bytes
    (a sector header, a 165,888-byte payload) to the rank that owns its position
    (:func:`~fourdstream.route.owner`), ``ranks`` processes receive them on 4 sockets
    each and do nothing with them. Returns ``frames`` and ``seconds`` from the first
    sector sent to the last received."""
    from .detector import ScanGeometry, parse_scan_size
    from .route import owner

    geometry = ScanGeometry.from_probe_grid(*parse_scan_size(scan), flyback=True)
    n = geometry.n_frames
    base = free_port_block(4 * ranks)
    expected = np.bincount(owner(np.arange(n) // geometry.frames_per_position, ranks), minlength=ranks)
    receivers = [subprocess.Popen(_python("_raw_pull", base + 4 * r, 4 * expected[r], timeout),
                                  stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    senders = []
    try:
        for proc in receivers:       # bound
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("benchmark raw receiver failed to start")
        start_at = time.time() + 1.5       # they import numpy and pyzmq alone: 0.2 s here
        senders = [subprocess.Popen(_python("_raw_route", base + m, ranks, geometry.frames_per_position, n,
                                            start_at), stdout=subprocess.PIPE, text=True)
                   for m in range(4)]
        printed = []
        for proc in senders + receivers:     # a failed sender ends it at once (finally)
            printed.append(proc.communicate(timeout=timeout)[0])
            if proc.returncode:
                raise RuntimeError(f"benchmark raw stream failed: {proc.args[3]} exited with "
                                   f"status {proc.returncode}")
    finally:
        for proc in senders + receivers:
            if proc.poll() is None:
                proc.kill()
    first = min(map(float, printed[:4]))
    last = max(float(t) for t, k in zip(printed[4:], expected) if k)   # a rank may own no position
    return {"frames": n, "seconds": last - first}


def _raw_route(port: str, ranks: str, frames_per_position: str, n: str, start_at: str) -> None:
    """One raw sender of :func:`_raw_stream_once` (module ``port - base``): frame k's
    sector to rank ``owner(k // frames_per_position)``'s socket at port
    ``base + 4 rank + module``; prints when it sent the first."""
    import zmq

    from . import wire
    from .route import owner

    port, ranks = int(port), int(ranks)
    ctx = zmq.Context()
    sockets = []
    for r in range(ranks):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.connect(f"tcp://127.0.0.1:{port + 4 * r}")
        sockets.append(s)
    rank = owner(np.arange(int(n)) // int(frames_per_position), ranks).tolist()
    header = wire.encode_header(1, 1, 1, 1, 0, 0, 0)
    payload = np.zeros(SECTOR_BYTES, np.uint8)
    time.sleep(max(float(start_at) - time.time(), 0))
    first = time.time()
    for r in rank:
        sockets[r].send_multipart([header, payload], copy=False)
    print(first)
    for s in sockets:
        s.close(linger=60000)
    ctx.term()


def _raw_pull(port: str, expected: str, timeout: str) -> None:
    """One raw receiver of :func:`_raw_stream_once`: binds 4 PULL sockets at ``port`` + 0..3,
    prints ``ready``, takes ``expected`` messages and prints when it took the last."""
    import zmq

    ctx = zmq.Context()
    poller = zmq.Poller()
    for m in range(4):
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.RCVHWM, 1000)
        s.bind(f"tcp://127.0.0.1:{int(port) + m}")
        poller.register(s, zmq.POLLIN)
    print("ready", flush=True)
    left, deadline, last = int(expected), time.monotonic() + float(timeout), None
    while left and time.monotonic() < deadline:
        for s in dict(poller.poll(100)):
            while left:
                try:
                    s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                left -= 1
                last = time.time()
    if left:
        sys.exit(f"raw receiver: {left} of {expected} messages did not arrive")
    print(last)
    ctx.destroy(linger=0)


def _write_worker(path: str, events: str, repeats: str) -> None:
    """Write a scan whose frames sit on the ranks that counted them (the routing rule), two ways:

    * ``slabs`` (what the writer does): events moved to contiguous slab owners
      (``Alltoallv``), each rank writes one hyperslab per dataset;
    * ``interleaved`` (the alternative): no move; each rank selects the union of
      its chunks' hyperslabs and all write collectively in place.
    """
    from mpi4py import MPI

    from .detector import ScanGeometry
    from .route import owner
    from .sparse import CountedFrames
    from .writer import write_counted_scan

    comm = MPI.COMM_WORLD
    total, per_frame = int(events), 100
    n_frames = total // per_frame
    side = max(int(np.sqrt(n_frames)), 1)
    g = ScanGeometry(side, max(n_frames // side, 1))
    mine = np.flatnonzero(owner(np.arange(g.n_positions), comm.size) == comm.rank)
    n = len(mine)
    rng = np.random.default_rng(comm.rank)
    counted = CountedFrames(rng.integers(0, FRAME_PIXELS, n * per_frame).astype(np.uint32),
                            np.arange(n + 1, dtype=np.int64) * per_frame, mine.astype(np.uint32),
                            mine, np.full(n, 0b1111, np.uint8))
    runs = []
    for _ in range(int(repeats)):
        comm.Barrier()
        rep = write_counted_scan(path, counted, g, electron_counting={}, provenance={}, comm=comm,
                                 overwrite=True)
        comm.Barrier()
        interleaved = _write_interleaved(path + ".interleaved", counted, g, comm)
        raw = _write_raw(path + ".raw", rep.n_events * 4, comm)
        runs.append({"collective": rep.seconds_collective, "stempy_view": rep.seconds_stempy_view,
                     "total": rep.seconds_total,
                     "slabs": rep.seconds_redistribute + rep.seconds_collective,
                     "interleaved": interleaved, "raw": raw})
    if comm.rank == 0:
        for suffix in ("", ".interleaved", ".raw"):
            Path(path + suffix).unlink()
        print(json.dumps({"runs": runs, "parallel": rep.parallel, "events": rep.n_events}))


def _write_raw(path: str, nbytes: int, comm) -> float:
    """The collective write's ceiling: the same ranks write the same number of bytes, each
    its contiguous share, into a new file in the same folder, its blocks reserved beforehand
    (``posix_fallocate``, untimed, as the writer reserves its file's before the collective
    write) and with the same durability (none: no fsync, as HDF5's close); seconds from all
    ready to all done."""
    share = np.array_split(np.arange(nbytes // 4, dtype=np.int64), comm.size)[comm.rank]
    data = np.random.default_rng(comm.rank).integers(0, FRAME_PIXELS, len(share)).astype(np.uint32)
    if comm.rank == 0:
        _reserved_file(path, nbytes)
    comm.Barrier()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, int(share[0]) * 4 if len(share) else 0)
    finally:
        os.close(fd)
    comm.Barrier()
    return time.perf_counter() - t0


def _write_interleaved(path: str, counted, geometry, comm) -> float:
    """The ``interleaved`` strategy of :func:`_write_worker`; seconds, file creation excluded."""
    import h5py
    from mpi4py import MPI

    from .io import GROUP
    from .writer import _create_file, collective_dxpl, write_runs

    counted = counted.sorted()
    per_slot = np.zeros(geometry.n_positions, np.int64)
    per_slot[counted.position] = counted.counts()
    t0 = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, per_slot, op=MPI.SUM)      # every slot's size, on every rank
    offsets = np.concatenate([[0], np.cumsum(per_slot)]).astype(np.uint64)
    sizes = time.perf_counter() - t0
    if comm.rank == 0:
        _create_file(Path(path), int(offsets[-1]), geometry.n_positions)
    comm.Barrier()
    t1 = time.perf_counter()
    dxpl = collective_dxpl()
    p = counted.position
    cut = np.flatnonzero(np.diff(p) != 1) + 1
    starts, stops = np.r_[p[:1], p[cut]], np.r_[p[cut - 1] + 1, p[-1:] + 1]   # runs of positions

    with h5py.File(path, "r+", driver="mpio", comm=comm) as f:
        g = f[GROUP]
        write_runs(g["events"], counted.events, offsets[starts], offsets[stops] - offsets[starts], dxpl)
        for name, data in (("offsets", offsets[p]), ("frame_number", counted.frame_number),
                           ("position", p.astype(np.uint64)), ("sector_mask", counted.mask)):
            write_runs(g[name], data, starts, stops - starts, dxpl)
    return sizes + time.perf_counter() - t1


def _count_worker(frames: str, repeats: str) -> None:
    """Every rank counts ``frames`` frames from memory; rank 0 prints the total frames/s."""
    from mpi4py import MPI

    from .counting import ElectronCounter, Thresholds
    from .detector import ScanGeometry
    from .simulate import Simulator

    comm = MPI.COMM_WORLD
    n = int(frames)
    data = Simulator(ScanGeometry(n, 1), dose=150, seed=comm.rank, pattern="disc").frames(0, n)[0]
    counter = ElectronCounter(Thresholds(28.0, 700.0))
    counter.count(data[:16])
    fps = []
    for _ in range(int(repeats)):
        comm.Barrier()
        t0 = MPI.Wtime()
        counter.count(data)
        seconds = comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
        fps.append(n * comm.size / seconds)
    if comm.rank == 0:
        print(json.dumps({"fps": fps}))


def _receive(mode: str, *argv: str) -> None:
    """``fourdstream receive`` with the counting switched off in ``transport`` mode."""
    from . import pipeline
    from .cli import main
    from .sparse import CountedFrames

    if mode == "transport":
        def assemble_only(self, frames, frame_number, position, mask, index=None):
            empty = CountedFrames.empty()
            n = len(frame_number)
            return CountedFrames(empty.events, np.zeros(n + 1, np.int64), np.asarray(frame_number, np.uint32),
                                 np.asarray(position, np.int64), np.asarray(mask, np.uint8))
        pipeline.ScanCounting.count = assemble_only
    main(list(argv))


def _index_worker(folder: str, repeats: str) -> None:
    """Index the raw scan in ``folder`` on every rank, three ways taking turns, ``repeats``
    times: ``shared`` (what ``fourdstream count`` does: the ranks share the header reads,
    each every N-th file's, and all get the index), ``reads`` (each rank's share of those
    reads alone: the ceiling) and ``every`` (each rank indexing the whole scan alone).
    Prints the slowest rank's seconds of each."""
    from mpi4py import MPI

    from .detector import record_dtype
    from .rawfile import RawScan, _index_file, _share, expand_paths

    comm = MPI.COMM_WORLD
    files = expand_paths([folder])
    record = record_dtype(5).itemsize
    ways = {"shared": lambda: RawScan(files, comm=comm),
            "reads": lambda: [_index_file(files[i], record) for i in _share(len(files), comm)],
            "every": lambda: RawScan(files)}
    runs = {way: [] for way in ways}
    for _ in range(int(repeats)):
        for way, fn in ways.items():
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            runs[way].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if comm.rank == 0:
        print(json.dumps(runs))


WORKERS = {"_raw_route": _raw_route, "_raw_pull": _raw_pull,
           "_write_worker": _write_worker, "_count_worker": _count_worker, "_receive": _receive,
           "_index_worker": _index_worker}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
