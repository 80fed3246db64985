"""One generation request: every setting that decides a video besides the face photos, validated once.

The page, the CLI, generate's batch mode, the library's :class:`~idanimator.pipeline.IDAnimatorPipeline` and
the benchmarks all build a :class:`GenerationRequest` by field name; :meth:`GenerationRequest.validate` checks
every value with a sentence naming it and its range, and nothing downstream checks again. The release's
settings come first (its defaults, from ``infer.py``), then fps and the backbone, then the options beyond the
release (fast mode, FreeInit, style LoRAs, structure control), which :mod:`idanimator.extras` applies.
Requests are plain, picklable data: they cross to a ZeroGPU worker as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import InvalidRequestError
from .prompts import DEFAULT_NEGATIVE_PROMPT, clean_text
from .settings import (
    CONTROL_STRENGTH,
    FPS,
    FRAMES,
    GUIDANCE,
    HEIGHT,
    ID_SCALE,
    LORA_WEIGHT,
    STEPS,
    WIDTH,
    check_text,
    parse_seed,
)

SPARSE_KINDS = ("sparse-sketch", "sparse-rgb")  # SparseCtrl: keyframe images at chosen frames
VIDEO_KINDS = ("openpose", "depth", "canny")  # ControlNet: one condition frame per video frame
CONTROL_KINDS = SPARSE_KINDS + VIDEO_KINDS


@dataclass(frozen=True)
class LoraSpec:
    """A style LoRA for the backbone: a local file, a Hub id (``owner/repo`` or ``owner/repo/file``), or in
    the app a name the server offers."""

    source: str
    weight: float = LORA_WEIGHT.default

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
    """Structure control: SparseCtrl keyframes, or a ControlNet driven by a video's pose, depth or edges."""

    kind: str  # one of CONTROL_KINDS
    keyframes: tuple[KeyFrame, ...] = ()  # SparseCtrl
    video: object | None = None  # ControlNet: a driving video (path) whose frames give the conditions
    strength: float = CONTROL_STRENGTH.default


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides a video besides the face photos. Build it by name; :meth:`validate` once."""

    prompt: str
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT
    add_prompt_suffix: bool = True  # the release's quality words after the prompts
    num_frames: int = FRAMES.default
    num_inference_steps: int = STEPS.default
    guidance_scale: float = GUIDANCE.default
    id_scale: float = ID_SCALE.default
    seed: int | None = None  # None (or -1, ""): draw one and report it
    height: int = HEIGHT.default
    width: int = WIDTH.default
    fps: int = FPS.default
    backbone: str = ""  # a registry name, Hub id or local path ("": the default backbone)
    # Beyond the release (idanimator.extras):
    fast: bool = False  # AnimateLCM: its motion weights, LCM LoRA and scheduler (FAST_STEPS, FAST_GUIDANCE)
    free_init: bool = False
    loras: tuple[LoraSpec, ...] = ()
    control: ControlSpec | None = None
    _valid: bool = field(default=False, repr=False, compare=False)

    def validate(self) -> GenerationRequest:
        """A checked copy (the request itself if it was checked already); a bad value raises
        InvalidRequestError naming it and its range. Texts are measured before anything reads them; files
        are checked to exist (whether they hold the right thing is checked when they load)."""
        if self._valid:
            return self
        prompt = clean_text(check_text("The prompt", self.prompt))
        if not prompt:
            raise InvalidRequestError("The prompt is empty: describe what the person should be doing.")
        num_frames = FRAMES.check(self.num_frames)
        return replace(
            self,
            prompt=prompt,
            negative_prompt=clean_text(check_text("The negative prompt", self.negative_prompt)),
            add_prompt_suffix=bool(self.add_prompt_suffix),
            num_frames=num_frames,
            num_inference_steps=STEPS.check(self.num_inference_steps),
            guidance_scale=GUIDANCE.check(self.guidance_scale),
            id_scale=ID_SCALE.check(self.id_scale),
            seed=parse_seed(self.seed),
            height=HEIGHT.check(self.height),
            width=WIDTH.check(self.width),
            fps=FPS.check(self.fps),
            backbone=check_text("The backbone", self.backbone or "", 1000).strip(),
            fast=bool(self.fast),
            free_init=bool(self.free_init),
            loras=tuple(_checked_lora(lora) for lora in self.loras or ()),
            control=None if self.control is None else _checked_control(self.control, num_frames),
            _valid=True,
        )

    def replace(self, **changes) -> GenerationRequest:
        """A copy with ``changes`` (to be validated again)."""
        return replace(self, **changes, _valid=False)

    def settings(self) -> dict:
        """The settings as plain values (for a video's record and the page's history; control images and
        videos are named, not included)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        values["loras"] = [asdict(lora) for lora in self.loras]
        values["control"] = None if self.control is None else self.control.kind
        values["control_strength"] = None if self.control is None else self.control.strength
        return values


def _checked_lora(lora) -> LoraSpec:
    lora = lora if isinstance(lora, LoraSpec) else LoraSpec.parse(lora)
    source = check_text("A LoRA's name", str(lora.source or ""), 1000).strip()
    if not source:
        raise InvalidRequestError("A LoRA needs a file path or a Hub id.")
    return LoraSpec(source, LORA_WEIGHT.check(lora.weight))


def _checked_control(control: ControlSpec, num_frames: int) -> ControlSpec:
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
    return replace(control, keyframes=tuple(control.keyframes), strength=strength)
