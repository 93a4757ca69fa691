"""Counted frames in compressed-sparse-row form, the unit every stage hands on."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class CountedFrames:
    """Electron events of ``n`` frames, CSR style.

    Attributes
    ----------
    events : (total,) uint32
        Flat pixel indices ``row * 576 + col``; frame ``i`` owns
        ``events[offsets[i]:offsets[i + 1]]``, ascending.
    offsets : (n + 1,) int64
    frame_number : (n,) uint32
        Detector frame counter of each frame.
    position : (n,) int64
        Scan position index ``y * width + x``.
    mask : (n,) uint8
        Sector-presence mask (bit m set when sector m arrived).
    """

    events: np.ndarray
    offsets: np.ndarray
    frame_number: np.ndarray
    position: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_number)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    def frame(self, i: int) -> np.ndarray:
        """Events of frame ``i``."""
        return self.events[self.offsets[i]:self.offsets[i + 1]]

    def counts(self) -> np.ndarray:
        """Events per frame, (n,) int64."""
        return np.diff(self.offsets)

    @classmethod
    def empty(cls) -> "CountedFrames":
        return cls(np.zeros(0, np.uint32), np.zeros(1, np.int64), np.zeros(0, np.uint32),
                   np.zeros(0, np.int64), np.zeros(0, np.uint8))

    @classmethod
    def concatenate(cls, parts) -> "CountedFrames":
        """Join parts in the order given."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        counts = np.concatenate([p.counts() for p in parts])
        return cls(np.concatenate([p.events for p in parts]),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.concatenate([p.frame_number for p in parts]),
                   np.concatenate([p.position for p in parts]),
                   np.concatenate([p.mask for p in parts]))

    def take(self, index) -> "CountedFrames":
        """Frames ``index`` (an integer array), in that order."""
        from .compiled import gather_runs   # numba: imported only where frames are moved

        index = np.asarray(index, dtype=np.int64)
        counts = self.counts()[index]
        events = gather_runs(self.events, self.offsets[index], counts)
        return CountedFrames(events, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                             self.frame_number[index], self.position[index], self.mask[index])

    def sorted(self) -> "CountedFrames":
        """Frames ordered by position, then frame number (the file order)."""
        return self.take(np.lexsort((self.frame_number, self.position)))
