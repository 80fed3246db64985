"""Writing generated frames to files people can open: MP4 for browsers, GIF, or a folder of PNGs.

Import these from :mod:`idanimator.video`, which re-exports them beside the one video reader.

Every file goes through ``files.atomic_path``, so a crash, a full disk or a failing encoder never leaves a
half-written video under the name the user asked for. MP4s are encoded by imageio-ffmpeg's bundled ffmpeg
(no system ffmpeg is needed) with the settings browsers require: H.264, yuv420p, even width and height, and
the index (``moov``) at the front so playback can start before the download ends.

An MP4 may also carry the settings that made it (``settings=``: a request's ``settings()``, never the face
photo), as JSON in its ``comment`` tag (``moov/udta/meta/ilst/©cmt``), which players show and
:func:`idanimator.video.read_settings` reads back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
from PIL import Image

from .errors import IDAnimatorError, InvalidRequestError
from .files import atomic_path, ensure_folder, write_error
from .settings import FPS, Limit

DEFAULT_FPS = FPS.default
DEFAULT_CRF = 18  # x264's "visually lossless" end; our videos are short, so size hardly matters
_CRF = Limit("The video quality (crf)", 0, 51, DEFAULT_CRF)  # x264: 0 is lossless, 51 is worst

# Convert with the BT.709 matrix and say so in the file: browsers then show the right colours.
_BT709 = (
    "scale=out_color_matrix=bt709:out_range=tv,"
    "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
)

Frames = np.ndarray | Sequence[Any]
SETTINGS_VERSION_KEY = "idanimator_version"  # in a video's settings record: the package that wrote it


# ----------------------------------------------------------------------------------------------
# Frames


def to_uint8_frames(frames: Frames) -> list[np.ndarray]:
    """Normalise pipeline output (float [0, 1] or uint8 arrays, PIL images) to uint8 HxWx3 frames.

    All frames must share one size: a video cannot change size mid-stream, and catching that here
    means no encoder is started and no file is touched.
    """
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(
            f"A video array must have 4 dimensions (frames, height, width, channels), not shape {frames.shape}."
        )
    items = list(frames)
    if not items:
        raise ValueError("There are no frames to write; the video is empty.")
    out = [_to_uint8_rgb(item) for item in items]
    first = out[0].shape
    for index, frame in enumerate(out):
        if frame.shape != first:
            raise ValueError(
                f"All frames must have the same size; frame 0 is {first[1]}x{first[0]} "
                f"but frame {index} is {frame.shape[1]}x{frame.shape[0]}."
            )
    return out


def _to_uint8_rgb(frame: Any) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"), dtype=np.uint8)
    array = np.asarray(frame)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(f"A frame must be an HxW, HxWx1, HxWx3 or HxWx4 image, not shape {array.shape}.")
    array = _to_uint8(array)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Floats are read as [0, 1] (the pipeline's output range); other integers are clipped to 0..255."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        scaled = np.nan_to_num(array.astype(np.float32), nan=0.0) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return np.clip(array.astype(np.int64) * (255 if array.dtype == np.bool_ else 1), 0, 255).astype(np.uint8)
    raise ValueError(f"Frames of type {array.dtype} cannot be written as a video.")


def pad_to_even(frame: np.ndarray) -> np.ndarray:
    """Grow an odd width or height by one pixel, repeating the edge: yuv420p needs even sizes.

    Padding (rather than cropping) keeps every generated pixel; the repeated edge is invisible.
    """
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if not pad_h and not pad_w:
        return frame
    return np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# ----------------------------------------------------------------------------------------------
# Writers


def write_mp4(
    frames: Frames,
    path: str | os.PathLike[str],
    fps: float = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    settings: dict | None = None,
) -> Path:
    """Write a browser-playable MP4 (H.264, yuv420p, faststart) and return its path.

    ``crf`` is x264's constant rate factor: 0 is lossless, 51 is worst; 17-23 look good.
    Odd widths/heights are padded by one repeated edge pixel, since yuv420p needs even sizes.
    ``settings``: what made the video (``GenerationRequest.settings()``), stored in it (see the module).
    """
    images = to_uint8_frames(frames)  # checked before any file is touched
    with Mp4Writer(path, fps, crf, settings=settings) as writer:
        writer.write(images)
    return writer.path


class Mp4Writer:
    """An MP4 written a chunk of frames at a time by one ffmpeg, so a long video is never in memory whole::

        with Mp4Writer("video.mp4", fps=8) as out:
            for chunk in chunks:  # arrays of frames, as write_mp4 takes them
                out.write(chunk)

    The file appears under its name only when the block ends without an error and ffmpeg wrote every frame.
    ``settings``: what made the video (``GenerationRequest.settings()``), stored in it (see the module).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float = DEFAULT_FPS,
        crf: int = DEFAULT_CRF,
        settings: dict | None = None,
    ):
        self.fps, self.crf = FPS.check(fps), _CRF.check(crf)
        self.comment = None if settings is None else settings_comment(settings)  # a bad record fails here
        self.path = Path(path)
        self.frames = 0
        self._size: tuple[int, ...] | None = None
        self._writer = None
        self._atomic = atomic_path(self.path)
        self._temp: Path | None = None

    def __enter__(self) -> Mp4Writer:
        self._temp = self._atomic.__enter__()
        return self

    def write(self, frames: Frames) -> None:
        images = [pad_to_even(frame) for frame in to_uint8_frames(frames)]
        if self._size is None:
            self._size = images[0].shape
            self._writer = _start_ffmpeg(self._temp, images[0].shape, self.fps, self.crf, self.comment)
        for index, image in enumerate(images):
            if image.shape != self._size:
                raise ValueError(
                    f"Frame {self.frames + index} is {image.shape[1]}x{image.shape[0]}, not the "
                    f"video's {self._size[1]}x{self._size[0]}; all frames must have one size."
                )
        self.frames += len(images)  # given; the check on close compares them with what ffmpeg wrote
        try:
            for image in images:
                self._writer.send(image)
        except OSError:
            pass  # a broken pipe: ffmpeg died mid-stream; the check on close reports it

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._writer is not None:
                self._writer.close()  # ends ffmpeg's input and waits for it to finish the file
            if exc_type is None:
                if not self.frames:
                    raise ValueError("There are no frames to write; the video is empty.")
                # write_frames ignores ffmpeg's exit status, so a failure shows only in the file itself. Its
                # index is read in Python rather than by decoding it with a second ffmpeg: that halved the
                # processes per streamed segment in the app (benchmarks/RESULTS.md).
                if mp4_frame_count(self._temp) != self.frames:
                    raise _encoder_error(self._temp, self.path)
        except BaseException as error:
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        return self._atomic.__exit__(exc_type, exc, tb)


def settings_comment(settings: dict) -> str:
    """The JSON a video's ``comment`` tag holds: the settings and the package version that wrote them. ASCII
    only (other characters escaped), so it passes through ffmpeg's command line and tags unchanged."""
    from . import __version__

    if not isinstance(settings, dict):
        raise TypeError(f"A video's settings must be a dict (GenerationRequest.settings()), not {type(settings)}.")
    record = {SETTINGS_VERSION_KEY: __version__, **settings}
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)


def _start_ffmpeg(temp: Path, shape: tuple[int, ...], fps: int, crf: int, comment: str | None = None):
    height, width = shape[:2]
    tags = [] if comment is None else ["-metadata", f"comment={comment}"]
    writer = imageio_ffmpeg.write_frames(
        temp,
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,  # its quality scale would add its own -crf; ours is in output_params
        macro_block_size=1,  # we pad to even sizes; a larger block makes imageio-ffmpeg rescale the picture
        ffmpeg_log_level="error",
        output_params=["-vf", _BT709, "-crf", str(crf), *tags, "-movflags", "+faststart", "-f", "mp4"],
    )
    try:
        writer.send(None)  # starts ffmpeg
    except (OSError, RuntimeError) as exc:  # RuntimeError: imageio-ffmpeg found no ffmpeg at all
        raise IDAnimatorError(f"The video encoder (ffmpeg) could not be started: {str(exc).rstrip('.')}.") from exc
    return writer


_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def mp4_frame_count(path: Path) -> int | None:
    """The frame count in a finished MP4's index (``moov/trak/.../stsz``), or None when the file is not a
    whole MP4: a box runs past the end of the file (cut short), or there is no index (never finished).
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None

    def boxes(start: int, end: int):
        while start + 8 <= end:
            size = int.from_bytes(data[start : start + 4], "big")
            kind = data[start + 4 : start + 8]
            header = 8
            if size == 1:  # a 64-bit size follows the type
                size, header = int.from_bytes(data[start + 8 : start + 16], "big"), 16
            if size < header or start + size > end:
                raise ValueError("cut short")
            yield kind, start + header, start + size
            start += size
        if start != end:
            raise ValueError("trailing bytes")

    def count(start: int, end: int) -> int | None:
        for kind, body, stop in list(boxes(start, end)):  # every box checked before any is read
            if kind == b"stsz" and stop - body >= 12:
                return int.from_bytes(data[body + 8 : body + 12], "big")  # after version/flags and size
            if kind in _CONTAINERS:
                found = count(body, stop)
                if found is not None:
                    return found
        return None

    try:
        return count(0, len(data))
    except ValueError:
        return None


def _encoder_error(temp: Path, path: Path) -> IDAnimatorError:
    """Say why ffmpeg failed. Its own message went to our stderr (write_frames does not capture it), so ask
    the file system: if one more MiB cannot be written beside it either, the disk (or quota, or a file size
    limit) is full or the folder turned read-only, and the OS error says which.
    """
    try:
        with open(temp, "ab") as probe:
            probe.write(bytes(1 << 20))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return write_error(path.parent, exc)
    return IDAnimatorError(f"The video encoder (ffmpeg) failed while writing {path}; its message is in the log.")


def write_gif(frames: Frames, path: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> Path:
    """Write a looping GIF (for places that cannot play MP4) and return its path.

    GIF delays are stored in 1/100 s, so the real rate is the nearest one (9 fps -> 0.11 s a frame).
    Pillow merges consecutive identical frames into one longer frame; the timing stays right.
    """
    fps = FPS.check(fps)
    images = [Image.fromarray(frame) for frame in to_uint8_frames(frames)]
    duration_ms = max(10, round(100 / fps) * 10)
    path = Path(path)
    with atomic_path(path) as temp:
        images[0].save(temp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def write_png_frames(frames: Frames, folder: str | os.PathLike[str]) -> list[Path]:
    """Write frame_0000.png, frame_0001.png, ... into ``folder`` (lossless, for editing tools).

    Each PNG is written atomically; PNGs already in the folder with other numbers are left alone.
    """
    images = to_uint8_frames(frames)
    folder = ensure_folder(Path(folder))
    paths = []
    for index, frame in enumerate(images):
        target = folder / f"frame_{index:04d}.png"
        with atomic_path(target) as temp:
            Image.fromarray(frame).save(temp, format="PNG")
        paths.append(target)
    return paths


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Check, before any work, that a video can be saved at ``path``: a known kind (``.mp4``, ``.gif``, or a
    folder name for PNG frames), in a folder that exists (none is created silently) and is writable."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() and suffix in (".mp4", ".gif"):
        raise InvalidRequestError(f"{path} is a folder; choose a file name ending in {suffix}.")
    if suffix not in (".mp4", ".gif", "") and not path.is_dir():
        raise InvalidRequestError(
            f"Cannot save a video as {path.name}; use a name ending in .mp4 or .gif, or a folder name for PNG frames."
        )
    folder = path.parent
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InvalidRequestError(f"Cannot write into the folder {folder} because {blocker} is a file, not a folder.")
    if not folder.is_dir():
        raise InvalidRequestError(f"The folder {folder} does not exist; create it first or choose another place.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidRequestError(f"The folder {folder} cannot be written; choose another place.")
    return path


def save_video(
    frames: Frames, path: str | os.PathLike[str], fps: float = DEFAULT_FPS, settings: dict | None = None
) -> Path:
    """Save by the name's suffix: ``.mp4``, ``.gif``, or a folder (no suffix) of PNG frames.

    Returns the file written, or the folder for PNG frames. See :func:`check_output_path` for what is refused.
    ``settings`` are stored in an MP4 only (GIFs and PNG frames carry none).
    """
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return write_mp4(frames, path, fps=fps, settings=settings)
    if suffix == ".gif":
        return write_gif(frames, path, fps=fps)
    FPS.check(fps)  # PNGs carry no rate, but a bad one is still the caller's mistake
    write_png_frames(frames, path)
    return path
