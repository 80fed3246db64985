"""Every generation default and limit, defined once: the library validates with them, the CLI's argparse
and the app's sliders are built from them, so the three can never disagree.

Defaults are the release's (`infer.py`: 16 frames, 30 DDIM steps, guidance 8, ID scale 0.8, 512x512, 9 fps).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequestError


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
        def shown(bound: float) -> str:  # whole numbers in full (4294967295, not 4.29497e+09)
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        return f"{shown(self.low)} and {shown(self.high)}"


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
# Beyond the release (idanimator.extras):
LORA_WEIGHT = Limit("A LoRA's weight", -2.0, 2.0, 1.0, step=0.05, whole=False)
CONTROL_STRENGTH = Limit("The control strength", 0.0, 2.0, 1.0, step=0.05, whole=False)
# The fast mode's own defaults (AnimateLCM: 4-8 LCM steps, guidance 1-2), used where a request sets none.
FAST_STEPS = 6
FAST_GUIDANCE = 1.5

# Text a request may carry, in characters, checked before anything reads it (cleaning, tokenising): CLIP sees
# 77 tokens, so even a long prompt is a few hundred characters; a megabyte of text is an attack, not a prompt.
MAX_TEXT_CHARS = 4000

OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass(frozen=True)
class ServingLimits:
    """What one request or one visitor of a served page may ask for (app.py's --max-* and --queue-size flags),
    so that no visitor can hold the server for long. The defaults suit a public Space; the library and the CLI
    have none of these caps (their user owns the machine)."""

    max_frames: int = 64
    max_steps: int = 50
    max_work: float = 12.0  # denoising work, in multiples of the release's default request (see check)
    jobs_per_visitor: int = 2  # waiting or running at once
    queue_size: int = 16  # requests waiting, all visitors together

    def check(self, num_frames: int, steps: int, work_ratio: float) -> None:
        """InvalidRequestError naming the first cap a request exceeds. ``work_ratio``: its denoising work over
        that of the release's default request (16 frames, 30 steps, 512x512, guidance 8; FreeInit's passes
        and long videos' windows counted)."""
        if num_frames > self.max_frames:
            raise InvalidRequestError(
                f"This server makes videos of at most {self.max_frames} frames (asked: {num_frames})."
            )
        if steps > self.max_steps:
            raise InvalidRequestError(f"This server runs at most {self.max_steps} steps (asked: {steps}).")
        if work_ratio > self.max_work + 1e-9:
            raise InvalidRequestError(
                f"This request is {work_ratio:.1f} times the work of a default video and this server takes at most "
                f"{self.max_work:g} times: use fewer frames or steps, a smaller size, or no FreeInit."
            )  # where the models live between uses (see models.place_pipeline)


# Sizes a CPU renders in seconds with the tiny random kit (tiny mode's starting values).
TINY_DEFAULTS = {"num_frames": 8, "num_inference_steps": 4, "height": 64, "width": 64}


def parse_seed(value) -> int | None:
    """The one reading of "random seed": None, "" and -1 mean draw one; anything else must be a valid seed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and value == -1:
        return None
    return SEED.check(value)


def check_text(label: str, text, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` ("" for None) if it is a string of at most ``limit`` characters; else one sentence naming it."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{label} must be text (got {type(text).__name__}).")
    if len(text) > limit:
        raise InvalidRequestError(
            f"{label} is {len(text):,} characters long; at most {limit:,} are accepted "
            "(the model reads about 60 words)."
        )
    return text


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


# -- Reading videos (idanimator.video) -----------------------------------------------------------------------
# Both are checked from the file's header before any frame is decoded. A frame may have at most this many
# pixels at the source: every 4K format fits (3840x2160, 4096x2160), 8K does not; ffmpeg's decoder is given the
# same cap (-max_pixels), so a file whose header lies cannot decode a larger frame either.
MAX_SOURCE_PIXELS = 4096 * 4096
# Pixels one read may hand back (frames x width x height at the decoded size, after any downscaling in the
# decoder): the largest video the product generates (128 frames of 1024x1024, 400 MB as RGB), which also
# holds a training window of 16 frames of 4K footage. Reads that stream frames one at a time have no such cap.
MAX_DECODED_PIXELS = FRAMES.high * HEIGHT.high * WIDTH.high
