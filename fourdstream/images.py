"""Per-scan images from counted events: what a user looks at first.

For every scan position: the events counted (``counts``), the events inside a
virtual bright-field disc (``bf``) and a virtual annular dark-field ring (``adf``),
the centre of mass of the events relative to the pattern centre (``com_x``,
``com_y``, pixels), and the AND of the frames' sector masks (``sector_mask``, 0 for
a position with no frame: the loss map); and the summed diffraction pattern
(``pattern``, 576 x 576). Images have the scan's shape (height, width).

Virtual detectors follow stempy's ``create_stem_images``: an event at pixel
(x, y) is inside radii (inner, outer) around the centre (cx, cy) when
``inner**2 <= (x - cx)**2 + (y - cy)**2 < outer**2``, all in whole pixels (stempy's
images of counted data are these numbers times 65535). Unless given, the detectors
are found from the scan's summed pattern (:meth:`Detectors.find`).

The images are computed where the events are, on each rank for its slab of
positions after the writer's redistribution, reduced once and exactly, and stored
under ``/fourdstream/images`` (the detectors in its attributes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .detector import FRAME_COLS, FRAME_PIXELS, FRAME_ROWS, FRAME_SHAPE

GROUP = "fourdstream/images"
NAMES = ("counts", "bf", "adf", "com_x", "com_y", "sector_mask")
BLOCK = 8   #: pixels per side of the blocks in which Detectors.find reads a pattern


@dataclasses.dataclass(frozen=True)
class Detectors:
    """Virtual detectors, whole pixels: centre (x, y), BF disc radius, ADF ring radii."""
    centre_x: int = FRAME_COLS // 2
    centre_y: int = FRAME_ROWS // 2
    bf_radius: int = 40
    adf_inner: int = 60
    adf_outer: int = 140

    @classmethod
    def find(cls, pattern: np.ndarray) -> "Detectors":
        """From a summed pattern, in 8 x 8-pixel blocks (a pattern of a few counts per
        pixel is mostly noise): the bright disc is the blocks at or above half the
        brightest; its weighted centroid is the centre, ``ceil(sqrt(area / pi))`` the BF
        radius; the ADF ring spans 1.5 to 3.5 BF radii, cut at the nearest frame edge.
        An empty pattern gives the defaults."""
        b = BLOCK
        coarse = np.asarray(pattern, np.float64).reshape(
            FRAME_ROWS // b, b, FRAME_COLS // b, b).sum(axis=(1, 3))
        if coarse.max() <= 0:
            return cls()
        y, x = np.nonzero(coarse >= 0.5 * coarse.max())
        w = coarse[y, x]
        cx = int(round(float((x * w).sum() / w.sum()) * b + (b - 1) / 2))
        cy = int(round(float((y * w).sum() / w.sum()) * b + (b - 1) / 2))
        r = max(int(np.ceil(np.sqrt(len(x) * b * b / np.pi))), 1)
        edge = min(cx, cy, FRAME_COLS - 1 - cx, FRAME_ROWS - 1 - cy)
        inner = min(int(np.ceil(1.5 * r)), max(edge - 1, r))
        return cls(cx, cy, r, inner, max(min(int(np.ceil(3.5 * r)), edge), inner + 1))

    @property
    def radii(self) -> tuple:
        """(BF inner, BF outer, ADF inner, ADF outer) for :func:`position_sums`."""
        return (0, self.bf_radius, self.adf_inner, self.adf_outer)


def pattern_of(counted) -> np.ndarray:
    """Summed diffraction pattern of ``counted``'s events, (576*576,) int64."""
    from .compiled import add_pattern

    pattern = np.zeros(FRAME_PIXELS, np.int64)
    add_pattern(counted.events, pattern)
    return pattern


def from_sums(sums: np.ndarray, masks: np.ndarray, seen: np.ndarray, detectors: Detectors) -> dict:
    """Flat images from per-position sums (``sums`` (5, n): events, sum of x, sum of y, in
    BF, in ADF; ``masks``: AND of the frames' sector masks; ``seen``: positions with a frame)."""
    counts = sums[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        com_x = np.where(counts > 0, sums[1] / counts - detectors.centre_x, 0.0)
        com_y = np.where(counts > 0, sums[2] / counts - detectors.centre_y, 0.0)
    return {"counts": counts.astype(np.uint32), "bf": sums[3].astype(np.uint32),
            "adf": sums[4].astype(np.uint32), "com_x": com_x.astype(np.float32),
            "com_y": com_y.astype(np.float32), "sector_mask": np.where(seen, masks, 0).astype(np.uint8)}


def slab_images(counted, lo: int, hi: int, detectors: Detectors) -> dict:
    """Images of positions ``lo .. hi-1`` from ``counted`` (frames of those positions only),
    flat arrays of ``hi - lo``."""
    from .compiled import position_sums

    sums, masks = position_sums(counted.events, counted.offsets, counted.position - lo, hi - lo,
                                (detectors.centre_x, detectors.centre_y), detectors.radii, counted.mask)
    seen = np.zeros(hi - lo, bool)
    seen[counted.position - lo] = True
    return from_sums(sums, masks, seen, detectors)


def scan_images(counted, geometry, bounds, comm, detectors: Detectors | None = None,
                pattern: np.ndarray | None = None):
    """Every rank's slab images joined on rank 0 (collective over ``comm``).

    ``counted``: this rank's frames, all of positions ``bounds[rank] .. bounds[rank+1]-1``
    (the writer's slabs); ``pattern``: the summed pattern of the frames this rank counted,
    if kept (else summed from ``counted``: the sum over ranks is the same). Returns ``(images, pattern, detectors)`` on rank 0 (images
    shaped (height, width), pattern (576, 576)), ``(None, None, detectors)`` elsewhere.
    """
    from mpi4py import MPI

    pattern = pattern_of(counted) if pattern is None else np.array(pattern, np.int64)
    comm.Allreduce(MPI.IN_PLACE, pattern, op=MPI.SUM)
    detectors = detectors or Detectors.find(pattern)
    lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    parts = comm.gather(slab_images(counted, lo, hi, detectors), root=0)
    if comm.rank != 0:
        return None, None, detectors
    shape = (geometry.height, geometry.width)
    images = {name: np.concatenate([p[name] for p in parts]).reshape(shape) for name in NAMES}
    return images, pattern.reshape(FRAME_SHAPE), detectors


#: Berkeley EMD v0.2 data sets of the images (what ``ncempy.io.read`` opens), in this
#: order: the first one, which a reader opens by default, is the events per position.
EMD_DATASETS = ("counts", "bf", "adf", "com_x", "com_y", "sector_mask", "pattern")


def write(h5file, images: dict, pattern: np.ndarray, detectors: Detectors) -> None:
    """Store the images (rank 0, an open h5py file) once, under two names:

    * ``/data/<name>``: Berkeley EMD v0.2 groups (``emd_group_type = 1``, ``data`` and
      the dimension vectors ``dim1``, ``dim2`` with names and units), created in the
      order of :data:`EMD_DATASETS`, so that EMD readers (ncempy) open them as they are;
    * ``/fourdstream/images/<name>``: hard links to the same data, with the detectors in
      the group's attributes.
    """
    h5file.attrs.setdefault("version_major", 0)
    h5file.attrs.setdefault("version_minor", 2)
    emd = h5file["data"] if "data" in h5file else h5file.create_group("data", track_order=True)
    ours = h5file.require_group(GROUP)
    scan_dims = (("y", "scan positions"), ("x", "scan positions"))
    for name in EMD_DATASETS:
        data, dims = (pattern, (("ky", "pixels"), ("kx", "pixels"))) if name == "pattern" else \
            (images[name], scan_dims)
        g = emd.create_group(name)
        g.attrs["emd_group_type"] = 1
        g.attrs["title"] = LABELS[name]
        dset = g.create_dataset("data", data=data)
        for axis, (label, units) in enumerate(dims):
            dim = g.create_dataset(f"dim{axis + 1}", data=np.arange(data.shape[axis], dtype=np.float64))
            dim.attrs["name"], dim.attrs["units"] = label, units
        ours[name] = dset           # the same dataset, a second name
    for key, value in dataclasses.asdict(detectors).items():
        ours.attrs[key] = value
    ours.attrs["definition"] = ("virtual detectors as stempy.image.create_stem_images: inner**2 <= "
                                "(x-cx)**2 + (y-cy)**2 < outer**2, pixels; BF inner radius 0")


LABELS = {"counts": "events per position", "bf": "virtual bright field (events)",
          "adf": "virtual annular dark field (events)", "com_x": "centre of mass x - centre (px)",
          "com_y": "centre of mass y - centre (px)", "sector_mask": "sectors present (AND of frames)",
          "pattern": "summed diffraction pattern (events)"}


def read(h5file) -> tuple[dict, Detectors] | None:
    """The images and detectors stored in an open h5py file (None if it has none)."""
    if GROUP not in h5file:
        return None
    g = h5file[GROUP]
    return ({name: g[name][()] for name in (*NAMES, "pattern")},
            Detectors(**{f.name: int(g.attrs[f.name]) for f in dataclasses.fields(Detectors)}))


def of_scan(scan, detectors: Detectors | None = None):
    """``(images, pattern, detectors)`` of a :class:`~fourdstream.io.CountedScan` (for
    files without stored images, e.g. stempy's): the same computation, in this process."""
    from .sparse import CountedFrames

    occupied = scan.sector_mask > 0          # empty slots hold no events: dropping them
    counts = np.diff(scan.offsets.astype(np.int64))[occupied]   # leaves the events as they are
    frames = CountedFrames(np.asarray(scan.events, np.uint32),
                           np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                           scan.frame_number[occupied], scan.position[occupied].astype(np.int64),
                           scan.sector_mask[occupied])
    pattern = pattern_of(frames)
    detectors = detectors or Detectors.find(pattern)
    flat = slab_images(frames, 0, int(np.prod(scan.scan_shape)), detectors)
    return ({k: v.reshape(scan.scan_shape) for k, v in flat.items()},
            pattern.reshape(FRAME_SHAPE), detectors)


def plot(images: dict, pattern: np.ndarray, detectors: Detectors, path, title: str) -> None:
    """One figure: virtual BF, ADF, COM magnitude, summed pattern (log scale, detectors
    drawn) and the loss map; saved as PNG at ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install 'fourdstream[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    d = detectors
    panels = [("virtual BF (r < %d px)" % d.bf_radius, images["bf"], "gray"),
              ("virtual ADF (%d-%d px)" % (d.adf_inner, d.adf_outer), images["adf"], "gray"),
              ("centre of mass |COM| (px)", np.hypot(images["com_x"], images["com_y"]), "viridis"),
              ("summed pattern (log)", np.log1p(pattern), "magma"),
              ("loss map: sectors present", images["sector_mask"], "RdYlGn")]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.4))
    for ax, (name, data, cmap) in zip(axes, panels):
        im = ax.imshow(data, cmap=cmap, interpolation="nearest",
                       **({"vmin": 0, "vmax": 15} if name.startswith("loss") else {}))
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for radius in (d.bf_radius, d.adf_inner, d.adf_outer):
        axes[3].add_patch(Circle((d.centre_x, d.centre_y), radius, fill=False, color="cyan", lw=0.8))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
