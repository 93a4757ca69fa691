"""A realistic, deterministic simulator of the NCEM 4D Camera.

Each frame is ``dark + read noise + electrons + rare x-rays``, rounded and clipped
to uint16:

* **dark**: a pedestal plus a per-sector offset plus per-pixel fixed-pattern noise
  (the same in every frame of a simulator);
* **read noise**: Gaussian, drawn per frame as a random window into a pre-computed
  pool of noise samples (so generation runs at thousands of frames/s per core);
* **electrons**: a Poisson number per frame (``dose`` electrons/frame on average,
  times a sample transmission that varies over the scan so a bright-field image
  shows structure), each landing uniformly in the illuminated area (whole
  detector, or a bright-field disc), depositing a Gamma-distributed charge spread
  by a Gaussian charge cloud over the 3x3 pixels around its impact;
* **x-rays**: with a small probability per frame, one pixel gets a very large
  value (the counting x-ray threshold exists to reject these).

Frame ``k`` is generated from its own random stream ``default_rng([seed, k])``,
so it is the same whatever the batching or the process that makes it. The
simulator returns the **ground truth**: the impact pixel of every electron.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .detector import FRAME_COLS, FRAME_PIXELS, FRAME_ROWS, FRAME_SHAPE, N_SECTORS, ScanGeometry, sector_slice

_NOISE_POOL_FRAMES = 8
_KERNEL = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)])  # 3x3 offsets


@dataclasses.dataclass(frozen=True)
class DetectorModel:
    """Physical parameters of the simulated detector (ADU = detector counts).

    Defaults give NCEM-like calibration results (background threshold ~30 ADU,
    x-ray threshold a few hundred ADU with NCEM's production settings).
    """

    pedestal: float = 12.0             #: mean dark level (ADU)
    sector_offsets: tuple = (0.0, 3.0, 5.0, 2.0)  #: extra dark per sector (ADU)
    fixed_pattern_sigma: float = 1.0   #: per-pixel dark spread (ADU)
    read_noise_sigma: float = 2.5      #: Gaussian read noise (ADU)
    electron_charge: float = 140.0     #: mean charge of one electron (ADU)
    charge_shape: float = 4.0          #: Gamma shape of the charge distribution
    cloud_sigma: float = 0.5           #: charge-cloud Gaussian width (pixels)
    xray_probability: float = 0.05     #: chance of an x-ray hit per frame
    xray_range: tuple = (2000.0, 8000.0)  #: x-ray pixel value range (ADU)


@dataclasses.dataclass
class GroundTruth:
    """Electron impacts of a batch of frames, CSR style.

    ``pixels[offsets[i]:offsets[i + 1]]`` are the flat impact pixels
    (``row * 576 + col``) of frame ``i`` of the batch.
    """

    offsets: np.ndarray  # (n + 1,) int64
    pixels: np.ndarray   # (total,) uint32

    def frame(self, i: int) -> np.ndarray:
        return self.pixels[self.offsets[i]:self.offsets[i + 1]]


class Simulator:
    """Generates the frames of one scan.

    Parameters
    ----------
    geometry : ScanGeometry
        Scan to simulate; frame ``k`` is at position ``k // frames_per_position``.
    dose : float
        Mean number of electrons per frame (NCEM-typical: ~150, i.e. 0.5 e-/1000 px).
    seed : int
        Seed of everything random; same seed, same frames.
    pattern : {"uniform", "disc"}
        Illumination: whole detector, or a bright-field disc of ``disc_radius`` px.
    model : DetectorModel
    """

    def __init__(self, geometry: ScanGeometry, dose: float = 150.0, seed: int = 0, *,
                 pattern: str = "uniform", disc_radius: float = 120.0,
                 model: DetectorModel = DetectorModel()):
        if dose < 0:
            raise ValueError(f"dose must be >= 0 electrons/frame, got {dose}")
        if pattern not in ("uniform", "disc"):
            raise ValueError(f"pattern must be 'uniform' or 'disc', got {pattern!r}")
        self.geometry, self.dose, self.seed = geometry, float(dose), int(seed)
        self.pattern, self.disc_radius, self.model = pattern, float(disc_radius), model
        rng = np.random.default_rng([self.seed, 2**32])  # streams >= 2**32 are not frames
        dark = np.full(FRAME_SHAPE, model.pedestal)
        for m in range(N_SECTORS):
            dark[sector_slice(m)] += model.sector_offsets[m]
        dark += rng.normal(0.0, model.fixed_pattern_sigma, FRAME_SHAPE)
        self.dark = dark.astype(np.float32)  #: true mean dark (ADU), (576, 576) float32
        self._dark_i16 = np.rint(np.maximum(dark, 0)).astype(np.int16).ravel()
        pool = np.rint(rng.normal(0.0, model.read_noise_sigma, _NOISE_POOL_FRAMES * FRAME_PIXELS))
        # Floor the noise so that dark + noise never goes below 0 ADU (a far-tail
        # clip at default settings; it spares a clipping pass over every frame).
        self._noise = np.maximum(pool, -self._dark_i16.min()).astype(np.int16)
        self._transmission = self._sample_transmission(rng)

    def _sample_transmission(self, rng) -> np.ndarray:
        """Transmission (0.5..1) per scan position: a few round 'particles'."""
        h, w = self.geometry.height, self.geometry.width
        yy, xx = np.mgrid[0:h, 0:w]
        t = np.ones((h, w))
        for _ in range(6):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.05, 0.2) * max(h, w)
            t[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.5
        return t.ravel()

    @property
    def n_frames(self) -> int:
        return self.geometry.n_frames

    def position_of(self, k: np.ndarray) -> np.ndarray:
        """Scan position of frame indices ``k``."""
        return np.asarray(k, dtype=np.int64) // self.geometry.frames_per_position

    def frames(self, start: int, stop: int, out: np.ndarray | None = None):
        """Frames ``start .. stop - 1`` of the scan.

        Returns
        -------
        frames : ndarray, (stop - start, 576, 576) uint16
        truth : GroundTruth
        """
        n = stop - start
        if not 0 <= start <= stop <= self.n_frames:
            raise ValueError(f"frames {start}..{stop} outside the scan's {self.n_frames} frames")
        if out is None:
            out = np.empty((n,) + FRAME_SHAPE, dtype=np.uint16)
        flat = out.reshape(n, FRAME_PIXELS)
        impacts, offsets = [], [0]
        for i, k in enumerate(range(start, stop)):
            pixels = self._frame(k, flat[i])
            impacts.append(pixels)
            offsets.append(offsets[-1] + len(pixels))
        pixels = np.concatenate(impacts) if impacts else np.zeros(0, np.uint32)
        return out, GroundTruth(np.asarray(offsets, dtype=np.int64), pixels.astype(np.uint32))

    def _frame(self, k: int, out: np.ndarray) -> np.ndarray:
        """Write frame ``k`` into ``out`` (flat, uint16); return its impact pixels."""
        m = self.model
        rng = np.random.default_rng([self.seed, k])
        start = rng.integers(0, len(self._noise) - FRAME_PIXELS)
        np.add(self._dark_i16, self._noise[start:start + FRAME_PIXELS], out=out, casting="unsafe")
        lam = self.dose * self._transmission[self.position_of(k)]
        n_e = rng.poisson(lam)
        row, col = self._impacts(rng, n_e)
        ir, ic = np.floor(row).astype(np.int64), np.floor(col).astype(np.int64)
        charge = rng.gamma(m.charge_shape, m.electron_charge / m.charge_shape, n_e)
        # Charge cloud sampled at the centres of the 3x3 pixels around the impact.
        dr = _KERNEL[:, 0] + 0.5 - (row - ir)[:, None]
        dc = _KERNEL[:, 1] + 0.5 - (col - ic)[:, None]
        w = np.exp(-(dr * dr + dc * dc) / (2 * m.cloud_sigma ** 2))
        w /= w.sum(axis=1, keepdims=True)
        r, c = ir[:, None] + _KERNEL[:, 0], ic[:, None] + _KERNEL[:, 1]
        inside = (r >= 0) & (r < FRAME_ROWS) & (c >= 0) & (c < FRAME_COLS)
        idx = (r * FRAME_COLS + c)[inside]
        value = (charge[:, None] * w)[inside]
        if rng.random() < m.xray_probability:
            idx = np.append(idx, rng.integers(0, FRAME_PIXELS))
            value = np.append(value, rng.uniform(*m.xray_range))
        if len(idx):
            uniq, inverse = np.unique(idx, return_inverse=True)
            total = out[uniq] + np.rint(np.bincount(inverse, weights=value))
            out[uniq] = np.minimum(total, 0xFFFF)
        return np.sort(ir * FRAME_COLS + ic).astype(np.uint32)

    def _impacts(self, rng, n: int):
        """Continuous impact coordinates (row, col) of ``n`` electrons, in pixels."""
        if self.pattern == "uniform":
            return rng.uniform(0, FRAME_ROWS, n), rng.uniform(0, FRAME_COLS, n)
        radius = self.disc_radius * np.sqrt(rng.uniform(0, 1, n))
        angle = rng.uniform(0, 2 * np.pi, n)
        row = np.clip(FRAME_ROWS / 2 + radius * np.sin(angle), 0, FRAME_ROWS - 1e-6)
        col = np.clip(FRAME_COLS / 2 + radius * np.cos(angle), 0, FRAME_COLS - 1e-6)
        return row, col

    def frame_numbers(self, start: int, stop: int, first: int = 1) -> np.ndarray:
        """Detector frame counter of frames ``start .. stop - 1`` (starts at ``first``)."""
        return np.arange(start + first, stop + first, dtype=np.uint32)


def write_scan(sim: Simulator, outdir, scan_number: int = 1, *, batch_size: int = 64,
               n_dst: int = 2, frames_per_file: int = 1024, overwrite: bool = False,
               progress=None):
    """Simulate every frame of ``sim`` and write it as raw v5 sector files.

    Returns the list of files written. ``progress(n_done)`` is called per batch.
    """
    from .rawfile import RawScanWriter

    with RawScanWriter(outdir, scan_number, sim.geometry, n_dst=n_dst,
                       frames_per_file=frames_per_file, overwrite=overwrite) as writer:
        buf = np.empty((batch_size,) + FRAME_SHAPE, dtype=np.uint16)
        for start in range(0, sim.n_frames, batch_size):
            stop = min(start + batch_size, sim.n_frames)
            frames, _ = sim.frames(start, stop, out=buf[:stop - start])
            k = np.arange(start, stop)
            writer.write(frames, sim.frame_numbers(start, stop), sim.position_of(k))
            if progress is not None:
                progress(stop - start)
    return writer.paths
