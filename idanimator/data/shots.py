"""Cutting a video into shots, and shots into the clips a training set keeps.

The cut detector compares colour histograms of consecutive frames, on thumbnails (64x64; decoding at that
size costs little beyond the decode itself). Each frame gets a joint RGB histogram of 8x8x8 bins, and the
distance between two frames is half the L1 distance of their normalised histograms: 0 for the same colours,
1 for no colour in common. A hard cut (a new scene, a new camera) moves most of the mass, a moving face or
camera only a little, so a cut is declared where the distance exceeds ``threshold`` (0.5 by default; a
gradual fade is not detected). Cuts closer than ``min_gap`` frames to the previous one (flashes, glitches)
are ignored. Histograms ignore where colours are, which makes the measure robust to motion; the price is
that a cut between two scenes of the same colours is missed, which for a face data set is the lesser evil.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

THUMB_SIZE = 64  # thumbnails the detector looks at (pixels, square)
BINS = 8  # per channel: 8x8x8 = 512 joint bins
CUT_THRESHOLD = 0.5
MIN_GAP = 4  # frames: two cuts closer than this are one glitch, not two shots
MIN_CLIP_FRAMES = 16  # AnimateDiff trains on 16-frame windows; a shorter shot cannot give one


@dataclass(frozen=True)
class Clip:
    """Frames ``start`` (inclusive) to ``end`` (exclusive) of a video, all in one shot."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def colour_histogram(thumbnail: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> a joint RGB histogram of BINS**3 bins that sums to 1."""
    quantised = (thumbnail.astype(np.int64) * BINS) // 256
    index = (quantised[..., 0] * BINS + quantised[..., 1]) * BINS + quantised[..., 2]
    return np.bincount(index.ravel(), minlength=BINS**3) / index.size


def frame_distances(thumbnails: Iterable[np.ndarray]) -> np.ndarray:
    """Distance in [0, 1] between each frame and the next (``frames - 1`` values), computed as the frames
    stream past, so a long video never has to be held in memory."""
    distances, previous = [], None
    for thumbnail in thumbnails:
        current = colour_histogram(thumbnail)
        if previous is not None:
            distances.append(0.5 * float(np.abs(current - previous).sum()))
        previous = current
    return np.asarray(distances, dtype=np.float64)


def find_cuts(distances: np.ndarray, threshold: float = CUT_THRESHOLD, min_gap: int = MIN_GAP) -> list[int]:
    """The frames that start a new shot (never 0), in order, from :func:`frame_distances`."""
    cuts: list[int] = []
    for index, distance in enumerate(distances, start=1):
        if distance > threshold and index - (cuts[-1] if cuts else 0) >= min_gap:
            cuts.append(index)
    return cuts


def split_into_clips(total: int, cuts: list[int], min_frames: int = MIN_CLIP_FRAMES) -> list[Clip]:
    """The shots of a ``total``-frame video cut at ``cuts``, keeping those of at least ``min_frames`` frames."""
    bounds = [0, *(c for c in cuts if 0 < c < total), total]
    return [Clip(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b - a >= min_frames]
