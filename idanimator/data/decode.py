"""Decoding only what the data set needs: thumbnails of every frame, then chosen frames at full size.

Both go through :mod:`idanimator.video`, the package's one reader: frame ``n`` is the n-th decoded frame of
the file (ffmpeg neither drops nor repeats frames to reach a constant rate), so the indices in the manifest are
those, and the trainer reads them back the same way. Failures are
:class:`~idanimator.errors.UnreadableVideoError` with one sentence (a video too large to read is one too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import UnreadableVideoError  # noqa: F401  (what every failure here is)
from ..video import open_video

_DEFAULT_FPS = 25.0  # when the file does not say (rare: raw streams)


def read_thumbnails(path: str | os.PathLike[str], size: int) -> tuple[float, Iterator[np.ndarray]]:
    """The video's frame rate, and its frames shrunk to ``size`` x ``size`` (aspect not kept) one at a time.

    The file is opened (and a non-video refused) at once; the frames are decoded as they are taken.
    """
    info, frames = open_video(path, size=(size, size))
    return (info.fps if info.fps > 0 else _DEFAULT_FPS), (frame for _, frame in frames)


def read_frames(path: str | os.PathLike[str], indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, frame)`` for the wanted frame indices, in increasing order, at full size (RGB uint8).

    Only the wanted frames are converted and sent through the pipe, and reading stops after the last one. A
    frame past the end of the file raises UnreadableVideoError.
    """
    yield from open_video(path, indices)[1]
