"""Decoding only what the data set needs: thumbnails of every frame, then chosen frames at full size.

Both go through the ffmpeg that imageio-ffmpeg bundles, with ``-fps_mode passthrough`` so that frame ``n`` is
the n-th decoded frame of the file (ffmpeg neither drops nor repeats frames to reach a constant rate): the
indices in the manifest are those, and :func:`read_frames` reads them back the same way for the trainer.
Failures are :class:`~idanimator.eval.reader.UnreadableVideoError` with one sentence (the evaluation's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..eval.reader import UnreadableVideoError

_PASSTHROUGH = ["-fps_mode", "passthrough"]
_MAX_SELECTED = 1000  # frames picked by ffmpeg's select filter in one read
_DEFAULT_FPS = 25.0  # when the file does not say (rare: raw streams)


def _open(path: Path, output_params: list[str]):
    import imageio_ffmpeg

    if not path.is_file():
        raise UnreadableVideoError(f"The video {path.name} does not exist.")
    logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)  # its note that a scaled size differs
    reader = imageio_ffmpeg.read_frames(str(path), output_params=output_params)
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration, ValueError, IndexError, KeyError) as exc:
        reader.close()
        raise _corrupt(path) from exc
    return reader, meta


def _corrupt(path: Path) -> UnreadableVideoError:
    return UnreadableVideoError(f"The file {path.name} could not be read as a video (corrupt or truncated).")


def read_thumbnails(path: str | os.PathLike[str], size: int) -> tuple[float, Iterator[np.ndarray]]:
    """The video's frame rate, and its frames shrunk to ``size`` x ``size`` (aspect not kept) one at a time.

    The file is opened (and a non-video refused) at once; the frames are decoded as they are taken.
    """
    path = Path(path)
    reader, meta = _open(path, ["-vf", f"scale={size}:{size}:flags=area", *_PASSTHROUGH])
    fps = float(meta.get("fps") or 0.0)

    def frames() -> Iterator[np.ndarray]:
        try:
            for raw in reader:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(size, size, 3)
        except (OSError, RuntimeError, ValueError) as exc:
            raise _corrupt(path) from exc
        finally:
            reader.close()

    return (fps if fps > 0 else _DEFAULT_FPS), frames()


def read_frames(path: str | os.PathLike[str], indices: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, frame)`` for the wanted frame indices, in increasing order, at full size (RGB uint8).

    Only the wanted frames are converted and sent through the pipe (ffmpeg's ``select`` filter), and reading
    stops after the last one. A frame past the end of the file raises UnreadableVideoError.
    """
    path = Path(path)
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        return
    if wanted[0] < 0:
        raise ValueError(f"Frame indices start at 0, not {wanted[0]}.")
    select = len(wanted) <= _MAX_SELECTED  # else the filter's expression grows too long: decode all, pick here
    chosen = "+".join(f"eq(n\\,{i})" for i in wanted)
    reader, meta = _open(path, (["-vf", f"select='{chosen}'"] if select else []) + _PASSTHROUGH)
    width, height = meta["size"]
    got = 0
    try:
        for number, raw in enumerate(reader):
            if not select and number != wanted[got]:
                continue
            yield wanted[got], np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
            got += 1
            if got == len(wanted):
                break
    except (OSError, RuntimeError, ValueError) as exc:
        raise _corrupt(path) from exc
    finally:
        reader.close()
    if got < len(wanted):
        raise UnreadableVideoError(
            f"The video {path.name} ended before frame {wanted[got]} (it is shorter than it seemed, or damaged)."
        )
