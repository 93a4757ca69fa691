"""The ``fourdstream`` command line (click).

Every command has ``--help``. Exit codes: 0 on success; 1 with a one-line
``Error: ...`` for bad input or a failed run (set FOURDSTREAM_DEBUG=1 for the
traceback); 2 for a usage error.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

import click

# The program's parallelism is its ranks and its counting threads. The BLAS behind numpy
# and scipy (only the calibration's small fits use it) runs on the calling thread: a pool
# of its own would spin on the cores the ranks count on. Set before numpy is loaded, and
# inherited by the processes the program starts (ranks, senders); a value given is kept.
# (OMP_NUM_THREADS is left alone: other tools' OpenMP threads are theirs to choose.)
for _threads in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")
del _threads

from . import __version__, config, launch  # noqa: E402
from .detector import ScanGeometry, parse_scan_size  # noqa: E402  (numpy loads here)
from .route import DEFAULT_CHUNK  # noqa: E402


class _Group(click.Group):
    """Turns expected failures into one-line errors and exit code 1.

    In an MPI job of several ranks, an error every rank raised together (a
    :class:`~fourdstream.collective.CollectiveError`) is printed once by rank 0;
    any other error is printed by its rank, which then aborts the job so that no
    rank is left waiting in a collective call.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own flow (--help, usage errors); Exit is a RuntimeError
        except (ValueError, RuntimeError, OSError) as exc:
            if os.environ.get("FOURDSTREAM_DEBUG"):
                raise
            message = f"{type(exc).__name__}: {exc}"
            world = _mpi_world()
            if world is None or world.size == 1:
                raise click.ClickException(message) from None
            from .collective import CollectiveError
            if isinstance(exc, CollectiveError):
                if world.rank == 0:
                    click.echo(f"Error: {message}", err=True)
                ctx.exit(1)
            click.echo(f"Error (rank {world.rank}): {message}", err=True)
            world.Abort(1)


def _mpi_world():
    """MPI.COMM_WORLD if this process already initialised MPI, else None."""
    if "mpi4py.MPI" not in sys.modules:
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD if MPI.Is_initialized() and not MPI.Is_finalized() else None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fourdstream")
def main():
    """Stream NCEM 4D Camera data into MPI ranks, count electrons, write HDF5.

    Frames are 576x576 uint16 in 4 sectors; counted output is one HDF5 file per
    scan that stempy (SparseArray.from_hdf5) and ncempy (ncempy.io.read) open;
    `fourdstream export` writes it for py4DSTEM and LiberTEM. Run a command with --help
    for its options, units and defaults.
    """
    launch.singleton_defaults()


#: Allocations between two collections of the youngest generation, for the program
#: (Python's default: 700). Its start-up (imports, numba loading a kernel) makes hundreds
#: of thousands of objects that live as long as the process; at 700 the collector walks
#: them again and again. Cycles are still collected, a little later.
GC_THRESHOLD = 100_000


def run() -> None:
    """The ``fourdstream`` program (and ``python -m fourdstream``): :func:`main` with the
    collector's threshold at :data:`GC_THRESHOLD`, then every object frozen out of the
    garbage collector, so that the interpreter's final collection does not walk them: the
    process is ending, and numba's compiler leaves many. Files and sockets are closed by
    the commands themselves."""
    gc.set_threshold(GC_THRESHOLD)
    try:
        main()
    finally:
        gc.freeze()


#: ``--config FILE`` (a deployment's TOML file; see :mod:`fourdstream.config`).
config_option = config.option(lambda: main.commands)


def _summary(title: str, rows: dict) -> None:
    width = max(map(len, rows))
    click.echo(title)
    for key, value in rows.items():
        click.echo(f"  {key:<{width}}  {value}")


# -- shared options ---------------------------------------------------------------
def _option_group(*options):
    """A decorator applying ``options`` in the order given (as stacked decorators would)."""
    def decorate(func):
        return functools.reduce(lambda f, opt: opt(f), reversed(options), func)
    return decorate


#: Options of every command that counts (count, receive).
counting_options = _option_group(
        click.option("--background-threshold", "--bg", type=float, default=None,
                     help="Fixed background threshold (ADU, after dark/gain); needs --xray-threshold. "
                          "Default: calibrated per scan."),
        click.option("--xray-threshold", "--xr", type=float, default=None,
                     help="Fixed x-ray threshold (ADU); needs --background-threshold."),
        click.option("--background-sigma", type=float, default=4.0, show_default=True,
                     help="Calibration: bg = fitted mean + N x fitted sigma of the background peak."),
        click.option("--xray-sigma", type=float, default=175.0, show_default=True,
                     help="Calibration: xr = sample mean + N x sample std (NCEM production: 175)."),
        click.option("--samples", type=int, default=1200, show_default=True,
                     help="Calibration: frames drawn (with replacement) to pool pixels from."),
        click.option("--sample-frames", type=int, default=20, show_default=True,
                     help="Calibration: draw from this many first complete frames."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the calibration draw (same seed, same thresholds)."),
        click.option("--dark", type=str, default=None,
                     help="Dark reference: .npy, FILE.h5[:/dataset], or raw .data files/folder "
                          "(mean of frames). Default: zeros."),
        click.option("--gain", type=str, default=None,
                     help="Gain map (values are divided by it): .npy or FILE.h5[:/dataset]."),
        click.option("--row-dark", type=click.Choice(["mean", "median"]), default=None,
                     help="Apply row-dark correction (half-row mean or median)."),
        click.option("--backend", type=click.Choice(["auto", "cpu", "numpy", "gpu"]), default="auto",
                     show_default=True,
                     help="Counting kernel: cpu = compiled (numba), gpu = CuPy, numpy = the "
                          "array-module reference; auto = gpu if a CUDA device answers, else cpu."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Frames counted per batch. Default: 32 when receiving; when counting files, "
                          "64 with the compiled kernel (it reads each frame as it counts it), else as "
                          "many as fit in half of a CPU's share of its last-level cache, 8 to 32 (a "
                          "batch read from files stays in the cache until counted)."),
        click.option("--virtual-detectors", default=None, metavar="CX,CY,BF,ADF_IN,ADF_OUT",
                     help="The scan images' virtual detectors, whole pixels: centre, BF disc radius, "
                          "ADF ring radii. Default: found from each scan's summed pattern."),
)


def make_counting_options(kw: dict):
    """Pop the :func:`counting_options` values out of ``kw`` into CountingOptions."""
    import dataclasses

    from .pipeline import CountingOptions

    return CountingOptions(**{f.name: kw.pop(f.name) for f in dataclasses.fields(CountingOptions)})


def _scan_geometry(scan: str, flyback: bool, frames_per_position: int) -> ScanGeometry:
    columns, rows = parse_scan_size(scan)
    return ScanGeometry.from_probe_grid(columns, rows, flyback=flyback,
                                        frames_per_position=frames_per_position)


# -- simulate ---------------------------------------------------------------------
@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--scan", default="64x64", show_default=True,
              help="Probe positions WIDTHxHEIGHT (the flyback column is extra).")
@click.option("--dose", type=float, default=150.0, show_default=True,
              help="Mean electrons per frame (150 = NCEM-typical 0.45 e-/1000 px).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; same seed, same frames.")
@click.option("--frames-per-position", type=int, default=1, show_default=True)
@click.option("--flyback/--no-flyback", default=True, show_default=True,
              help="Record the extra flyback column at the end of each row.")
@click.option("--pattern", type=click.Choice(["uniform", "disc"]), default="disc", show_default=True,
              help="Illumination: whole detector or a bright-field disc.")
@click.option("--scan-number", type=int, default=1, show_default=True)
@click.option("--files-per-module", type=int, default=2, show_default=True,
              help="DAQ writer threads per module (files written in parallel).")
@click.option("--frames-per-file", type=int, default=1024, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace raw files of the same scan in OUTDIR.")
def simulate(outdir, scan, dose, seed, frames_per_position, flyback, pattern, scan_number,
             files_per_module, frames_per_file, overwrite):
    """Simulate a 4D Camera scan and write it as raw v5 sector files into OUTDIR.

    Writes data_scan{N:010d}_module{m}_dst{d}_file{f}.data files, 4 modules,
    165,904-byte records (16-byte header + 144x576 uint16 sector).
    """
    from .progress import Progress
    from .simulate import Simulator, write_scan

    geometry = _scan_geometry(scan, flyback, frames_per_position)
    sim = Simulator(geometry, dose=dose, seed=seed, pattern=pattern)
    progress = Progress(sim.n_frames, "frames")
    t0 = time.perf_counter()
    paths = write_scan(sim, outdir, scan_number, n_dst=files_per_module,
                       frames_per_file=frames_per_file, overwrite=overwrite, progress=progress)
    progress.close()
    dt = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in paths)
    _summary(f"simulated scan {scan_number} -> {outdir}", {
        "scan": geometry.describe(),
        "frames": f"{sim.n_frames:,}",
        "dose": f"{dose:g} e-/frame",
        "files": f"{len(paths)} ({nbytes / 1e9:.2f} GB)",
        "time": f"{dt:.1f} s ({sim.n_frames / dt:,.0f} frames/s)",
    })


# -- count ------------------------------------------------------------------------
@main.command()
@config_option
@click.argument("raw", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Counted HDF5 file (stempy version-3 layout + fourdstream's own).")
@click.option("--version", "file_version", type=click.Choice(["4", "5"]), default="5",
              show_default=True, help="Raw header version (sector layout).")
@click.option("--flyback/--no-flyback", default=True, show_default=True,
              help="The last column of each row is the flyback column (kept, labelled).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--threads", type=int, default=None,
              help="Counting threads per process. Default: the cores available to it, shared "
                   "among the ranks on its node.")
@counting_options
def count(raw, output, file_version, flyback, overwrite, threads, **kw):
    """Count electrons in a raw scan (files or folders of .data files) into one HDF5 file.

    Runs on one process or on all ranks of an MPI job (mpiexec -n N fourdstream
    count ..., or srun): ranks share the scan by blocks of positions, calibrate
    thresholds jointly (or take fixed ones) and write the file collectively.
    With no thresholds given they are calibrated from the scan (NCEM production
    settings by default, seeded so that runs agree).
    """
    from mpi4py import MPI

    from .collective import agree, on_root
    from .launch import cores_per_rank
    from .offline import count_raw_scan
    from .pipeline import ScanCounting
    from .progress import Progress
    from .rawfile import RawScan
    from .writer import write_counted_scan

    comm = MPI.COMM_WORLD
    out = Path(output)

    def refuse_existing():   # checked before hours of counting, not after
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")

    def set_up():
        scan = RawScan(raw, version=int(file_version), comm=comm)
        scan.label_flyback(flyback)
        return ScanCounting(make_counting_options(kw), comm), scan   # loads dark/gain

    t0 = time.perf_counter()
    on_root(comm, refuse_existing)
    counting, scan = agree(comm, set_up)   # a bad input is one error, not one per rank
    options = counting.options
    progress = Progress(len(scan), "frames", enabled=comm.rank == 0)
    threads = threads or cores_per_rank(comm)
    result = count_raw_scan(scan, counting, threads=threads,
                            progress=lambda n: progress(n * comm.size))
    progress.close()
    provenance = offline_provenance(result, options, comm, threads)
    report = write_counted_scan(out, result.counted, scan.geometry,
                                electron_counting=result.calibration.as_dict(),
                                provenance=provenance, comm=comm, overwrite=overwrite,
                                detectors=options.detectors)
    if comm.rank == 0:
        _print_count_summary(result, report, provenance, time.perf_counter() - t0)


def offline_provenance(result, options, comm, threads: int = 1) -> dict:
    """``/metadata/fourdstream`` of a file counted from raw files."""
    from .pipeline import counting_provenance, frame_accounting

    s = result.scan.summary()
    return dict(
        counting_provenance(options, result.calibration, result.backend),
        source="raw files", raw_files=len(result.scan.files), scan_number=s["scan_number"],
        **frame_accounting(result.scan.geometry.n_frames, s["frames_complete"],
                           s["frames_incomplete"]),
        duplicate_sectors=s["duplicate_sectors"], bad_records=s["bad_records"],
        ranks=comm.size, threads_per_rank=threads, frames_per_batch=result.batch_size,
        timings={k: comm.allreduce(v, op=_max()) for k, v in result.timings.items()})


def _max():
    from mpi4py import MPI
    return MPI.MAX


def _print_count_summary(result, report, provenance: dict, seconds: float) -> None:
    cal = result.calibration
    n = provenance["frames_found"]
    how = "calibrated" if cal.threshold_calculated else "fixed"
    count_s = provenance["timings"]["count"]
    _summary(f"counted scan {provenance['scan_number']} -> {report.path}", {
        "scan": result.scan.geometry.describe(),
        "frames": f"{n:,} ({provenance['frames_complete']:,} complete, "
                  f"{provenance['frames_incomplete']:,} incomplete, "
                  f"{provenance['frames_missing']:,} missing)",
        "events": f"{report.n_events:,} ({report.n_events / max(n, 1):.1f}/frame)",
        "thresholds": f"background {cal.background_threshold:.2f}, x-ray "
                      f"{cal.x_ray_threshold:.1f} ADU ({how})",
        "bad records": f"{provenance['bad_records']} (+{provenance['duplicate_sectors']} "
                       f"duplicate sectors)",
        "ranks": f"{provenance['ranks']} x {provenance['threads_per_rank']} counting thread(s), "
                 f"{result.batch_size} frames a batch, {result.backend}",
        "time": f"{seconds:.2f} s: counting {n / max(count_s, 1e-9):,.0f} frames/s, write "
                f"{report.seconds_collective:.2f} s "
                f"({'parallel HDF5' if report.parallel else 'serial h5py, rank by rank'}), "
                f"stempy view {report.seconds_stempy_view:.2f} s",
    })
    for bad in result.scan.bad_records[:10]:
        click.echo(f"  bad record: {bad}", err=True)
    if len(result.scan.bad_records) > 10:
        click.echo(f"  ... and {len(result.scan.bad_records) - 10} more bad records", err=True)
    click.echo(f"open it with: fourdstream inspect {report.path}   or in Python: "
               f"stempy.io.SparseArray.from_hdf5({str(report.path)!r})")


# -- inspect ----------------------------------------------------------------------
@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Save one figure: virtual BF, ADF, centre of mass, summed pattern, loss map.")
def inspect(file, png):
    """Summarise a counted HDF5 file (fourdstream's or stempy's) and its images.

    The images are read from /fourdstream/images where the file has them (fourdstream's),
    else computed from the events with detectors found from the summed pattern.
    """
    import h5py

    from . import images
    from .io import open_counted

    scan = open_counted(file)
    loss = scan.loss_summary()
    meta = scan.metadata.get("fourdstream", {})
    ec = scan.metadata.get("electron_counting", {})
    rows = {
        "source": scan.source,
        "scan": f"{scan.scan_shape[1]}x{scan.scan_shape[0]} positions (width x height)"
                + (" incl. flyback column" if meta.get("flyback") else ""),
        "frames/position": scan.frames_per_position,
        "frame shape": "x".join(map(str, scan.frame_shape)),
        "events": f"{scan.n_events:,} ({scan.n_events / max(loss['slots'] - loss['empty'], 1):.1f}"
                  f"/frame)",
        "frames": f"{loss['complete']:,} complete, {loss['incomplete']:,} incomplete, "
                  f"{loss['empty']:,} empty slots",
    }
    if "background_threshold" in ec:
        how = "calibrated" if ec.get("threshold_calculated") else "fixed"
        rows["thresholds"] = (f"background {ec['background_threshold']:.2f}, x-ray "
                              f"{ec['x_ray_threshold']:.1f} ADU ({how})")
    for key in ("scan_number", "ranks", "backend", "dark", "gain", "fourdstream_version"):
        if key in meta:
            rows[key.replace("_", " ")] = meta[key]
    with h5py.File(file, "r") as f:
        stored = images.read(f)
    if stored:
        (found, d), pattern = stored, stored[0]["pattern"]
    else:
        found, pattern, d = images.of_scan(scan)
    rows["images"] = (f"{'stored' if stored else 'computed'}; BF r < {d.bf_radius}, ADF "
                      f"{d.adf_inner}-{d.adf_outer} px around ({d.centre_x}, {d.centre_y}); "
                      f"BF {int(found['bf'].sum()):,}, ADF {int(found['adf'].sum()):,} events; "
                      f"{int((found['sector_mask'] != 0b1111).sum()):,} positions not whole")
    _summary(f"{file}", rows)
    if png:
        images.plot(found, pattern, d, png, Path(file).name)
        click.echo(f"images -> {png}")


# -- streaming ----------------------------------------------------------------------
#: Where a sender's messages go (send, gateway).
sender_endpoint_options = _option_group(
        click.option("--endpoints-file", type=click.Path(dir_okay=False), default=None,
                     help="Connect to the ranks listed in this file (written by `fourdstream "
                          "receive --endpoints-file`; waits for it to appear)."),
        click.option("--connect", default=None,
                     help="Connect to ranks that bind tcp://HOST:PORT (rank r, module m at PORT+4r+m); "
                          "needs --ranks."),
        click.option("--listen", default=None,
                     help="Bind tcp://HOST:PORT+r for every rank r (for compute nodes that accept no "
                          "inbound connections; ranks use `receive --connect`); needs --ranks."),
        click.option("--ranks", type=int, default=0, help="Ranks of the receiver job."),
        click.option("--hwm", type=int, default=1000, show_default=True,
                     help="ZeroMQ send high-water mark (messages queued per rank)."),
        click.option("--send-timeout", type=float, default=10.0, show_default=True,
                     help="Seconds the sender may wait in a row with no rank taking a message. Past "
                          "that, messages to the ranks it waited on are dropped (counted) until they "
                          "take one again; if no rank takes any, the scan is given up and the command "
                          "exits with status 3."),
        click.option("--chunk", type=int, default=None,
                     help="Routing: positions per chunk dealt round-robin to the ranks. Default: what "
                          f"the ranks announce in --endpoints-file, else {DEFAULT_CHUNK}."),
        click.option("--curve-keys", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Encrypt and authenticate with ZeroMQ CURVE using the keys in this folder "
                          "(made by `fourdstream keys DIR`)."),
)


def _sender_keys(folder):
    from .security import sender_keys

    return sender_keys(folder) if folder else None


def _warn(message: str) -> None:
    click.echo(message, err=True)


def _report_sender_totals(label: str, totals: dict, gone: str | None) -> None:
    """One line of what a sender sent and dropped; exit 3 if anything was dropped or given up."""
    seconds, sent, dropped = totals["seconds"], totals["sent"], totals["dropped"]
    click.echo(f"{label}: {sent:,} sectors sent in {seconds:.2f} s ({sent / max(seconds, 1e-9):,.0f}/s)"
               + (f", {dropped:,} DROPPED" if dropped else "")
               + (f", end of scan not delivered to {totals['unannounced']} rank(s)"
                  if totals["unannounced"] else ""))
    if gone:
        click.echo(f"Error: {gone}", err=True)
    if gone or dropped or totals["unannounced"]:
        sys.exit(3)


@main.command()
@config_option
@click.option("--module", type=click.IntRange(0, 3), required=True, help="Detector module (sector) 0-3.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Sending threads for this module (frames dealt round-robin).")
@click.option("--simulate", "scan", default=None, help="Simulate scans of WIDTHxHEIGHT probe positions.")
@click.option("--replay", type=click.Path(exists=True), multiple=True,
              help="Replay this module's raw files (files or folders; repeatable).")
@click.option("--dose", type=float, default=150.0, show_default=True, help="Simulation: electrons/frame.")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulation seed.")
@click.option("--frames-per-position", type=int, default=1, show_default=True)
@click.option("--flyback/--no-flyback", default=True, show_default=True)
@click.option("--pattern", type=click.Choice(["uniform", "disc"]), default="disc", show_default=True)
@click.option("--pool-frames", type=int, default=512, show_default=True,
              help="Simulation: distinct frames generated up front and cycled (0: every frame).")
@click.option("--scans", type=int, default=1, show_default=True, help="Simulation: scans to send.")
@click.option("--scan-number", type=int, default=1, show_default=True, help="Simulation: first scan number.")
@click.option("--rate", type=float, default=0.0, show_default=True,
              help="Frames/s per thread (0: as fast as possible).")
@click.option("--start-at", type=float, default=None,
              help="Unix time at which to start sending the first scan (after announcing it), so "
                   "that the senders of all modules start together. Default: at once.")
@sender_endpoint_options
def send(module, threads, scan, replay, dose, seed, frames_per_position, flyback, pattern, pool_frames,
         scans, scan_number, rate, start_at, endpoints_file, connect, listen, ranks, hwm, send_timeout,
         chunk, curve_keys):
    """Stream one module's sectors to the receiver ranks (one DAQ server's job).

    Every sector goes, as a 2-part NCEM message (msgpack header + 165,888-byte
    sector, zero-copy), to the rank owning its scan position (chunks of
    positions dealt round-robin over the ranks); each scan is announced (begin)
    and closed (end, with per-rank message counts) on every rank. Exit status 3
    when messages were dropped or the receiver job stopped taking them.
    """
    import threading

    import zmq

    from .send import ReceiversGone, ReplaySource, Router, SimulatedSource, stream
    from .simulate import Simulator
    from .transport import sender_sockets

    if bool(scan) == bool(replay):
        raise click.UsageError("give either --simulate WIDTHxHEIGHT or --replay PATH")
    if listen and threads > 1:
        raise click.UsageError("--threads > 1 needs the ranks to bind (--endpoints-file or --connect)")
    keys = _sender_keys(curve_keys)
    ctx = zmq.Context()
    results, gone = [None] * threads, [None] * threads

    def worker(t):
        if scan:
            geometry = _scan_geometry(scan, flyback, frames_per_position)
            source = SimulatedSource(Simulator(geometry, dose=dose, seed=seed, pattern=pattern), module,
                                     pool_frames=pool_frames, scans=scans, first_scan=scan_number,
                                     threads=threads, thread=t)
        else:
            source = ReplaySource(replay, module, threads=threads, thread=t)
        sockets, announced = sender_sockets(ctx, module, endpoints_file=endpoints_file, connect=connect,
                                            listen=listen, ranks=ranks, hwm=hwm, send_timeout=send_timeout,
                                            keys=keys, say=_warn)
        router = Router(sockets, sender=f"{module}.{t}", chunk=chunk or announced or DEFAULT_CHUNK,
                        send_timeout=send_timeout)
        try:
            results[t] = stream(source, router, module, rate=rate, thread=t, start_at=start_at)
        except ReceiversGone as exc:
            results[t], gone[t] = exc.totals, str(exc)
        finally:
            router.close()

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ctx.term()
    if any(r is None for r in results):
        raise RuntimeError("a sending thread failed (see above)")
    totals = {k: sum(r[k] for r in results) for k in ("sent", "dropped", "unannounced")}
    totals["seconds"] = max(r["seconds"] for r in results)
    _report_sender_totals(f"module {module}", totals, next((g for g in gone if g), None))


#: Where a receiver rank listens or connects (receive).
receiver_endpoint_options = _option_group(
        click.option("--listen", default=None,
                     help="Ranks bind tcp://HOST:PORT (rank r, module m at PORT+4r+m; PORT may be "
                          "* for free ports; HOST may be an interface, e.g. hsn0: each rank binds "
                          "its own node's address on it). Default tcp://127.0.0.1:* when --connect "
                          "is not given."),
        click.option("--connect", multiple=True,
                     help="Senders bind: the 4 module senders' tcp://HOST:PORT, in module order "
                          "(repeat 4 times); rank r connects to PORT+r of each."),
        click.option("--endpoints-file", type=click.Path(dir_okay=False), default=None,
                     help="Rank 0 writes the ranks' bound addresses here for the senders."),
        click.option("--advertise", default=None,
                     help="Host name senders should use (default: the bind address or this host's name)."),
        click.option("--curve-keys", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Encrypt and authenticate with ZeroMQ CURVE using the keys in this folder; only senders whose public key is in DIR/allowed get in, refusals are counted "
                          "(made by `fourdstream keys DIR`)."),
)


@main.command()
@config_option
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the counted files, one scanNNNNNNNNNN.h5 per scan.")
@receiver_endpoint_options
@click.option("--senders", type=int, default=4, show_default=True,
              help="Senders that stream every scan (4 = one per module; 1 behind a gateway).")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds without a message of an open scan before it is closed with what arrived.")
@click.option("--window", type=int, default=256, show_default=True,
              help="Frame buffers per rank for assembly (0.66 MB each): the memory cap (the batches "
                   "being counted hold 3 x threads x batch-size more). When full, frames are "
                   "counted, then the oldest incomplete frame is emitted as incomplete.")
@click.option("--hwm", type=int, default=100, show_default=True,
              help="Messages queued per module socket before senders are held back "
                   "(0.17 MB each, 4 sockets per rank).")
@click.option("--threads", type=int, default=None,
              help="Counting threads per rank. Default: the cores available to the rank, shared "
                   "among the ranks on its node.")
@click.option("--chunk", type=int, default=DEFAULT_CHUNK, show_default=True,
              help="Routing: positions per chunk dealt round-robin to the ranks (announced to "
                   "senders in --endpoints-file).")
@click.option("--scans", type=int, default=0, show_default=True,
              help="Exit after writing this many scans (0: serve until SIGINT/SIGTERM).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Take fixed thresholds from a counted file's metadata.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Rank 0 writes the per-scan summaries here at exit (JSON list; a scan that "
                   "could not be written is {\"scan\": N, \"failed\": REASON}).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing scan files (default: write scanN.1.h5, scanN.2.h5, ...).")
@click.option("--journal", type=click.Path(dir_okay=False), default=None,
              help="Rank 0 appends each scan opened, written or failed here, as it happens "
                   "(JSON lines; `fourdstream session` reads it to restart a failed job).")
@click.option("--skip-scan", "skip_scans", type=int, multiple=True,
              help="Ignore this scan's messages (counted as late): lost with an earlier job.")
@click.option("--live", default=None, metavar="[HOST:]PORT",
              help="Rank 0 serves a live page of the session and the scan arriving (images "
                   "refreshed about once a second) at http://HOST:PORT/ (HOST 127.0.0.1 unless "
                   "given: use an SSH tunnel).")
@click.option("--live-pub", default=None, metavar="ENDPOINT",
              help="Rank 0 publishes the same live updates on a ZeroMQ PUB socket bound here, "
                   "e.g. tcp://127.0.0.1:7100 (msgpack header + arrays; `fourdstream watch`).")
@counting_options
def receive(output, listen, connect, endpoints_file, advertise, curve_keys, senders, timeout, window, hwm,
            threads, chunk, scans, calibration, summary_json, overwrite, journal, skip_scans, live,
            live_pub, **kw):
    """Receiver job: run under mpiexec/srun; serves scan after scan until stopped.

    Each rank receives the sectors routed to it (every rank all through a
    scan), assembles and counts frames, and all ranks write one HDF5 file per
    scan collectively as soon as that scan is complete, while the next one is
    arriving. A scan closes when every sender's end message has arrived, or when
    no rank has received anything of it for --timeout s. SIGINT/SIGTERM: the
    scans in flight are closed (incomplete frames marked) and written, exit 0.

    \b
    Peak memory per rank stays within (MB):
      330 + 0.66 x window + 0.66 x hwm + 2 x threads x batch-size
      + 3 x sample-frames + 40 x (counted events the rank holds) / 1e6
    e.g. 690 MB with the defaults and 1 thread, plus 400 MB per 10 M events
    (a 512x512 scan at 150 electrons/frame holds about 10 M events per rank on
    4 ranks).
    """

    import zmq
    from mpi4py import MPI

    from .collective import agree
    from .launch import cores_per_rank
    from .receive import Receiver, ReceiverOptions
    from .route import check_chunk
    from .security import HandshakeWatch, receiver_keys, start_authenticator
    from .transport import rank_sockets

    comm = MPI.COMM_WORLD

    def counting_set_up():
        if calibration:
            kw["background_threshold"], kw["xray_threshold"] = _thresholds_from_file(calibration)
        _check_writable(Path(output))
        return make_counting_options(kw)

    options = agree(comm, counting_set_up)   # a bad input is one error, not one per rank
    keys = agree(comm, lambda: receiver_keys(curve_keys)) if curve_keys else None
    ctx = zmq.Context()
    auth = start_authenticator(ctx, keys) if keys else None
    sockets = rank_sockets(ctx, comm, listen=listen or (None if connect else "tcp://127.0.0.1:*"),
                           connect=list(connect), endpoints_file=endpoints_file, advertise=advertise,
                           hwm=hwm, chunk=check_chunk(chunk), keys=keys, say=_warn)
    watch = HandshakeWatch(sockets, log=lambda m: click.echo(f"rank {comm.rank}: {m}", err=True)) \
        if keys else None
    receiver = agree(comm, lambda: Receiver(comm, sockets, options, ReceiverOptions(
        output=output, senders=senders, timeout=timeout, window=window, scans=scans,
        overwrite=overwrite, threads=threads or cores_per_rank(comm), hwm=hwm, journal=journal,
        skip=tuple(skip_scans), live=live, live_pub=live_pub),
        log=lambda m: click.echo(m, err=False)))
    if comm.rank == 0:
        click.echo(f"receiving on {comm.size} rank(s), {receiver.template.backend}; "
                   f"files -> {output}")
    summaries = receiver.run()
    if watch:
        watch.close()
    refused = comm.allgather(watch.refused if watch else {})
    refused = {k: sum(r.get(k, 0) for r in refused) for k in set().union(*refused)}
    for sock in sockets:
        sock.close()
    if auth:
        auth.stop()
    ctx.term()
    if comm.rank == 0:
        if summary_json:
            Path(summary_json).write_text(json.dumps(summaries, indent=1))
        written = [s for s in summaries if "failed" not in s]
        failed = [s for s in summaries if "failed" in s]
        frames = sum(s["frames"] for s in written)
        click.echo(f"session: {len(written)} scan(s) written, {frames:,} frames"
                   + (f"; {len(failed)} FAILED (scan " + ", ".join(str(s["scan"]) for s in failed)
                      + ")" if failed else "")
                   + (f"; {receiver.session.malformed} malformed and {receiver.session.late} late "
                      f"messages outside any open scan" if receiver.session.malformed
                      or receiver.session.late else "")
                   + (f"; {sum(refused.values())} connection(s) refused ("
                      + ", ".join(f"{k}: {v}" for k, v in sorted(refused.items()) if v) + ")"
                      if sum(refused.values()) else ""))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-n", "--ranks", type=int, required=True, help="Ranks of the receiver job.")
@click.option("--restarts", type=int, default=3, show_default=True,
              help="Start the receiver job again this many times after it fails.")
@click.option("--journal", type=click.Path(dir_okay=False), default=None,
              help="The session's journal (default: OUTPUT/session-DATE-TIME.jsonl).")
@click.argument("receive_args", nargs=-1, type=click.UNPROCESSED)
def session(ranks, restarts, journal, receive_args):
    """A receiver session that outlives a failed job: fourdstream session -n N -- RECEIVE_ARGS.

    Runs `fourdstream receive RECEIVE_ARGS` on N ranks (mpiexec, or srun inside a Slurm
    job through FOURDSTREAM_MPIEXEC) and, if the job fails (a rank died), starts it
    again on the same ports, up to --restarts times. Senders block meanwhile and
    reconnect by themselves (give them a --send-timeout longer than a restart); the
    scans in flight are recorded as failed and the next scan goes to the new job.
    SIGINT/SIGTERM end the session as they end `receive`. Exit status 3 if a scan
    was lost, else the receiver job's.
    """
    from .session import supervise

    ctx = receive.make_context("receive", list(receive_args))   # checks them, reads --config
    p = ctx.params
    journal = journal or Path(p["output"]) / time.strftime("session-%Y%m%d-%H%M%S.jsonl")
    Path(journal).parent.mkdir(parents=True, exist_ok=True)
    result = supervise(ranks, list(receive_args), journal=journal, listen=p["listen"],
                       connect=p["connect"], scans=p["scans"], restarts=restarts, say=click.echo)
    entries = sorted([{"scan": e["scan"], **{k: v for k, v in e.items() if k not in ("event", "time")}}
                      for e in result["written"]] +
                     [{"scan": e["scan"], "failed": e["reason"]} for e in result["failed"]],
                     key=lambda e: e["scan"])
    if p["summary_json"]:
        Path(p["summary_json"]).write_text(json.dumps(entries, indent=1))
    click.echo(f"session: {len(result['written'])} scan(s) written, {len(result['failed'])} failed"
               + "".join(f"; scan {e['scan']}: {e['reason']}" for e in result["failed"])
               + f"; {result['restarts']} restart(s); journal {journal}")
    sys.exit(3 if result["failed"] else result["status"])


@main.command()
@click.argument("endpoint")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Save the latest images here (one figure, as inspect --png) at each update.")
@click.option("--updates", type=int, default=0, show_default=True,
              help="Exit after this many updates (0: until interrupted).")
@click.option("--timeout", type=float, default=0.0, show_default=True,
              help="Exit when no update came for this many seconds (0: wait forever).")
def watch(endpoint, png, updates, timeout):
    """Follow a receiver's live stream (receive --live-pub ENDPOINT): print each scan's
    progress and keep its latest images."""
    import zmq

    from . import images as scan_images
    from .live import decode_update

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    seen = 0
    try:
        while not updates or seen < updates:
            if timeout and not sub.poll(int(timeout * 1000)):
                click.echo(f"watch: no update for {timeout:g} s")
                break
            state, arrays = decode_update(sub.recv_multipart())
            seen += 1
            click.echo(f"scan {state['scan']}: {state['frames']:,}/{state['expected']:,} frames"
                       f"{' (written)' if state.get('closed') else ''}; BF "
                       f"{int(arrays['bf'].sum()):,}, ADF {int(arrays['adf'].sum()):,} events")
            if png:
                scan_images.plot(arrays, arrays["pattern"], scan_images.Detectors(**state["detectors"]),
                                 png, f"scan {state['scan']} (live)")
    finally:
        sub.close()
        ctx.term()


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "tool", type=click.Choice(["py4dstem", "libertem"]), required=True,
              help="py4dstem: a DataCube in py4DSTEM's file format (dense); libertem: a raw_csr "
                   "data set (TOML descriptor + 3 raw files; sparse, as counted).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="py4dstem: the .h5 file; libertem: the .toml descriptor.")
@click.option("--bin", "bin_", type=int, default=1, show_default=True,
              help="py4dstem: bin diffraction space by this factor (must divide 576).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def export(file, tool, output, bin_, overwrite):
    """Write a counted scan for an analysis tool (ncempy needs nothing: the file's images
    are EMD data sets that ncempy.io.read opens).

    \b
    py4DSTEM:  py4DSTEM.read(OUTPUT) -> DataCube
    LiberTEM:  ctx.load("raw_csr", path=OUTPUT), then any UDF
    A dense py4DSTEM cube that would not fit in half the memory available is refused
    before anything is allocated, with its size and a --bin that would fit.
    """
    from . import export as exporter
    from .io import open_counted

    scan = open_counted(file)
    if tool == "py4dstem":
        exporter.write_py4dstem(scan, output, bin=bin_, overwrite=overwrite)
        shape = exporter.dense_shape(scan, bin_)
        click.echo(f"{output}: py4DSTEM DataCube {'x'.join(map(str, shape))} (counts); open with "
                   f"py4DSTEM.read('{output}')")
    else:
        exporter.write_libertem(scan, output, overwrite=overwrite)
        click.echo(f"{output}: LiberTEM raw_csr data set, {scan.n_events:,} events; open with "
                   f"ctx.load('raw_csr', path='{output}')")


def _check_writable(folder: Path) -> None:
    """Make ``folder`` and prove a file can be created there, before any data is taken in."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fourdstream-probe-"):
            pass
    except OSError as exc:
        raise OSError(f"cannot write scan files in {folder}: {exc.strerror}; choose another "
                      f"--output") from None


def _thresholds_from_file(path) -> tuple[float, float]:
    from .io import open_counted

    ec = open_counted(path).metadata.get("electron_counting", {})
    if "background_threshold" not in ec:
        raise ValueError(f"{path} holds no electron_counting thresholds")
    return float(ec["background_threshold"]), float(ec["x_ray_threshold"])


@main.command()
@config_option
@click.option("--producers", "producer_listen", multiple=True, default=["tcp://*:5555"],
              show_default=True, help="Bind these PULL endpoints for the DAQ producers (repeatable).")
@click.option("--frames-per-position", type=int, default=1, show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds without a message before a scan is ended (producers send no end).")
@click.option("--scans", type=int, default=0, show_default=True, help="Exit after this many scans.")
@sender_endpoint_options
def gateway(producer_listen, frames_per_position, timeout, scans, endpoints_file, connect, listen,
            ranks, hwm, send_timeout, chunk, curve_keys):
    """Accept messages from unmodified NCEM producers and route them to the ranks.

    Producers PUSH 2-part messages (9- or 8-field msgpack header + raw sector) to
    the --producers endpoints; the gateway forwards each to the rank owning its
    scan position and adds begin/end messages (one sender per module for the
    receivers: run them with the default --senders 4). Exit status 3 when
    messages were dropped or the receiver job stopped taking them.
    """
    import zmq

    from .detector import N_SECTORS
    from .gateway import Gateway
    from .send import Router
    from .transport import pull_socket, sender_sockets

    keys = _sender_keys(curve_keys)
    ctx = zmq.Context()
    inbound, _ = pull_socket(ctx, bind=producer_listen[0], connect=[], hwm=hwm)
    for url in producer_listen[1:]:
        inbound.bind(url)
    routers = []
    for m in range(N_SECTORS):
        sockets, announced = sender_sockets(ctx, m, endpoints_file=endpoints_file, connect=connect,
                                            listen=listen, ranks=ranks, hwm=hwm, send_timeout=send_timeout,
                                            keys=keys, say=_warn)
        routers.append(Router(sockets, sender=f"gateway.{m}", chunk=chunk or announced or DEFAULT_CHUNK,
                              send_timeout=send_timeout))
    gw = Gateway(inbound, routers, frames_per_position=frames_per_position, timeout=timeout,
                 scans=scans, log=click.echo)
    gw.run()
    inbound.close()
    for r in routers:
        r.close()
    ctx.term()
    if gw.unattributed:
        click.echo(f"gateway: {gw.unattributed} messages could not be attributed to a scan")
    _report_sender_totals("gateway", gw.totals, gw.gone)


# -- demo -------------------------------------------------------------------------
@main.command()
@click.option("--scan", default="64x64", show_default=True,
              help="Probe positions WIDTHxHEIGHT (plus a flyback column).")
@click.option("--ranks", type=int, default=2, show_default=True, help="Receiver MPI ranks.")
@click.option("--output", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the counted file (an existing scan file is kept: a new name is chosen).")
@click.option("--dose", type=float, default=150.0, show_default=True, help="Electrons per frame.")
@click.option("--sim-seed", type=int, default=0, show_default=True, help="Seed of the simulated scan.")
@click.option("--rate", type=float, default=0.0, show_default=True,
              help="Frames/s per sender (0: as fast as possible).")
@click.option("--live", default=None, metavar="[HOST:]PORT",
              help="Serve the live page of the scan at http://HOST:PORT/ while it arrives "
                   "(with --rate, to have time to watch it).")
@counting_options
def demo(scan, ranks, output, dose, sim_seed, rate, live, **kw):
    """Local end-to-end run: 4 simulated senders -> mpiexec receiver job -> counted HDF5 + summary.

    Counting options are passed on to the receiver job.
    """
    from .assembly import Ledger
    from .demo import run_demo

    make_counting_options(dict(kw))   # validate here, before any process starts
    ctx = click.get_current_context()
    given = [(name, value) for name, value in kw.items()
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    counting_args = [a for name, value in given for a in (f"--{name.replace('_', '-')}", str(value))]
    click.echo(f"fourdstream demo: {scan} scan (+ flyback column), {dose:g} e-/frame, 4 senders -> "
               f"{ranks} receiver ranks (mpiexec)")
    if live:
        from .liveserver import parse_address, require

        require()
        host, port = parse_address(live)
        click.echo(f"live view: http://{host}:{port}/")
    s = run_demo(output, scan=scan, ranks=ranks, dose=dose, seed=sim_seed, rate=rate,
                 counting_args=counting_args, receiver_args=("--live", live) if live else (),
                 echo=click.echo)
    losses = {k: s["ledger"][k] for k in Ledger.LOSSES if s["ledger"][k]}
    _summary("\nsummary", {
        "counted file": s["path"],
        "frames": f"{s['frames']:,} of {s['expected']:,} ({s['complete']:,} complete, "
                  f"{s['incomplete']:,} incomplete, {s['missing']:,} missing)",
        "events": f"{s['events']:,} ({s['events'] / max(s['frames'], 1):.1f}/frame)",
        "thresholds": f"background {s['thresholds'][0]:.2f}, x-ray {s['thresholds'][1]:.1f} ADU "
                      + ("(calibrated from the scan)" if s["calibrated"] else "(fixed)"),
        "loss": ", ".join(f"{k} {v}" for k, v in losses.items()) or "none",
        "throughput": f"{s['frames'] / max(s['seconds'], 1e-9):,.0f} frames/s "
                      f"(first sector sent -> file closed, {s['seconds']:.2f} s)",
        "latency": f"{s['latency']:.2f} s from the last frame sent to the file closed",
        "ranks": f"all {ranks} busy {s['rank_concurrency']:.0%} of the scan's duration",
        "memory": f"peak {', '.join(f'{m:.0f}' for m in s['peak_rss_mb'])} MB per rank "
                  f"(bound {s['memory_bound_mb']:.0f} MB, see receive --help)",
    })
    click.echo(f"\nopen it: fourdstream inspect {s['path']} --png bf.png\n"
               f"     or: python -c \"import stempy.io; a = stempy.io.SparseArray.from_hdf5("
               f"'{s['path']}'); print(a.shape)\"")


# -- bench ------------------------------------------------------------------------
@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace existing keys (senders and ranks using "
                                                "the old ones stop getting in).")
def keys(folder, overwrite):
    """Create CURVE key pairs and an allow-list in FOLDER for --curve-keys.

    \b
    FOLDER/receiver.key(_secret)  the ranks' pair: copy to the compute side
    FOLDER/sender.key(_secret)    the senders' and gateways' pair: copy to the DAQ servers
    FOLDER/allowed/               public keys the ranks accept (add more .key files here)
    Senders need receiver.key (public) too. Secret keys are written mode 0600.
    """
    from .security import make_keys

    made = make_keys(folder, overwrite=overwrite)
    for name, path in made.items():
        click.echo(f"{name:<16} {path}")
    click.echo(f"use: --curve-keys {folder} on receive, send and gateway (or curve_keys in the "
               f"configuration file)")


@main.command()
@click.argument("config_file", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--bench", "bench_file", type=click.Path(dir_okay=False), default=None,
              help="Harness results (JSON lines; the last record is used). Default: "
                   "./fourdstream-bench.jsonl, else ./benchmarks/results.jsonl.")
def plan(config_file, bench_file):
    """Print the deployment CONFIG implies, without starting anything.

    Which rank runs on which node and binds what (srun's block placement), the
    positions each rank owns in the first second of a scan, the load per rank and
    per node's network at the detector's rate, and whether the rates the harness
    measured meet it (and with how many nodes they would). CONFIG's [cluster] table
    holds nodes, ranks_per_node, cores_per_node, network_gbit_per_node, frame_rate,
    scan and node_names; [receive] listen and chunk are read too.
    """
    from .plan import Deployment, latest_record, report

    data = config.load(config_file)
    config.validate(data, config_file, {n: c for n, c in main.commands.items()})
    deployment = Deployment.from_config(data, config_file)
    candidates = [bench_file] if bench_file else ["fourdstream-bench.jsonl", "benchmarks/results.jsonl"]
    if bench_file and not Path(bench_file).exists():
        raise click.BadParameter(f"{bench_file} does not exist", param_hint="--bench")
    found = next((c for c in candidates if Path(c).exists()), None)
    click.echo(report(deployment, latest_record(found) if found else None, found or ""))


@main.command()
@click.option("--quick", is_flag=True, help="Small sizes: about 6 minutes on 2 cores.")
@click.option("--json", "json_path", default="fourdstream-bench.jsonl", show_default=True,
              type=click.Path(dir_okay=False), help="Append the run's record (one JSON line) here.")
@click.option("--compare", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Flag figures worse than in this earlier record (exit status 3 if any).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of the scaling and per-stage rates (default: next to --json).")
@click.option("--stages", default="counting,count_command,index,transport,write,end_to_end,scaling",
              show_default=True,
              help="Comma-separated stages to run; add 'scale' for the production-size runs "
                   "(512x512 into 1, 2 and 4 ranks, and 4 ranks paced: about 10 minutes on "
                   "2 cores).")
@click.option("--repeats", type=int, default=None, help="Repeats per figure (after one warm-up); the counting kernels' "
              "figures take at least 10 (a call takes milliseconds).")
@click.option("--cores-per-node", type=int, default=128, show_default=True,
              help="For the sizing: cores per node (128 on a Perlmutter CPU node).")
@click.option("--network-gbit-per-node", type=float, default=200.0, show_default=True,
              help="For the sizing: network into one node, Gbit/s (Perlmutter: one 200 Gbit/s NIC).")
def bench(quick, json_path, compare, plot, stages, repeats, cores_per_node, network_gbit_per_node):
    """Benchmark every stage against a ceiling measured in the same run.

    Prints a table (rates, ceilings, ratios; counting in frames/s per core,
    transport and writes also in GB/s, latency in s), appends a JSON record,
    saves a plot, and sizes a job for the 4D Camera line rate (87,000 frames/s).
    """
    import dataclasses

    from . import bench as harness

    chosen = tuple(x.strip() for x in stages.split(",") if x.strip())
    unknown = set(chosen) - set(harness.STAGES)
    if unknown:
        raise click.UsageError(f"unknown stages {sorted(unknown)}; choose from {harness.STAGES}")
    cfg = harness.QUICK if quick else harness.FULL
    cfg = dataclasses.replace(cfg, cores_per_node=cores_per_node,
                              network_gbit_per_node=network_gbit_per_node,
                              **({"repeats": repeats} if repeats else {}))
    t0 = time.perf_counter()
    record = harness.run(cfg, chosen, log=lambda m: click.echo(f"  {m}", err=True))
    record["seconds"] = time.perf_counter() - t0
    click.echo(harness.table(record))
    with open(json_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    plot = plot or str(Path(json_path).with_suffix(".png"))
    drew = harness.plot(record, plot)
    click.echo(f"record appended to {json_path}" + (f"; plot: {plot}" if drew else "")
               + f"; {record['seconds']:.0f} s")
    if compare:
        regressions = harness.compare(harness.load_record(compare), record)
        for line in regressions:
            click.echo(line)
        if regressions:
            sys.exit(3)
        click.echo(f"no regression beyond {harness.REGRESSION_TOLERANCE:.0%} against {compare}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
