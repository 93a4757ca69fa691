"""How a scan is counted, shared by the offline job and the streaming receiver.

:class:`CountingOptions` holds what the user chose (thresholds or calibration
settings, references, backend); :class:`ScanCounting` turns it into a working
counter for one scan on one MPI rank: it loads the references once, calibrates
the thresholds jointly with the other ranks (or takes fixed ones), and counts
batches of frames into :class:`~fourdstream.sparse.CountedFrames`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from . import __version__, backend
from .calibrate import (DEFAULT_BACKGROUND_SIGMA, DEFAULT_SAMPLE_FRAMES, DEFAULT_SAMPLES,
                        DEFAULT_XRAY_SIGMA, Calibration, calibrate, plan_samples)
from .counting import ElectronCounter, Thresholds, frame_index
from .detector import COMPLETE_MASK, FRAME_PIXELS, FRAME_SHAPE, N_SECTORS
from .references import load_reference
from .sparse import CountedFrames


@dataclasses.dataclass
class CountingOptions:
    """The user's counting choices (see ``fourdstream count --help``).

    Thresholds are fixed when both ``background_threshold`` and
    ``xray_threshold`` are given (ADU), otherwise calibrated per scan from
    ``samples`` draws among the first ``sample_frames`` complete frames.
    """

    background_threshold: float | None = None
    xray_threshold: float | None = None
    background_sigma: float = DEFAULT_BACKGROUND_SIGMA
    xray_sigma: float = DEFAULT_XRAY_SIGMA
    samples: int = DEFAULT_SAMPLES
    sample_frames: int = DEFAULT_SAMPLE_FRAMES
    seed: int = 0
    dark: str | None = None
    gain: str | None = None
    row_dark: str | None = None
    backend: str = "auto"
    batch_size: int | None = None        #: None: RECEIVE_BATCH, or offline.SECTORS_BATCH / read_batch
    virtual_detectors: str | None = None   #: "CX,CY,BF,ADF_IN,ADF_OUT" pixels, or found per scan

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if (self.background_threshold is None) != (self.xray_threshold is None):
            raise ValueError("give both --background-threshold and --xray-threshold for fixed "
                             "thresholds, or neither to calibrate them per scan")
        if self.fixed:
            Thresholds(self.background_threshold, self.xray_threshold)  # validates
        if self.samples < 1 or self.sample_frames < 1:
            raise ValueError("--samples and --sample-frames must be >= 1")
        self.detectors   # validates

    @property
    def detectors(self):
        """The scan images' virtual detectors (:class:`fourdstream.images.Detectors`), or None
        to find them from each scan's summed pattern."""
        from .images import Detectors

        if self.virtual_detectors is None:
            return None
        try:
            cx, cy, bf, inner, outer = (int(v) for v in self.virtual_detectors.split(","))
        except ValueError:
            raise ValueError(f"--virtual-detectors takes CX,CY,BF,ADF_IN,ADF_OUT (whole pixels), "
                             f"got {self.virtual_detectors!r}") from None
        if not (0 < bf and 0 <= inner < outer):
            raise ValueError(f"--virtual-detectors: need BF > 0 and ADF_IN < ADF_OUT, got "
                             f"{self.virtual_detectors!r}")
        return Detectors(cx, cy, bf, inner, outer)

    @property
    def fixed(self) -> bool:
        return self.background_threshold is not None


def fixed_calibration(options: CountingOptions) -> Calibration:
    """A :class:`Calibration` record for user-given thresholds (no statistics)."""
    nan = float("nan")
    return Calibration(
        background_threshold=float(options.background_threshold),
        x_ray_threshold=float(options.xray_threshold), number_of_samples=0,
        min_sample=nan, max_sample=nan, mean=nan, variance=nan, std_dev=nan, number_of_bins=0,
        x_ray_threshold_n_sigma=nan, background_threshold_n_sigma=nan, optimized_mean=nan,
        optimized_std_dev=nan, seed=options.seed, sample_frame_numbers=(), sample_weights=(),
        threshold_calculated=False)


def counting_provenance(options: CountingOptions, calibration: Calibration, backend_name: str) -> dict:
    """How the events of a scan were obtained, for ``/metadata/fourdstream``."""
    return {"fourdstream_version": __version__,
            "thresholds": "calibrated" if calibration.threshold_calculated else "fixed",
            "background_threshold": calibration.background_threshold,
            "x_ray_threshold": calibration.x_ray_threshold,
            "dark": options.dark or "none (zeros)", "gain": options.gain or "none",
            "row_dark": options.row_dark or "none", "backend": backend_name}


def frame_accounting(expected: int, complete: int, incomplete: int) -> dict:
    """Where every expected frame of a scan went, for ``/metadata/fourdstream``."""
    found = complete + incomplete
    return {"frames_expected": expected, "frames_found": found, "frames_complete": complete,
            "frames_incomplete": incomplete, "frames_missing": max(expected - found, 0)}


class ScanCounting:
    """Counting of one scan on one rank.

    Parameters
    ----------
    options : CountingOptions
    comm : mpi4py communicator, optional
        Ranks that count this scan together (they calibrate jointly).
    """

    def __init__(self, options: CountingOptions, comm=None):
        self.options, self.comm = options, comm
        chosen = backend.select(options.backend)
        self.xp, self.counter_class, self.backend = chosen.xp, chosen.counter, chosen.description
        self.dark = load_reference(options.dark, "dark") if options.dark else None
        self.gain = load_reference(options.gain, "gain") if options.gain else None
        self.calibration: Calibration | None = fixed_calibration(options) if options.fixed else None
        self._counter = None

    def for_scan(self) -> "ScanCounting":
        """Counting of the next scan: same references and backend, its own thresholds."""
        other = copy.copy(self)
        other.calibration = fixed_calibration(self.options) if self.options.fixed else None
        other._counter = None
        return other

    def _make_counter(self, thresholds=None) -> ElectronCounter:
        return self.counter_class(thresholds, self.dark, self.gain, row_dark=self.options.row_dark,
                                  xp=self.xp)

    @property
    def reads_sectors(self) -> bool:
        """Whether the counter can read frames from raw files itself (:meth:`count_sectors`)."""
        return hasattr(self.counter_class, "count_sectors")

    def warm_up(self, sectors: bool = False) -> None:
        """Load the kernel for this set-up (its references' kinds) from numba's cache, or
        compile it, now: counts a blank frame with stand-in thresholds, so that no batch of
        a scan pays it (the compiled kernel is compiled once per kind of set-up).
        ``sectors``: the kernel of :meth:`count_sectors` instead (a frame of missing sectors)."""
        counter = self._make_counter(Thresholds(1.0, 2.0))
        if sectors:
            missing = np.full((1, N_SECTORS), -1, np.int64)
            counter.count_sectors(missing, missing, 5, np.empty((2, FRAME_PIXELS), np.uint16))
        else:
            counter.count(self.xp.zeros((1,) + FRAME_SHAPE, np.uint16))

    def plan_samples(self, frame_numbers, masks):
        """Sample plan ``(frame_numbers, weights)`` from the scan's frame table."""
        o = self.options
        return plan_samples(frame_numbers, np.asarray(masks) == COMPLETE_MASK,
                            number_of_samples=o.samples, sample_frames=o.sample_frames, seed=o.seed)

    def calibrate(self, frames: dict) -> Calibration:
        """Calibrate jointly with the other ranks (collective over ``comm``).

        ``frames`` maps each planned sample frame number held by this rank to
        ``(weight, frame (576, 576) uint16)``. Returns the calibration (also kept).
        """
        values = ElectronCounter(None, self.dark, self.gain, row_dark=self.options.row_dark).values
        samples = [(fn, w, values(f[None])[0]) for fn, (w, f) in sorted(frames.items())]
        self.calibration = calibrate(samples, number_of_samples=self.options.samples,
                                     seed=self.options.seed,
                                     background_sigma=self.options.background_sigma,
                                     xray_sigma=self.options.xray_sigma, comm=self.comm)
        return self.calibration

    def count(self, frames, frame_number, position, mask, index=None) -> CountedFrames:
        """Count a batch of frames (n, 576, 576) uint16 with the scan's thresholds, or with
        ``index`` (n,) the frames ``frames[index]`` of a larger stack (a frame pool's)."""
        if index is not None and self.xp is not np:     # only the batch goes to the device
            frames, index = frames[frame_index(index, len(frames))], None
        return self._counted(self._ready().count(self.xp.asarray(frames), index), frame_number, position, mask)

    def count_sectors(self, fds, at, version, frames, frame_number, position, mask) -> CountedFrames | None:
        """Count n frames read from raw files as the counter reads them (where
        :attr:`reads_sectors`; the arguments as
        :meth:`fourdstream.compiled.CompiledCounter.count_sectors`'s, then each frame's
        number, position and sector mask); None when a sector could not be read whole."""
        counted = self._ready().count_sectors(fds, at, version, frames)
        return None if counted is None else self._counted(counted, frame_number, position, mask)

    def _ready(self) -> ElectronCounter:
        if self.calibration is None:
            raise RuntimeError("thresholds are not known yet: calibrate() first")
        if self._counter is None:
            self._counter = self._make_counter(self.calibration.thresholds)
        return self._counter

    @staticmethod
    def _counted(counted, frame_number, position, mask) -> CountedFrames:
        events, offsets = counted
        return CountedFrames(backend.to_numpy(events), backend.to_numpy(offsets),
                             np.asarray(frame_number, np.uint32), np.asarray(position, np.int64),
                             np.asarray(mask, np.uint8))
