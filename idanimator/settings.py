"""Every generation default and limit, defined once: the library validates with them, the CLI's argparse
and the app's sliders are built from them, so the three can never disagree.

Defaults are the release's (`infer.py`: 16 frames, 30 DDIM steps, guidance 8, ID scale 0.8, 512x512, 9 fps).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .errors import InvalidRequestError
from .prompts import DEFAULT_NEGATIVE_PROMPT, clean_text


@dataclass(frozen=True)
class Limit:
    """One numeric setting: how it is named, its range, the widgets' step and its default."""

    label: str  # how messages, sliders and --help name it
    low: float
    high: float
    default: float | None
    step: float = 1
    whole: bool = True  # whole numbers only (frames, steps, sizes, seeds)

    def check(self, value) -> int | float:
        """``value`` as an int (whole) or float, or InvalidRequestError naming the setting and its range.

        Numbers typed into text fields or sent as JSON strings ("8") are read; 8.0 counts as whole, since
        widgets and JSON send floats.
        """
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise InvalidRequestError(f"{self.label} must be a number (got {value!r}).") from None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidRequestError(f"{self.label} must be a number between {self._range()} (got {value!r}).")
        if self.whole:
            if not float(value).is_integer():
                raise InvalidRequestError(
                    f"{self.label} must be a whole number between {self._range()} (got {value!r})."
                )
            value = int(value)
        else:
            value = float(value)
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise InvalidRequestError(f"{self.label} must be between {self._range()} (got {value!r}).")
        if self.whole and self.step > 1 and value % self.step:
            raise InvalidRequestError(f"{self.label} must be a multiple of {self.step:g} (got {value}).")
        return value

    def _range(self) -> str:
        return f"{self.low:g} and {self.high:g}"


MAX_SEED = 2**32 - 1

# The motion module's positional encoding holds 32 frames; longer videos are denoised in overlapping windows
# of 16 (FreeNoise, idanimator.extras.longvideo).
FRAMES = Limit("Frames", 1, 128, 16)
STEPS = Limit("Steps", 1, 100, 30)
GUIDANCE = Limit("Guidance scale", 1.0, 20.0, 8.0, step=0.5, whole=False)  # 1: no classifier-free guidance
ID_SCALE = Limit("ID scale", 0.0, 2.0, 0.8, step=0.05, whole=False)  # infer.py's 0.8 (its demo used 1.0)
HEIGHT = Limit("Height", 64, 1024, 512, step=8)  # latents are 1/8 of the image
WIDTH = Limit("Width", 64, 1024, 512, step=8)
FPS = Limit("Frames per second", 1, 60, 9)  # the release exports at 9 fps
SEED = Limit("Seed", 0, MAX_SEED, None)  # None: draw one (and report it)

OFFLOAD_MODES = ("none", "model", "sequential")  # where the models live between uses (see models.place_pipeline)

# Sizes a CPU renders in seconds with the tiny random kit (tiny mode's starting values).
TINY_DEFAULTS = {"num_frames": 8, "steps": 4, "height": 64, "width": 64}


def parse_seed(value) -> int | None:
    """The one reading of "random seed": None, "" and -1 mean draw one; anything else must be a valid seed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and value == -1:
        return None
    return SEED.check(value)


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


@dataclass
class GenerationSettings:
    """Everything that decides a video besides the faces; validated once, at the boundary."""

    prompt: str
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT
    num_frames: int = FRAMES.default
    steps: int = STEPS.default
    guidance_scale: float = GUIDANCE.default
    id_scale: float = ID_SCALE.default
    seed: int | None = None  # None (or -1, ""): draw one and report it
    height: int = HEIGHT.default
    width: int = WIDTH.default
    add_prompt_suffix: bool = True

    @classmethod
    def taken_from(cls, source) -> GenerationSettings:
        """The settings named like this class's fields, read from any object (a request, parsed arguments);
        fields it lacks keep their defaults. Not validated yet."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})

    def validate(self) -> GenerationSettings:
        """Return a checked copy; a bad value raises InvalidRequestError naming it and its range."""
        prompt = clean_text(self.prompt or "")
        if not prompt:
            raise InvalidRequestError("The prompt is empty: describe what the person should be doing.")
        return replace(
            self,
            prompt=prompt,
            negative_prompt=clean_text(self.negative_prompt or ""),
            num_frames=FRAMES.check(self.num_frames),
            steps=STEPS.check(self.steps),
            guidance_scale=GUIDANCE.check(self.guidance_scale),
            id_scale=ID_SCALE.check(self.id_scale),
            seed=parse_seed(self.seed),
            height=HEIGHT.check(self.height),
            width=WIDTH.check(self.width),
            add_prompt_suffix=bool(self.add_prompt_suffix),
        )

    def as_dict(self) -> dict:
        return asdict(self)
