"""Per-scan threshold calibration, the reference way but deterministic and MPI-ready.

The reference (stempy) method:

* draw ``number_of_samples`` frames, with replacement, from the first
  ``threshold_num_blocks`` complete frames, and pool their corrected pixel values;
* ``xr = mean + n_sigma_xray * std`` (plain sample statistics, n - 1 variance);
* histogram the pooled values in integer-wide bins (bin ``i`` holds values in
  ``[min + i, min + i + 1)``, abscissa ``min + i``), fit ``A exp(-(x-mu)^2/(2 s^2))``
  by Levenberg-Marquardt starting from (peak count, mean, std), and set
  ``bg = mu + n_sigma_bg * |s|``.

Differences from stempy, on purpose: the draw is seeded (stempy seeds from the OS,
so its thresholds change from run to run); samples are corrected exactly like the
counted values (stempy's gain path applies the gain before the dark); and the
pooled statistics are built from per-frame partial results (sums, squared
deviations, integer histograms) exchanged between MPI ranks, combined in frame
order, so that 1, 2 or N ranks holding different sample frames get bit-identical
thresholds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .counting import Thresholds

#: NCEM production settings.
DEFAULT_SAMPLES = 1200
DEFAULT_SAMPLE_FRAMES = 20
DEFAULT_BACKGROUND_SIGMA = 4.0
DEFAULT_XRAY_SIGMA = 175.0
#: The background fit stops when no parameter moves by more than this fraction, or after
#: this many steps (a well-posed histogram converges in under 20).
_FIT_TOLERANCE = 1e-10
_FIT_ITERATIONS = 200


class CalibrationError(RuntimeError):
    """Thresholds could not be computed from the sample frames."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Thresholds and every statistic they came from.

    Field names follow stempy's ``metadata/electron_counting`` attributes, plus
    fourdstream's provenance (``seed``, ``sample_frame_numbers``, ``sample_weights``).
    """

    background_threshold: float
    x_ray_threshold: float
    number_of_samples: int
    min_sample: float
    max_sample: float
    mean: float
    variance: float
    std_dev: float
    number_of_bins: int
    x_ray_threshold_n_sigma: float
    background_threshold_n_sigma: float
    optimized_mean: float
    optimized_std_dev: float
    seed: int
    sample_frame_numbers: tuple
    sample_weights: tuple
    threshold_calculated: bool = True

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.background_threshold, self.x_ray_threshold)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_samples(frame_numbers, complete, *, number_of_samples: int = DEFAULT_SAMPLES,
                 sample_frames: int = DEFAULT_SAMPLE_FRAMES, seed: int = 0):
    """Which frames to sample and how often.

    Parameters
    ----------
    frame_numbers : (n,) frame numbers of the scan (any order)
    complete : (n,) bool, frames with all sectors
    number_of_samples : frames drawn (with replacement)
    sample_frames : draw from this many first (lowest frame number) complete frames
    seed : seed of the draw

    Returns
    -------
    chosen : (k,) frame numbers, ascending; weights : (k,) int64 draws of each (> 0)
    """
    fn = np.asarray(frame_numbers)[np.asarray(complete, bool)]
    pool = np.sort(fn)[:sample_frames]
    if len(pool) == 0:
        raise CalibrationError("no complete frame to calibrate thresholds from; give fixed "
                               "thresholds (--background-threshold/--xray-threshold)")
    draws = np.random.default_rng(seed).integers(0, len(pool), number_of_samples)
    weights = np.bincount(draws, minlength=len(pool))
    used = weights > 0
    return pool[used], weights[used].astype(np.int64)


def _allgather(comm, items):
    return [x for part in comm.allgather(items) for x in part] if comm is not None else list(items)


def calibrate(samples, *, number_of_samples: int, seed: int,
              background_sigma: float = DEFAULT_BACKGROUND_SIGMA,
              xray_sigma: float = DEFAULT_XRAY_SIGMA, comm=None) -> Calibration:
    """Compute thresholds from sample frames, jointly across MPI ranks.

    Parameters
    ----------
    samples : list of (frame_number, weight, values)
        This rank's share of the planned sample frames (see :func:`plan_samples`):
        the corrected values (any shape, e.g. (576, 576), from
        :meth:`ElectronCounter.values`) of each frame and how often it was drawn.
        Every planned frame must be held by exactly one rank.
    comm : mpi4py communicator, optional
        All ranks of ``comm`` must call this together.
    """
    # Pass 1: counts, sums, extrema, combined in frame-number order on every rank.
    first = _allgather(comm, [(int(fn), int(w), v.size, float(v.sum(dtype=np.float64)),
                                float(v.min()), float(v.max())) for fn, w, v in samples])
    first.sort()
    if not first:
        raise CalibrationError("no sample frames were given to calibrate from")
    n_total = sum(w * size for _, w, size, *_ in first)
    mean = sum(w * s for _, w, _, s, _, _ in first) / n_total
    min_sample = min(lo for *_, lo, _ in first)
    max_sample = float(np.ceil(max(hi for *_, hi in first)))
    # Pass 2: squared deviations and the integer-bin histogram.
    second = _allgather(comm, [(int(fn), float(((v.astype(np.float64) - mean) ** 2).sum()))
                               for fn, _, v in samples])
    second.sort()
    weights = {fn: w for fn, w, *_ in first}
    variance = sum(weights[fn] * m2 for fn, m2 in second) / (n_total - 1)
    std = float(np.sqrt(variance))
    xr = mean + xray_sigma * std
    min_bin, max_bin = int(np.floor(min_sample)), int(max_sample)
    n_bins = max_bin - min_bin
    hist = np.zeros(max(n_bins, 0), dtype=np.int64)
    for _, w, v in samples:
        b = np.floor(v.ravel()).astype(np.int64) - min_bin
        hist += w * np.bincount(b[b < n_bins], minlength=n_bins)[:n_bins]
    if comm is not None:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, hist, op=MPI.SUM)
    frames = ", ".join(str(fn) for fn, *_ in first[:5]) + (" ..." if len(first) > 5 else "")
    if n_bins < 3 or std == 0:
        raise CalibrationError(f"sample frames {frames} hold almost constant values "
                               f"(min {min_sample}, max {max_sample}); cannot fit a background "
                               f"peak, give fixed thresholds")
    mu, sigma = _fit_gaussian(np.arange(min_bin, max_bin, dtype=np.float64),
                              hist.astype(np.float64), mean, std, frames)
    return Calibration(
        background_threshold=mu + background_sigma * sigma, x_ray_threshold=xr,
        number_of_samples=int(sum(weights.values())), min_sample=min_sample,
        max_sample=max_sample, mean=mean, variance=variance, std_dev=std,
        number_of_bins=n_bins, x_ray_threshold_n_sigma=float(xray_sigma),
        background_threshold_n_sigma=float(background_sigma), optimized_mean=mu,
        optimized_std_dev=sigma, seed=int(seed),
        sample_frame_numbers=tuple(fn for fn, *_ in first),
        sample_weights=tuple(w for _, w, *_ in first))


def _fit_gaussian(x, counts, mean, std, frames_label):
    """Levenberg-Marquardt fit of a Gaussian to a histogram; returns (mu, |sigma|).

    Least squares of ``A exp(-(x - mu)^2 / (2 s^2)) - counts`` from (peak count,
    mean, std), as stempy's ``curve_fit`` does, written out for three parameters
    (numpy only: importing scipy.optimize costs 0.3 s, more than the calibration).
    """
    def residual(p):
        a, mu, s = p
        return a * np.exp(-0.5 * ((x - mu) / s) ** 2) - counts

    def jacobian(p):
        a, mu, s = p
        d = x - mu
        e = np.exp(-0.5 * (d / s) ** 2)
        return np.stack([e, a * e * d / s**2, a * e * d * d / s**3], axis=1)

    p = np.array([counts.max(), mean, std], dtype=np.float64)
    damping, converged = 1e-3, False
    with np.errstate(all="ignore"):
        r = residual(p)
        cost = r @ r
        for _ in range(_FIT_ITERATIONS):
            j = jacobian(p)
            jtj, jtr = j.T @ j, j.T @ r
            while damping < 1e16:            # Marquardt: raise the damping until a step helps
                step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj)), -jtr) \
                    if np.all(np.isfinite(jtj)) else np.full(3, np.nan)
                trial = p + step
                r_trial = residual(trial)
                cost_trial = r_trial @ r_trial
                if np.isfinite(cost_trial) and cost_trial <= cost:
                    break
                damping *= 10
            else:
                converged = bool(np.all(np.isfinite(jtj)))   # no step lowers the cost: a minimum
                break
            change = np.abs(step) <= _FIT_TOLERANCE * (np.abs(p) + _FIT_TOLERANCE)
            p, r, cost, damping = trial, r_trial, cost_trial, max(damping / 10, 1e-12)
            if change.all():
                converged = True
                break
    a, mu, s = p
    if not converged or not np.all(np.isfinite(p)) or s == 0 or not x[0] <= mu <= x[-1]:
        raise CalibrationError(
            f"the Gaussian fit of the background peak did not converge for sample frames "
            f"{frames_label} (result mu={mu:.4g}, sigma={s:.4g}); check the dark reference and "
            f"the data, or give fixed thresholds")
    return float(mu), float(abs(s))
