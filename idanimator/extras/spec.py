"""What a request asks for beyond the release's settings, as plain data (picklable, for ZeroGPU workers).

The CLI, the app and the library fill an :class:`Extras`; :meth:`Extras.validate` checks every value with a
sentence, before any model loads. What the options do is in the sibling modules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InvalidRequestError
from ..settings import Limit

LORA_WEIGHT = Limit("A LoRA's weight", -2.0, 2.0, 1.0, step=0.05, whole=False)
CONTROL_STRENGTH = Limit("The control strength", 0.0, 2.0, 1.0, step=0.05, whole=False)
# The fast mode's own defaults (AnimateLCM: 4-8 LCM steps, guidance 1-2), used where a request sets none.
FAST_STEPS = 6
FAST_GUIDANCE = 1.5

SPARSE_KINDS = ("sparse-sketch", "sparse-rgb")  # SparseCtrl: keyframe images at chosen frames
VIDEO_KINDS = ("openpose", "depth", "canny")  # ControlNet: one condition frame per video frame
CONTROL_KINDS = SPARSE_KINDS + VIDEO_KINDS


@dataclass(frozen=True)
class LoraSpec:
    """A style LoRA for the backbone: a local file, or a Hub id (``owner/repo`` or ``owner/repo/file``)."""

    source: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH_OR_ID[:WEIGHT]`` as the CLI takes it (a Windows drive letter is not a weight). Text after the
        last ``:`` that is not a number is refused, unless the whole text names an existing file or folder."""
        source, sep, weight = str(text).rpartition(":")
        if not sep or not source or len(source) == 1 or Path(str(text).strip()).expanduser().exists():
            return cls(str(text).strip())
        try:
            return cls(source.strip(), float(weight))
        except ValueError:
            if "/" in weight or "\\" in weight:  # a path or URL-like text, not a weight
                return cls(str(text).strip())
            raise InvalidRequestError(
                f"The weight {weight.strip()!r} of the LoRA {source.strip()} must be a number, as in "
                f"{source.strip()}:0.8."
            ) from None


@dataclass(frozen=True)
class KeyFrame:
    """A SparseCtrl condition image (a path or an image) placed at one frame of the video."""

    image: object
    frame: int = 0

    @classmethod
    def parse(cls, text: str) -> KeyFrame:
        """``PATH[@FRAME]`` as the CLI takes it; without ``@FRAME`` the image conditions frame 0."""
        path, sep, frame = str(text).rpartition("@")
        if sep and path and frame.strip().lstrip("-").isdigit():
            return cls(path, int(frame))
        return cls(str(text), 0)


@dataclass(frozen=True)
class ControlSpec:
    kind: str  # one of CONTROL_KINDS
    keyframes: tuple[KeyFrame, ...] = ()  # SparseCtrl
    video: object | None = None  # ControlNet: a driving video (path) whose frames give the conditions
    strength: float = CONTROL_STRENGTH.default


@dataclass(frozen=True)
class Extras:
    loras: tuple[LoraSpec, ...] = ()
    free_init: bool = False
    fast: bool = False  # AnimateLCM: its motion adapter, LoRA and LCMScheduler, 4-8 steps
    control: ControlSpec | None = None

    def validate(self, num_frames: int) -> Extras:
        """A checked copy; a bad value raises InvalidRequestError with a sentence. Files are checked to
        exist here; whether they hold the right thing is checked when they load."""
        loras = tuple(replace(lora, weight=LORA_WEIGHT.check(lora.weight)) for lora in self.loras)
        for lora in loras:
            if not lora.source:
                raise InvalidRequestError("A LoRA needs a file path or a Hub id.")
        control = self.control
        if control is not None:
            control = _validate_control(control, num_frames)
        return replace(self, loras=loras, free_init=bool(self.free_init), fast=bool(self.fast), control=control)


def _validate_control(control: ControlSpec, num_frames: int) -> ControlSpec:
    if control.kind not in CONTROL_KINDS:
        raise InvalidRequestError(f"Unknown control {control.kind!r}; choose one of {', '.join(CONTROL_KINDS)}.")
    strength = CONTROL_STRENGTH.check(control.strength)
    if control.kind in SPARSE_KINDS:
        if not control.keyframes:
            raise InvalidRequestError(f"The {control.kind} control needs at least one control image.")
        for key in control.keyframes:
            if not 0 <= key.frame < num_frames:
                raise InvalidRequestError(
                    f"A control image is placed at frame {key.frame}, outside the video's frames 0-{num_frames - 1}."
                )
            if isinstance(key.image, (str, Path)) and not Path(key.image).is_file():
                raise InvalidRequestError(f"The control image {key.image} does not exist.")
    else:
        if control.video is None:
            raise InvalidRequestError(f"The {control.kind} control needs a driving video (--control-video).")
        if isinstance(control.video, (str, Path)) and not Path(control.video).is_file():
            raise InvalidRequestError(f"The control video {control.video} does not exist.")
    return replace(control, strength=strength)
