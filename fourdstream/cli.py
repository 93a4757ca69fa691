"""The ``fourdstream`` command line (click).

Every command has ``--help``. Exit codes: 0 on success; 1 with a one-line
``Error: ...`` for bad input or a failed run (set FOURDSTREAM_DEBUG=1 for the
traceback); 2 for a usage error.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .detector import ScanGeometry, parse_scan_size


class _Group(click.Group):
    """Turns expected failures into one-line errors and exit code 1.

    In an MPI job of several ranks, an error every rank raised together (a
    :class:`~fourdstream.writer.WriteError`) is printed once by rank 0; any other
    error is printed by its rank, which then aborts the job so that no rank is
    left waiting in a collective call.
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
            from .writer import WriteError
            if isinstance(exc, WriteError):
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
    scan that stempy, py4DSTEM and ncempy open. Run a command with --help for
    its options, units and defaults.
    """


def _summary(title: str, rows: dict) -> None:
    width = max(map(len, rows))
    click.echo(title)
    for key, value in rows.items():
        click.echo(f"  {key:<{width}}  {value}")


# -- shared options ---------------------------------------------------------------
def counting_options(func):
    """Options of every command that counts (count, receive, gateway, demo)."""
    opts = [
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
        click.option("--backend", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
                     show_default=True, help="Array backend: numpy (cpu) or CuPy (gpu)."),
        click.option("--batch-size", type=int, default=32, show_default=True,
                     help="Frames counted per batch."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(opts), func)


def make_counting_options(kw: dict):
    """Pop the :func:`counting_options` values out of ``kw`` into CountingOptions."""
    from .pipeline import CountingOptions

    names = ("background_threshold", "xray_threshold", "background_sigma", "xray_sigma", "samples",
             "sample_frames", "seed", "dark", "gain", "row_dark", "backend", "batch_size")
    return CountingOptions(**{n: kw.pop(n) for n in names})


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
@click.argument("raw", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Counted HDF5 file (stempy version-3 layout + fourdstream's own).")
@click.option("--version", "file_version", type=click.Choice(["4", "5"]), default="5",
              show_default=True, help="Raw header version (sector layout).")
@click.option("--flyback/--no-flyback", default=True, show_default=True,
              help="The last column of each row is the flyback column (kept, labelled).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@counting_options
def count(raw, output, file_version, flyback, overwrite, **kw):
    """Count electrons in a raw scan (files or folders of .data files) into one HDF5 file.

    Runs on one process or on all ranks of an MPI job (mpiexec -n N fourdstream
    count ..., or srun): ranks share the scan by blocks of positions, calibrate
    thresholds jointly (or take fixed ones) and write the file collectively.
    With no thresholds given they are calibrated from the scan (NCEM production
    settings by default, seeded so that runs agree).
    """
    from mpi4py import MPI

    from .offline import count_raw_scan
    from .progress import Progress
    from .rawfile import RawScan
    from .writer import WriteError, write_counted_scan

    comm = MPI.COMM_WORLD
    options = make_counting_options(kw)
    out = Path(output)
    if comm.rank == 0 and out.exists() and not overwrite:
        error = f"{out} exists; pass --overwrite to replace it"
    else:
        error = None
    if comm.bcast(error, root=0):   # checked before hours of counting, not after
        raise WriteError(error)
    t0 = time.perf_counter()
    scan = RawScan(raw, version=int(file_version))
    scan.label_flyback(flyback)
    progress = Progress(len(scan), "frames", enabled=comm.rank == 0)
    result = count_raw_scan(scan, options, comm=comm,
                            progress=lambda n: progress(n * comm.size))
    progress.close()
    provenance = offline_provenance(result, options, comm)
    report = write_counted_scan(out, result.counted, scan.geometry,
                                electron_counting=result.calibration.as_dict(),
                                provenance=provenance, comm=comm, overwrite=overwrite)
    if comm.rank == 0:
        _print_count_summary(result, report, provenance, time.perf_counter() - t0)


def offline_provenance(result, options, comm) -> dict:
    """``/metadata/fourdstream`` of a file counted from raw files."""
    from .pipeline import counting_provenance

    s = result.scan.summary()
    expected = result.scan.geometry.n_frames
    return dict(
        counting_provenance(options, result.calibration, result.backend),
        source="raw files", raw_files=len(result.scan.files), scan_number=s["scan_number"],
        frames_expected=expected, frames_found=s["frames_found"],
        frames_complete=s["frames_complete"], frames_incomplete=s["frames_incomplete"],
        frames_missing=max(expected - s["frames_found"], 0),
        duplicate_sectors=s["duplicate_sectors"], bad_records=s["bad_records"],
        ranks=comm.size,
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
        "ranks": f"{provenance['ranks']} ({result.backend})",
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
              help="Save the summed-counts (bright-field) image as a PNG.")
def inspect(file, png):
    """Summarise a counted HDF5 file (fourdstream's or stempy's)."""
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
    _summary(f"{file}", rows)
    if png:
        _save_png(scan.counts_image(), png, f"{Path(file).name}: events per position")
        click.echo(f"summed-counts image -> {png}")


def _save_png(image, path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install 'fourdstream[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / max(image.shape[1], 1) + 0.6))
    im = ax.imshow(image, cmap="gray", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="electrons")
    ax.set_title(title)
    ax.set_xlabel("x (scan column)")
    ax.set_ylabel("y (scan row)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- demo -------------------------------------------------------------------------
@main.command()
@click.option("--scan", default="64x64", show_default=True,
              help="Probe positions WIDTHxHEIGHT (plus a flyback column).")
@click.option("--dose", type=float, default=150.0, show_default=True, help="Electrons per frame.")
@click.option("--output", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's raw and counted files (its own files are replaced).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(scan, dose, output, seed):
    """Local end-to-end run: simulate a scan, count it, print the summary."""
    ctx = click.get_current_context()
    raw = Path(output) / "raw"
    ctx.invoke(simulate, outdir=str(raw), scan=scan, dose=dose, seed=seed, overwrite=True)
    counted = Path(output) / "scan1.h5"
    ctx.invoke(count, raw=(str(raw),), output=str(counted), overwrite=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
