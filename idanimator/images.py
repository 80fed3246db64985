"""Reading reference photos: any reasonable path, bytes, file object, PIL image or array as upright 8-bit RGB;
and the project's one cover-and-centre-crop, CLIP's input size and its image processor.

Every way a photo can be unusable (not an image, damaged, too large to decode safely, too small) becomes an
:class:`~idanimator.errors.InvalidImageError` whose message names the photo by its file's base name only.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray

MAX_PIXELS = 64_000_000  # refuse to decode more than this: a small file can declare a gigantic canvas
MIN_IMAGE_SIDE = 32  # below this there is no usable face in any photo


def describe_source(source: object) -> str:
    """How messages name a photo: its file's base name when it has one, never the folder (for an upload that
    is the server's temp directory, which means nothing to the user and should not be shown to them)."""
    is_path = isinstance(source, (str, os.PathLike))
    path = source if is_path else getattr(source, "filename", None) or getattr(source, "name", None)
    if isinstance(path, (str, os.PathLike)) and (name := Path(os.fsdecode(path)).name):
        return name
    return "the uploaded image" if isinstance(source, (bytes, bytearray, memoryview)) else "the photo"


def load_image(source: ImageSource) -> Image.Image:
    """Any supported photo as an upright RGB PIL image (see :func:`read_image`); notes become UserWarnings."""
    image, notes = read_image(source)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return image


def read_image(source: ImageSource) -> tuple[Image.Image, list[str]]:
    """Load a path, bytes, file object, PIL image or numpy array as upright 8-bit RGB, plus warnings.

    EXIF orientation is applied; transparency is composited on white; palette, grey, CMYK and 16-bit images
    are converted; animated images give their first frame. Unreadable, oversized (> MAX_PIXELS) or tiny
    (< MIN_IMAGE_SIDE) images raise :class:`InvalidImageError`.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        image, notes = _array_to_image(source, name), []
    elif isinstance(source, Image.Image):
        image, notes = _decode(lambda: _prepare(source, name), name)  # it may be lazily opened, not yet decoded
    elif isinstance(source, (str, os.PathLike)):
        image, notes = _decode_file(Path(source), name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image, notes = _decode_file(io.BytesIO(bytes(source)), name)
    elif hasattr(source, "read"):
        image, notes = _decode_file(source, name)
    else:
        raise InvalidImageError(f"{name} is a {type(source).__name__}, not an image file, PIL image or array.")
    _check_min_size(image, name)
    return image, notes


def _decode_file(fp, name: str) -> tuple[Image.Image, list[str]]:
    """Open and fully decode a file (path or binary file object)."""
    if isinstance(fp, Path) and not fp.is_file():
        raise InvalidImageError(f"{name} does not exist or is not a file.")

    def open_and_prepare() -> tuple[Image.Image, list[str]]:
        with Image.open(fp) as opened:
            return _prepare(opened, name)

    return _decode(open_and_prepare, name)


def _decode(work: Callable[[], tuple[Image.Image, list[str]]], name: str) -> tuple[Image.Image, list[str]]:
    """Run a decoding step, turning every way it can fail into InvalidImageError with a plain sentence."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return work()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{name} is too large to open safely; use a photo under 64 megapixels.") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name} is not an image file; use a JPEG, PNG or WebP photo.") from exc
    except PermissionError as exc:
        raise InvalidImageError(f"{name} cannot be read (permission denied).") from exc
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise InvalidImageError(f"{name} is damaged or truncated and cannot be read; save or export it again.") from exc


def _prepare(image: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    """Size check before decoding, first frame, EXIF orientation, then RGB."""
    _check_max_pixels(image, name)
    notes = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"{name} has {frames} frames; only the first one is used.")
    image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user their photo
        notes.append(f"The orientation stored in {name} could not be read; the photo is used as stored.")
    return _to_rgb(image, name), notes


def _check_max_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"{name} is {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} megapixels allowed; "
            "use a smaller photo."
        )


def _check_min_size(image: Image.Image, name: str) -> None:
    if min(image.size) < MIN_IMAGE_SIDE:
        width, height = image.size
        raise InvalidImageError(
            f"{name} is only {width}x{height} pixels; use a photo at least {MIN_IMAGE_SIDE} pixels on each side "
            "(a few hundred is better)."
        )


_ALPHA_MODES = {"P", "PA", "RGBA", "RGBa", "LA", "La"}  # P may carry a transparent palette entry


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB from any PIL mode; transparent pixels become white (a neutral background for CLIP)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as exc:
        raise InvalidImageError(f"{name} uses the {mode} colour mode, which cannot be converted to RGB.") from exc


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images: PIL's own convert clips them to white, so scale first."""
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 0..65535 -> 0..255
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """H x W, H x W x 1/2/3/4 arrays (uint8, uint16, bool or float in 0..1 / 0..255) as RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)) or array.size == 0:
        raise InvalidImageError(f"{name} is an array of shape {array.shape}; expected H x W, H x W x 3 or H x W x 4.")
    image = Image.fromarray(np.ascontiguousarray(_array_to_uint8(array)))
    _check_max_pixels(image, name)
    return _to_rgb(image, name)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = np.nan_to_num(array.astype(np.float32))
    if array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and values.max() > 255):
        values = values / 257.0
    elif np.issubdtype(array.dtype, np.floating) and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(values, 0, 255).round().astype(np.uint8)


# -- resizing (shared with face detection) ----------------------------------------------------------


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """RGB, scaled (bicubic) to cover width x height, then centre-cropped to it: the subject keeps its
    proportions. The one cover-and-crop of the project (control conditions, training frames)."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def _fit_image(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Scale down (never up) so the long side is at most ``max_side``; return the image and the scale used."""
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), size[0] / image.width


def _fit_array(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The same for an (H, W, C) array, with OpenCV's area filter."""
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return rgb, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), size[0] / width


# -- the CLIP image encoder's input -------------------------------------------------------------------------

CLIP_SIZE = 224  # the side of the square the CLIP image encoder sees


def clip_image_processor(folder: str | os.PathLike | None = None):
    """transformers' CLIPImageProcessor, from ``folder`` or with its defaults: the PIL implementation where
    transformers has one (the default one wants torchvision, which we keep out)."""
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    return CLIPImageProcessor.from_pretrained(folder) if folder is not None else CLIPImageProcessor()
