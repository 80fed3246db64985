"""The condition images a structure control feeds, made from what the request gives, at the video's size.

* ``sparse-sketch``: each control image is a sketch; SparseCtrl's scribble model (like ControlNet's) reads
  white lines on black, so a drawing with dark lines on light paper is inverted.
* ``sparse-rgb``: each control image is used as it is (the pipeline encodes it with the VAE).
* ``canny``: edges found by OpenCV's Canny detector in each frame of the driving video.
* ``openpose`` / ``depth``: the driving video must already be a pose rendering (coloured skeletons on black)
  or a depth rendering (grey levels, near is bright); its frames are used as they are. No pose or depth
  estimator is bundled (controlnet_aux needs the network); render the video with one beforehand.

Every image is scaled to cover the requested size and centre-cropped, so what :func:`preview_condition`
shows is exactly what the ControlNet is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError, UnreadableVideoError
from ..images import cover_crop, describe_source, read_image
from ..request import ControlSpec

CANNY_THRESHOLDS = (100, 200)  # the low and high hysteresis thresholds of diffusers' ControlNet examples
_GREY_TOLERANCE = 12.0  # mean |R-G|+|G-B| (of 510) below which a frame counts as grey (video codecs add chroma noise)


@dataclass
class Conditions:
    """The condition images of one request and the video frame each one controls."""

    images: list[Image.Image]  # RGB, each exactly the video's width x height
    frames: list[int]  # the frame index of each image (0..num_frames-1)


def condition_frames(spec: ControlSpec, num_frames: int, size: tuple[int, int]) -> Conditions:
    """The condition images for a validated ``spec`` (see :meth:`Extras.validate`); ``size`` is (height, width).

    Unusable inputs raise :class:`~idanimator.errors.InvalidImageError` or :class:`InvalidRequestError`.
    """
    height, width = size
    if spec.keyframes:
        keys = sorted(spec.keyframes, key=lambda key: key.frame)
        for first, second in zip(keys, keys[1:], strict=False):
            if first.frame == second.frame:
                raise InvalidRequestError(f"Two control images are placed at frame {first.frame}; give each its own.")
        images = [_keyframe_condition(spec.kind, key.image, width, height) for key in keys]
        return Conditions(images, [key.frame for key in keys])
    frames = [cover_crop(frame, width, height) for frame in read_video_frames(spec.video, num_frames, size)]
    if spec.kind == "canny":
        frames = [canny_edges(frame) for frame in frames]
    elif spec.kind == "depth":
        _check_grey(frames, spec.video)
    return Conditions(frames, list(range(num_frames)))


def preview_condition(spec: ControlSpec, num_frames: int, size: tuple[int, int]) -> list[Image.Image]:
    """The conditioning images actually fed, for showing before (or beside) a generation: detected edges,
    pose or depth frames, keyframes. Each carries its caption in ``image.info["caption"]`` (e.g. "frame 7").
    ``size`` is (height, width)."""
    conditions = condition_frames(spec, num_frames, size)
    for image, frame in zip(conditions.images, conditions.frames, strict=True):
        image.info["caption"] = f"frame {frame}"
    return conditions.images


# -- keyframes (SparseCtrl) ----------------------------------------------------------------------


def _keyframe_condition(kind: str, source, width: int, height: int) -> Image.Image:
    image, _ = read_image(source)  # InvalidImageError with one sentence when it is not a usable image
    image = cover_crop(image, width, height)
    return sketch_lines(image) if kind == "sparse-sketch" else image


def sketch_lines(image: Image.Image) -> Image.Image:
    """A sketch as white lines on black: a drawing that is mostly light (dark lines on paper) is inverted."""
    grey = np.asarray(image.convert("L"))
    if grey.mean() > 127:
        grey = 255 - grey
    return Image.fromarray(grey).convert("RGB")


# -- driving videos (ControlNet) ----------------------------------------------------------------


def read_video_frames(video, num_frames: int, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """The first ``num_frames`` frames of a video file (anything :mod:`idanimator.video` reads: MP4, WebM,
    MOV, GIF) or of a sequence of images, as RGB PIL images. ``size`` (height, width): a video's frames are
    shrunk in the decoder to just cover it (never enlarged), so a huge driving video costs no more memory
    than the generation itself; a video too large even so is refused with a sentence before decoding."""
    from ..video import read_video  # here: a GPU machine running benchmarks/gpu.py has no imageio-ffmpeg

    if isinstance(video, (list, tuple)):
        frames = [read_image(frame)[0] for frame in video[:num_frames]]
        name = "The control video"
    else:
        name = f"The control video {describe_source(video)}"
        cover = None if size is None else (size[1], size[0])
        try:
            decoded = read_video(Path(video), first=num_frames, cover=cover)
        except UnreadableVideoError as exc:  # missing, not a media file, too large, corrupt: one sentence
            raise InvalidRequestError(str(exc)) from exc
        frames = [Image.fromarray(frame) for frame in decoded.frames]
    if len(frames) < num_frames:
        raise InvalidRequestError(
            f"{name} has only {len(frames)} frames but {num_frames} were asked for; use a longer video or fewer frames."
        )
    return frames


def canny_edges(image: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """White edges on black, as ControlNet's canny model was trained on."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), *thresholds)
    return Image.fromarray(edges).convert("RGB")


def _check_grey(frames: list[Image.Image], video) -> None:
    """A depth rendering is grey; a colour video here is almost surely a plain video, which would steer badly."""
    rgb = np.asarray(frames[0], dtype=np.float32)
    colour = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
    if colour > _GREY_TOLERANCE:
        name = describe_source(video) if not isinstance(video, (list, tuple)) else "the control video"
        raise InvalidRequestError(
            f"The depth control needs a depth rendering (grey levels, near is bright), but {name} is in colour."
        )
