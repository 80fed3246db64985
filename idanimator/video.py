"""The one video reader (frames by index, with metadata), and the MP4/GIF writers (from :mod:`.video_writers`).

Every read goes through the ffmpeg that imageio-ffmpeg bundles, and only real media files are read: ffmpeg may
open local files only (no URLs) and only the container formats in :data:`VIDEO_FORMATS`, so a concat list or
an HLS playlist saved under a video's name is refused instead of followed (a concat list naming itself is
followed until the process runs out of file handles). Frame ``n`` is the n-th decoded frame of the file
(``-fps_mode passthrough``: ffmpeg neither drops nor repeats frames to reach a constant rate), so a variable
frame rate file is addressed alike by build-dataset, the trainer and the evaluation.

Sizes are bounded before any frame is decoded, from the file's header (:func:`probe`): a source frame larger
than ``settings.MAX_SOURCE_PIXELS`` is refused (ffmpeg's decoder is given the same cap), and a read that would
hand back more than ``max_pixels`` (``settings.MAX_DECODED_PIXELS`` for :func:`read_video`) is refused, at the
decoded size: frames can be shrunk in the decoder to what the caller needs (``size``, ``cover``,
``max_side``). Every failure is an :class:`~idanimator.errors.UnreadableVideoError` (or its
:class:`~idanimator.errors.VideoTooLargeError`) with one sentence naming the file's base name.

:func:`read_settings` reads back the generation settings an MP4 written here carries (its ``comment`` tag, read
from the file's boxes in Python: no decoding, no second program or package).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError, UnreadableVideoError, VideoTooLargeError
from .settings import MAX_DECODED_PIXELS, MAX_SOURCE_PIXELS
from .video_writers import (  # noqa: F401  (the writers' public names, imported from here)
    DEFAULT_CRF,
    DEFAULT_FPS,
    SETTINGS_VERSION_KEY,
    Frames,
    Mp4Writer,
    check_output_path,
    mp4_frame_count,
    pad_to_even,
    save_video,
    to_uint8_frames,
    write_gif,
    write_mp4,
    write_png_frames,
)

# ffmpeg's names of the container demuxers read: MP4/MOV/M4V/3GP, MKV/WebM, AVI, GIF, MPEG-TS, MPEG-PS (.mpg),
# FLV and ASF (.wmv). None of them opens another file; concat, hls, image2 and the like are left out for that.
VIDEO_FORMATS = ("mov", "matroska", "avi", "gif", "mpegts", "mpeg", "flv", "asf")
# The file suffixes of those containers: what build-dataset and eval pick out of a folder as videos.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv")
_SAFE_INPUT = ["-protocol_whitelist", "file", "-format_whitelist", ",".join(VIDEO_FORMATS)]
_SAFE_INPUT += ["-max_pixels", str(MAX_SOURCE_PIXELS)]  # the decoder's own cap, whatever the header says
_PASSTHROUGH = ["-fps_mode", "passthrough"]  # frame n is the n-th decoded frame: none dropped or repeated
_FIRST_VIDEO = ["-map", "0:V:0"]  # the first video stream that is not a cover picture, as probe reports it
_MAX_SELECTED = 1000  # frames picked by ffmpeg's select filter in one read; more are picked here
_PROBE_TIMEOUT_S = 60
_KNOWN = "use an MP4, MOV, MKV, WebM, AVI or GIF file"


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says; read without decoding its frames."""

    name: str  # the file's base name, as messages give it
    width: int  # as shown: a phone video turned by 90 degrees has its sides swapped, as ffmpeg turns its frames
    height: int
    fps: float  # 0.0 when the file does not say
    duration: float  # seconds; 0.0 when the file does not say

    @property
    def frames(self) -> int:
        """An estimate, duration x fps (0 when either is unknown); reads count the frames again as they go."""
        return round(self.duration * self.fps)


@dataclass
class Video:
    frames: np.ndarray  # (frames, height, width, 3) uint8 RGB
    fps: float  # 0.0 when the file does not say

    def __len__(self) -> int:
        return len(self.frames)


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """The size, frame rate and duration of a video file, from ``ffmpeg -i`` (no frame is decoded for us).

    Refuses (UnreadableVideoError) a missing file, a file of any other format than :data:`VIDEO_FORMATS`, and
    (VideoTooLargeError) frames of more than ``settings.MAX_SOURCE_PIXELS``.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise UnreadableVideoError(f"The video {path.name} does not exist.")
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *_SAFE_INPUT, "-i", _url(path)]
    try:
        run = subprocess.run(command, capture_output=True, timeout=_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _corrupt(path) from exc
    info = _parse_header(path, run.stderr.decode("utf-8", "replace"))
    if info.width * info.height > MAX_SOURCE_PIXELS:
        raise VideoTooLargeError(
            f"The video {path.name} is {info.width}x{info.height}, more than the {_millions(MAX_SOURCE_PIXELS)} "
            f"pixels a frame may have here; use a smaller video, 4K (3840x2160) or less."
        )
    return info


def _url(path: Path) -> str:
    return "file:" + str(path.resolve())  # the file protocol by name: no other is tried, whatever the name holds


def _parse_header(path: Path, text: str) -> VideoInfo:
    if "not on whitelist" in text:
        raise UnreadableVideoError(f"The file {path.name} is not a video file that can be read here; {_KNOWN}.")
    streams = [m for m in re.finditer(r"Stream #\d+:\d+.*?: Video: (.*)", text) if "(attached pic)" not in m[1]]
    size = re.search(r"[ ,](\d+)x(\d+)[ ,\]]", streams[0][1] + " ") if streams else None
    if size is None or 0 in (int(size[1]), int(size[2])):
        raise _corrupt(path)
    width, height = int(size[1]), int(size[2])
    side_data = text[streams[0].end() :].split("Stream #", 1)[0]
    rotation = re.search(r"rotation of (-?[\d.]+) degrees", side_data)
    if rotation and round(float(rotation[1])) % 180 == 90:
        width, height = height, width
    fps = re.search(r" ([\d.]+) fps", streams[0][1]) or re.search(r" ([\d.]+) tbr", streams[0][1])
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    seconds = 3600 * float(duration[1]) + 60 * float(duration[2]) + float(duration[3]) if duration else 0.0
    return VideoInfo(path.name, width, height, float(fps[1]) if fps else 0.0, seconds)


def _corrupt(path: Path) -> UnreadableVideoError:
    return UnreadableVideoError(f"The file {path.name} could not be read as a video (corrupt or truncated).")


def _millions(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} million"


def decoded_size(
    info: VideoInfo,
    *,
    size: tuple[int, int] | None = None,
    cover: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> tuple[int, int]:
    """(width, height) of the frames a read with these options hands back.

    ``size``: exactly that (the aspect is not kept). ``cover``: shrunk, keeping the aspect, to the smallest
    size that still covers that width x height (for a centre crop to it). ``max_side``: shrunk so that the
    longer side is at most that. Frames are never enlarged: that is left to the caller, after the read.
    """
    for asked in (size, cover, (max_side, max_side) if max_side is not None else None):
        if asked is not None and min(asked) < 1:
            raise ValueError(f"A decoded size must be at least 1 pixel a side, not {asked}.")
    if size is not None:
        return int(size[0]), int(size[1])
    scale = 1.0
    if cover is not None:
        scale = min(scale, max(cover[0] / info.width, cover[1] / info.height))
    if max_side is not None:
        scale = min(scale, max_side / max(info.width, info.height))
    if scale >= 1.0:
        return info.width, info.height
    return max(1, math.ceil(info.width * scale - 1e-6)), max(1, math.ceil(info.height * scale - 1e-6))


def open_video(
    path: str | os.PathLike[str],
    indices: Iterable[int] | None = None,
    *,
    first: int | None = None,
    size: tuple[int, int] | None = None,
    cover: tuple[int, int] | None = None,
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> tuple[VideoInfo, Iterator[tuple[int, np.ndarray]]]:
    """The video's :class:`VideoInfo`, and its frames as ``(index, RGB uint8 array)``, decoded as they are
    taken. The file is probed (and refused, with its sentence) at once.

    ``indices``: only those frames, in increasing order (ffmpeg's ``select`` filter: only they are converted
    and piped), stopping after the last; a frame past the end raises UnreadableVideoError. ``first``: at most
    the first that many frames (fewer when the video is shorter). Neither: every frame. ``size``, ``cover``
    and ``max_side`` shrink the frames in the decoder (see :func:`decoded_size`). ``max_pixels`` caps the
    pixels handed back in all (frames x width x height), checked from the header before decoding and again
    as frames come; None means no cap (the caller holds one frame at a time).
    """
    path = Path(path)
    info = probe(path)
    width, height = decoded_size(info, size=size, cover=cover, max_side=max_side)
    wanted = None if indices is None else sorted({int(i) for i in indices})
    if wanted and wanted[0] < 0:
        raise ValueError(f"Frame indices start at 0, not {wanted[0]}.")
    if first is not None and first < 0:
        raise ValueError(f"The number of frames to read cannot be negative (got {first}).")
    if wanted == [] or first == 0:
        return info, iter(())
    counts = [n for n in (first, info.frames) if n]  # the frames asked for, and the header's estimate
    _check_budget(info, len(wanted) if wanted is not None else min(counts, default=0), width, height, max_pixels)
    filters = []
    select = wanted is not None and len(wanted) <= _MAX_SELECTED  # else the expression grows too long
    if select:
        filters.append("select='" + "+".join(f"eq(n\\,{i})" for i in wanted) + "'")
    shrunk = (width, height) != (info.width, info.height) or size is not None
    # Always a fixed size, so a stream that changes its size midway still comes out as counted above.
    filters.append(f"scale={width}:{height}" + (":flags=area" if shrunk else ""))
    output = [*_FIRST_VIDEO, "-vf", ",".join(filters), *_PASSTHROUGH]
    limit = len(wanted) if wanted is not None else first
    return info, _frames(path, info, output, wanted, select, limit, max_pixels)


def _check_budget(info: VideoInfo, frames: int, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and frames * width * height > max_pixels:
        raise VideoTooLargeError(
            f"The video {info.name} would be {frames} frames of {width}x{height} when decoded, more than the "
            f"{_millions(max_pixels)} pixels read at once here; use a shorter or smaller video."
        )


def _frames(path: Path, info: VideoInfo, output: list[str], wanted, select: bool, limit, max_pixels):
    import imageio_ffmpeg

    logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)  # its note that a scaled size differs
    reader = imageio_ffmpeg.read_frames(_url(path), input_params=list(_SAFE_INPUT), output_params=output)
    got = 0
    try:
        width, height = next(reader)["size"]
        for number, raw in enumerate(reader):
            if wanted is not None and not select and number != wanted[got]:
                continue
            _check_budget(info, got + 1, width, height, max_pixels)  # the header's frame count may be wrong
            yield (number if wanted is None else wanted[got]), np.frombuffer(raw, np.uint8).reshape(height, width, 3)
            got += 1
            if got == limit:
                break
    except (OSError, RuntimeError, StopIteration, ValueError, IndexError, KeyError) as exc:
        raise _corrupt(path) from exc
    finally:
        reader.close()
    if wanted is not None and got < len(wanted):
        raise UnreadableVideoError(
            f"The video {path.name} ended before frame {wanted[got]} (it is shorter than it seemed, or damaged)."
        )


def read_video(
    path: str | os.PathLike[str],
    indices: list[int] | None = None,
    *,
    first: int | None = None,
    size: tuple[int, int] | None = None,
    cover: tuple[int, int] | None = None,
    max_side: int | None = None,
    max_pixels: int | None = MAX_DECODED_PIXELS,
) -> Video:
    """Frames of a video (MP4, MOV, MKV, WebM, AVI, GIF, ...) at once, as :class:`Video`: every frame, the
    ``first`` ones, or those at ``indices`` (in the order given; see :func:`open_video` for the rest)."""
    info, frames = open_video(
        path, indices, first=first, size=size, cover=cover, max_side=max_side, max_pixels=max_pixels
    )
    got = dict(frames)
    if not got:
        raise UnreadableVideoError(f"The video {info.name} has no frames.")
    order = list(got) if indices is None else [int(i) for i in indices]
    return Video(frames=np.stack([got[i] for i in order]), fps=info.fps)


# ----------------------------------------------------------------------------------------------
# The settings a video carries

_COMMENT_PATH = (b"moov", b"udta", b"meta", b"ilst", b"\xa9cmt", b"data")  # where ffmpeg's mp4 muxer puts it
_MAX_COMMENT_BYTES = 1 << 20


def read_settings(path: str | os.PathLike[str], *, required: bool = False) -> dict | None:
    """The generation settings an MP4 written here carries (``GenerationRequest.settings()`` and
    ``idanimator_version``), or None for a video without them (another program's, a GIF, one made before
    videos carried them); with ``required``, that is an InvalidRequestError sentence instead. A missing file
    is an UnreadableVideoError. Only the file's index is read (its boxes, in Python), never its frames."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableVideoError(f"The video {path.name} does not exist.")
    try:
        with open(path, "rb") as file:
            raw = _mp4_comment(file, path.stat().st_size)
    except OSError as exc:
        raise UnreadableVideoError(f"The video {path.name} could not be read ({exc.strerror or exc}).") from exc
    record = None
    if raw is not None:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            record = None
    if not isinstance(record, dict) or SETTINGS_VERSION_KEY not in record:
        if required:
            raise InvalidRequestError(
                f"The video {path.name} carries no generation settings: only MP4s made by idanimator "
                "(generate, its batch mode, or the app) do."
            )
        return None
    return record


def _mp4_comment(file, size: int) -> bytes | None:
    """The bytes of the ``comment`` tag (``moov/udta/meta/ilst/©cmt/data``), or None (not there, or not an MP4)."""
    start, end = 0, size
    for kind in _COMMENT_PATH:
        found = _find_box(file, start, end, kind)
        if found is None:
            return None
        start, end = found
        if kind == b"meta":  # an ISO "full box": version and flags before its children (QuickTime's has none)
            file.seek(start)
            if file.read(4) == bytes(4):
                start += 4
    if end - start < 8 or end - start - 8 > _MAX_COMMENT_BYTES:
        return None
    file.seek(start + 8)  # after the data box's type indicator and locale
    return file.read(end - start - 8)


def _find_box(file, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(body start, body end) of the first box named ``kind`` between ``start`` and ``end``; None when there is
    none or a box's size does not fit (not an MP4, or cut short)."""
    while start + 8 <= end:
        file.seek(start)
        head = file.read(16)
        if len(head) < 8:
            return None
        length, header = int.from_bytes(head[:4], "big"), 8
        if length == 1 and len(head) == 16:  # a 64-bit size follows the type
            length, header = int.from_bytes(head[8:16], "big"), 16
        elif length == 0:  # the box runs to the end of its container
            length = end - start
        if length < header or start + length > end:
            return None
        if head[4:8] == kind:
            return start + header, start + length
        start += length
    return None
