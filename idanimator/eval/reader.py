"""Reading a video back for measuring it, and choosing which frames a metric looks at.

Videos are read by the package's one reader (:mod:`idanimator.video`): every frame at full size, within
``settings.MAX_DECODED_PIXELS``. Every failure is an :class:`~idanimator.errors.UnreadableVideoError` with one
sentence, so the evaluation can report it for that video and go on.
"""

from __future__ import annotations

import os

import numpy as np

from .. import video
from ..video import Video

NUM_SAMPLED_FRAMES = 16  # ConsisID's protocol: every face and CLIP-text metric looks at 16 frames


def read_video(path: str | os.PathLike[str]) -> Video:
    """Decode every frame of a video file (MP4, WebM, GIF, ...) to RGB; 8 fps when the file does not say."""
    decoded = video.read_video(path)
    return Video(frames=decoded.frames, fps=decoded.fps if decoded.fps > 0 else 8.0)


def evenly_spaced(total: int, count: int = NUM_SAMPLED_FRAMES) -> list[int]:
    """``count`` indices from the first frame to the last, rounded down (ConsisID's face-similarity sampling:
    ``linspace(0, total - 1, count)``). A video shorter than ``count`` repeats frames, as there."""
    return [int(i) for i in np.linspace(0, total - 1, count)]


def strided(total: int, count: int = NUM_SAMPLED_FRAMES) -> list[int]:
    """``floor(i * total / count)`` for i < count (ConsisID's CLIPScore sampling; the last frame may be left
    out). Equal to :func:`evenly_spaced` for a 16-frame video."""
    return [i * total // count for i in range(count)]
