"""Reading a video back for measuring it, and choosing which frames a metric looks at.

The product's :mod:`idanimator.video` writes videos; this only reads them, through the ffmpeg that
imageio-ffmpeg bundles (no system ffmpeg and no OpenCV video back end are needed). Every failure is an
:class:`UnreadableVideoError` with one sentence, so the evaluation can report it for that video and go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IDAnimatorError

NUM_SAMPLED_FRAMES = 16  # ConsisID's protocol: every face and CLIP-text metric looks at 16 frames


class UnreadableVideoError(IDAnimatorError):
    """A video file is missing, corrupt, or has no frames."""


@dataclass
class Video:
    frames: np.ndarray  # (frames, height, width, 3) uint8 RGB
    fps: float

    def __len__(self) -> int:
        return len(self.frames)


def read_video(path: str | os.PathLike[str]) -> Video:
    """Decode every frame of a video file (MP4, WebM, GIF, ...) to RGB."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise UnreadableVideoError(f"The video {path.name} does not exist.")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    except (OSError, RuntimeError, StopIteration, ValueError, IndexError, KeyError) as exc:
        raise UnreadableVideoError(
            f"The file {path.name} could not be read as a video (corrupt or truncated)."
        ) from exc
    finally:
        reader.close()
    if not frames:
        raise UnreadableVideoError(f"The video {path.name} has no frames.")
    fps = float(meta.get("fps") or 0.0)
    return Video(frames=np.stack(frames), fps=fps if fps > 0 else 8.0)


def evenly_spaced(total: int, count: int = NUM_SAMPLED_FRAMES) -> list[int]:
    """``count`` indices from the first frame to the last, rounded down (ConsisID's face-similarity sampling:
    ``linspace(0, total - 1, count)``). A video shorter than ``count`` repeats frames, as there."""
    return [int(i) for i in np.linspace(0, total - 1, count)]


def strided(total: int, count: int = NUM_SAMPLED_FRAMES) -> list[int]:
    """``floor(i * total / count)`` for i < count (ConsisID's CLIPScore sampling; the last frame may be left
    out). Equal to :func:`evenly_spaced` for a 16-frame video."""
    return [i * total // count for i in range(count)]
