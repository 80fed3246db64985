"""Random-reference sampling: which faces a training clip is conditioned on.

The paper's "random reference training": the reference is drawn at random from the clip's own face pool
(faces cropped from frames of the same clip, hence the same person), so the adapter cannot learn to copy
the pose, expression and lighting of the frames it denoises. Never another clip's face (it could be
another identity), and never the face of a frame being denoised while the pool has others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PoolFace:
    """One face of a clip's pool: an aligned crop (as inference crops a photo) and the frame it came from."""

    path: Path
    frame: int  # the source video's frame index


def reference_candidates(pool: Sequence[PoolFace], window: Sequence[int]) -> list[int]:
    """Indices into ``pool`` a reference may be drawn from, for a clip whose denoised frames are ``window``.

    Preferred: faces from outside the window's span (not even a neighbour of a denoised frame); else faces
    from frames between the denoised ones; only when every face of the pool is a denoised frame's, all.
    """
    if not pool:
        raise ValueError("A clip with an empty face pool cannot be trained on.")
    first, last, denoised = min(window), max(window), set(window)
    outside = [i for i, face in enumerate(pool) if not first <= face.frame <= last]
    between = [i for i, face in enumerate(pool) if face.frame not in denoised]
    return outside or between or list(range(len(pool)))


def draw_references(pool: Sequence[PoolFace], window: Sequence[int], count: int, rng: np.random.Generator) -> list[int]:
    """``count`` pool indices drawn at random among :func:`reference_candidates` (distinct when the
    candidates are enough, else repeated: a batch needs the same number of references for every clip)."""
    candidates = reference_candidates(pool, window)
    picks = rng.choice(len(candidates), size=count, replace=len(candidates) < count)
    return [candidates[int(i)] for i in picks]
