"""Writing generated frames to files people can open: MP4 for browsers, GIF, or a folder of PNGs.

Every file is written atomically (a temporary name in the same folder, then ``os.replace``), so a
crash, a full disk or a failing encoder never leaves a half-written video under the name the user
asked for. MP4s are encoded by imageio-ffmpeg's bundled ffmpeg (no system ffmpeg is needed) with
the settings browsers require: H.264, yuv420p, even width and height, and the index (``moov``)
at the front so playback can start before the download ends.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
from PIL import Image

from .errors import IDAnimatorError, InvalidRequestError

DEFAULT_FPS = 9
DEFAULT_CRF = 18  # x264's "visually lossless" end; our videos are short, so size hardly matters
MAX_FPS = 240
VIDEO_SUFFIXES = (".mp4", ".gif")

# Errors from the operating system that mean "this folder cannot take the file".
_DISK_FULL_HINTS = ("No space left on device", "Disk quota exceeded", "File too large")
_NOT_WRITABLE_HINTS = ("Permission denied", "Read-only file system", "Not a directory")

Frames = np.ndarray | Sequence[Any]


# ----------------------------------------------------------------------------------------------
# Frames


def to_uint8_frames(frames: Frames) -> list[np.ndarray]:
    """Normalise pipeline output (float [0, 1] or uint8 arrays, PIL images) to uint8 HxWx3 frames.

    All frames must share one size: a video cannot change size mid-stream, and catching that here
    means no encoder is started and no file is touched.
    """
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(
                f"A video array must have 4 dimensions (frames, height, width, channels), not shape {frames.shape}."
            )
        items: Sequence[Any] = list(frames)
    else:
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


def _check_fps(fps: float) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise InvalidRequestError(f"Frames per second must be a number above 0 and at most {MAX_FPS}, not {fps!r}.")
    return float(fps)


# ----------------------------------------------------------------------------------------------
# Atomic files


def _ensure_folder(folder: Path) -> Path:
    """Create the output folder; a file in the way or a read-only place becomes one plain sentence."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise IDAnimatorError(f"Cannot write into the folder {folder} because {blocker} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IDAnimatorError(
            f"The folder {folder} cannot be created ({exc.strerror or exc}); choose another output location."
        ) from exc
    return folder


def _reserve_temp(path: Path) -> Path:
    """Create an empty, uniquely named file next to ``path``; proves the folder is writable.

    The real suffix is kept last so tools that look at it still recognise the format, and the file is
    created with ``open`` (not ``mkstemp``) so it gets the usual umask permissions, not 0600.
    """
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        with open(temp, "xb"):
            pass
    except OSError as exc:
        raise _write_error(path.parent, exc) from exc
    return temp


def _write_error(folder: Path, exc: OSError) -> IDAnimatorError:
    return IDAnimatorError(
        f"Cannot write into the folder {folder} ({exc.strerror or exc}); "
        "check that it is writable and the disk has free space."
    )


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path``, on any failure it is removed."""
    _ensure_folder(path.parent)
    temp = _reserve_temp(path)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if path.is_dir():
            raise IDAnimatorError(f"{path} is a folder; choose a file name for the video.") from exc
        raise _write_error(path.parent, exc) from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    """Flush the file to disk before the rename, so a power cut cannot leave an empty video behind."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Writers


def write_mp4(frames: Frames, path: str | os.PathLike[str], fps: float = DEFAULT_FPS, crf: int = DEFAULT_CRF) -> Path:
    """Write a browser-playable MP4 (H.264, yuv420p, faststart) and return its path.

    ``crf`` is x264's constant rate factor: 0 is lossless, 51 is worst; 17-23 look good.
    Odd widths/heights are padded by one repeated edge pixel, since yuv420p needs even sizes.
    """
    fps = _check_fps(fps)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise InvalidRequestError(f"The video quality (crf) must be a whole number from 0 to 51, not {crf!r}.")
    images = [pad_to_even(frame) for frame in to_uint8_frames(frames)]
    path = Path(path)
    with _atomic_file(path) as temp:
        _run_ffmpeg(_mp4_command(temp, images[0].shape, fps, crf), b"".join(f.tobytes() for f in images), path)
    return path


def _mp4_command(out: Path, shape: tuple[int, ...], fps: float, crf: int) -> list[str]:
    height, width = shape[:2]
    rate = str(Fraction(fps).limit_denominator(1001))
    # Convert with the BT.709 matrix and say so in the file: browsers then show the right colours.
    colour = (
        "scale=out_color_matrix=bt709:out_range=tv,"
        "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
    )
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{width}x{height}",
        "-r",
        rate,
        "-i",
        "-",
        "-an",
        "-vf",
        colour,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        str(crf),
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        str(out),
    ]


def _run_ffmpeg(command: list[str], data: bytes, path: Path) -> None:
    """Run ffmpeg on raw frames; any failure (including a crash) becomes one plain sentence."""
    try:
        result = subprocess.run(command, input=data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    except OSError as exc:
        raise IDAnimatorError(f"The video encoder (ffmpeg) could not be started: {exc}.") from exc
    if result.returncode == 0:
        return
    message = result.stderr.decode("utf-8", "replace").strip()
    if result.returncode == -signal.SIGXFSZ or any(hint in message for hint in _DISK_FULL_HINTS):
        raise IDAnimatorError(
            f"The disk holding {path.parent} is full (or a file size limit was reached); free some space and try again."
        )
    if any(hint in message for hint in _NOT_WRITABLE_HINTS):
        raise IDAnimatorError(f"Cannot write into the folder {path.parent}; check that it is writable.")
    last = message.splitlines()[-1] if message else f"exit status {result.returncode}"
    raise IDAnimatorError(f"The video encoder (ffmpeg) failed while writing {path}: {last}")


def write_gif(frames: Frames, path: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> Path:
    """Write a looping GIF (for places that cannot play MP4) and return its path.

    GIF delays are stored in 1/100 s, so the real rate is the nearest one (9 fps -> 0.11 s a frame).
    Pillow merges consecutive identical frames into one longer frame; the timing stays right.
    """
    fps = _check_fps(fps)
    images = [Image.fromarray(frame) for frame in to_uint8_frames(frames)]
    duration_ms = max(10, round(100 / fps) * 10)
    path = Path(path)
    with _atomic_file(path) as temp:
        images[0].save(temp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def write_png_frames(frames: Frames, folder: str | os.PathLike[str]) -> list[Path]:
    """Write frame_0000.png, frame_0001.png, ... into ``folder`` (lossless, for editing tools).

    Each PNG is written atomically; PNGs already in the folder with other numbers are left alone.
    """
    images = to_uint8_frames(frames)
    folder = _ensure_folder(Path(folder))
    paths = []
    for index, frame in enumerate(images):
        target = folder / f"frame_{index:04d}.png"
        with _atomic_file(target) as temp:
            Image.fromarray(frame).save(temp, format="PNG")
        paths.append(target)
    return paths


def save_video(frames: Frames, path: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> Path:
    """Save by the name's suffix: ``.mp4``, ``.gif``, or a folder (no suffix) of PNG frames.

    Returns the file written, or the folder for PNG frames.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return write_mp4(frames, path, fps=fps)
    if suffix == ".gif":
        return write_gif(frames, path, fps=fps)
    if not suffix or path.is_dir():
        _check_fps(fps)
        write_png_frames(frames, path)
        return path
    raise InvalidRequestError(
        f"Cannot save a video as {path.name}; use a name ending in .mp4 or .gif, or a folder name for PNG frames."
    )


# ----------------------------------------------------------------------------------------------
# Reading back


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a video (MP4 or GIF) to a (frames, height, width, 3) uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise IDAnimatorError(f"The video file {path} does not exist.")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    except (OSError, RuntimeError, StopIteration, ValueError) as exc:
        raise IDAnimatorError(f"The file {path} could not be read as a video.") from exc
    if not frames:
        raise IDAnimatorError(f"The video {path} has no frames.")
    return np.stack(frames)


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a video's first video stream as ffmpeg sees it.

    Returns ``codec``, ``profile`` (or None), ``pix_fmt``, ``width``, ``height``, ``fps``,
    ``frame_count`` and ``duration`` (seconds, from counting the packets).
    """
    path = Path(path)
    if not path.is_file():
        raise IDAnimatorError(f"The video file {path} does not exist.")
    header = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    info = parse_stream_header(header.stderr.decode("utf-8", "replace"))
    if info is None:
        raise IDAnimatorError(f"The file {path} could not be read as a video.")
    try:
        frame_count, duration = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (OSError, RuntimeError) as exc:
        raise IDAnimatorError(f"The file {path} could not be read as a video.") from exc
    return {**info, "frame_count": frame_count, "duration": duration}


_STREAM_LINE = re.compile(r"Stream #\d+:\d+.*?: Video: (.*)")
_SIZE = re.compile(r"^(\d+)x(\d+)")
_FPS = re.compile(r"^([\d.]+)(k?) (fps|tbr)$")


def parse_stream_header(text: str) -> dict[str, Any] | None:
    """Pull codec, profile, pix_fmt, size and fps out of ``ffmpeg -i`` output (None if no video)."""
    match = _STREAM_LINE.search(text)
    if match is None:
        return None
    parts = _split_top_level(match.group(1))
    codec_words = parts[0].split()
    profile = re.match(r"\((.*?)\)", " ".join(codec_words[1:]))
    info: dict[str, Any] = {
        "codec": codec_words[0],
        "profile": profile.group(1) if profile and "/" not in profile.group(1) else None,
        "pix_fmt": re.match(r"[\w]+", parts[1]).group(0) if len(parts) > 1 else None,
        "width": None,
        "height": None,
        "fps": None,
    }
    rates: dict[str, float] = {}
    for part in parts[1:]:
        size = _SIZE.match(part)
        if size and info["width"] is None:
            info["width"], info["height"] = int(size.group(1)), int(size.group(2))
        rate = _FPS.match(part)
        if rate:
            rates[rate.group(3)] = float(rate.group(1)) * (1000 if rate.group(2) else 1)
    info["fps"] = rates.get("fps", rates.get("tbr"))
    return info


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: ``yuv420p(tv, bt709, progressive)`` is one part."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return parts
