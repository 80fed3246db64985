"""A page's (or an API client's) choices beyond the release, turned into the library's :class:`Extras`.

The page offers style LoRAs by name (files in the operator's LoRA folder, or the tiny kit's), control
images with the frames they go to as text ("0, 15"), and a driving video; this module checks them with a
sentence each and builds the validated options.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError
from .extras.spec import ControlSpec, Extras, KeyFrame, LoraSpec
from .settings import check_text

LORA_SUFFIXES = (".safetensors",)


def lora_files(folder: Path | None) -> dict[str, Path]:
    """The LoRAs a page offers: ``NAME.safetensors`` files in ``folder``, by name (none if no folder)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    return {p.stem: p for p in sorted(Path(folder).iterdir()) if p.suffix in LORA_SUFFIXES and p.is_file()}


def keyframe_indices(text: str, count: int, num_frames: int) -> list[int]:
    """The frame of each of ``count`` control images: from "0, 15" (in upload order), or spread evenly over
    the video when the text is empty."""
    text = check_text("The control frames", text, 1000).strip()
    if not text:
        return [int(i) for i in np.linspace(0, num_frames - 1, num=count).round()] if count > 1 else [0] * count
    try:
        frames = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InvalidRequestError(f"Control frames must be whole numbers separated by commas (got {text!r}).") from None
    if len(frames) != count:
        raise InvalidRequestError(f"Give one frame for each of the {count} control images (got {len(frames)}).")
    return frames


def extras_for(request, num_frames: int, offered_loras: Callable[[], dict[str, Path]]) -> Extras:
    """The validated options of a request (an object with the fields of ``studio.Request``). ``offered_loras``
    lists the LoRAs by name; it is asked only when the request names some (it reads a folder)."""
    loras = []
    offered = offered_loras() if request.loras else {}
    for choice in request.loras or []:
        spec = LoraSpec.parse(choice)
        if spec.source not in offered:
            names = ", ".join(offered) or "none are offered here"
            raise InvalidRequestError(f"Unknown LoRA {spec.source!r}; choose from: {names}.")
        weight = spec.weight if ":" in str(choice) else request.lora_weight
        loras.append(LoraSpec(str(offered[spec.source]), weight))
    control = None
    if request.control:
        images = [image for image in (request.control_images or []) if image is not None]
        frames = keyframe_indices(request.control_frames, len(images), num_frames)
        keyframes = tuple(KeyFrame(image, frame) for image, frame in zip(images, frames, strict=True))
        control = ControlSpec(request.control, keyframes, request.control_video or None, request.control_strength)
    extras = Extras(loras=tuple(loras), free_init=request.free_init, fast=request.fast, control=control)
    return extras.validate(num_frames)
