"""IDAnimatorPipeline: face photo(s) + prompt -> an identity-preserving video, in one forward pass.

It wraps diffusers' AnimateDiffPipeline (whose UNet carries the face adapter, see
:mod:`idanimator.adapter`) and adds what the release's demo did around it: face detection and
alignment, identity mixing over several photos, the release's prompt defaults, seeds that are always
reported, progress callbacks and cancellation.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import registry
from .adapter import set_id_scale
from .errors import IDAnimatorError, InvalidRequestError
from .prompts import DEFAULT_NEGATIVE_PROMPT, NEGATIVE_PROMPT_SUFFIX, PROMPT_SUFFIX, clean_text, fit_to_tokens

MAX_SEED = 2**32 - 1
MAX_FRAMES = 32  # the motion module's positional encoding holds 32 frames


class GenerationCancelled(IDAnimatorError):
    """The caller asked to stop; raised at the next denoising step."""


@dataclass
class GenerationSettings:
    """Everything that decides a video besides the faces; validated once, at the boundary."""

    prompt: str
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT
    num_frames: int = 16
    steps: int = 30
    guidance_scale: float = 8.0
    id_scale: float = 0.8
    seed: int | None = None  # None or -1: draw one (and report it)
    height: int = 512
    width: int = 512
    add_prompt_suffix: bool = True

    def validate(self) -> GenerationSettings:
        """Return a checked copy; a bad value raises InvalidRequestError naming it and its range."""
        prompt = clean_text(self.prompt or "")
        if not prompt:
            raise InvalidRequestError("The prompt is empty: describe what the person should be doing.")
        negative = clean_text(self.negative_prompt or "")
        frames = whole_number("Frames", self.num_frames, 1, MAX_FRAMES)
        steps = whole_number("Steps", self.steps, 1, 200)
        height, width = (
            whole_number(name, value, 64, 1024) for name, value in (("Height", self.height), ("Width", self.width))
        )
        for name, value in (("Height", height), ("Width", width)):
            if value % 8:
                raise InvalidRequestError(f"{name} must be a multiple of 8 (got {value}).")
        _check_float("Guidance scale", self.guidance_scale, 0.0, 30.0)
        _check_float("ID scale", self.id_scale, 0.0, 2.0)
        seed = self.seed
        if seed is not None and seed != -1:
            seed = whole_number("Seed", seed, 0, MAX_SEED)
        return GenerationSettings(
            **{
                **asdict(self),
                "num_frames": frames,
                "steps": steps,
                "height": height,
                "width": width,
                "seed": seed,
                "prompt": prompt,
                "negative_prompt": negative,
                "guidance_scale": float(self.guidance_scale),
                "id_scale": float(self.id_scale),
            }
        )


def whole_number(name: str, value, low: int, high: int) -> int:
    """A whole-number setting in [low, high] as an int; 8.0 is accepted (widgets and JSON send floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequestError(f"{name} must be a whole number between {low} and {high} (got {value!r}).")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high} (got {value}).")
    return int(value)


def _check_float(name: str, value, low: float, high: float) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{name} must be a number between {low} and {high} (got {value!r}).") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high} (got {value!r}).")


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


@dataclass
class GenerationResult:
    frames: np.ndarray | None  # [frames, height, width, 3] float32 in [0, 1]
    seed: int
    settings: GenerationSettings
    faces: list = field(default_factory=list)  # the FaceCrop of each photo (what the model saw)
    warnings: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None  # [1, 4, frames, h/8, w/8], from denoise() before decoding


StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, latents)


class IDAnimatorPipeline:
    """The ID-Animator model: an AnimateDiff pipeline with the face adapter, plus face handling.

    Build it with :meth:`from_pretrained` (or :func:`load_pipeline`); call it with face photos and a
    prompt. Attribute ``pipe`` is the underlying diffusers pipeline.
    """

    def __init__(
        self,
        pipe,
        *,
        device: str,
        dtype: torch.dtype,
        offload: str = "none",
        detector=None,
        face_cache: OrderedDict | None = None,
        face_cache_size: int = 32,
        backbone: str = "",
    ):
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.offload = offload
        self.backbone = backbone
        self._detector = detector
        self._face_cache: OrderedDict[str, torch.Tensor] = OrderedDict() if face_cache is None else face_cache
        self._face_cache_size = face_cache_size
        self.face_encoder_calls = 0  # how often the image encoder actually ran (the cache is observable)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        backbone: str | Path = registry.DEFAULT_BACKBONE,
        *,
        face_adapter: str | Path | None = None,
        motion_adapter: str | Path | None = None,
        image_encoder: str | Path | None = None,
        base: str | Path | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        offload: str = "none",
        tiny: bool = False,
        detector=None,
        allow_hub_ids: bool = True,
    ) -> IDAnimatorPipeline:
        """Load every part (registry names, Hub ids or local paths), with the release's defaults.

        ``tiny=True`` uses the tiny random kit (built on first use) for every part not given.
        """
        from .loader import LoadOptions, ModelStore

        options = LoadOptions.for_device(
            device,
            dtype,
            offload=offload,
            tiny=tiny,
            face_adapter=face_adapter,
            motion_adapter=motion_adapter,
            image_encoder=image_encoder,
            base=base,
            allow_hub_ids=allow_hub_ids,
        )
        return ModelStore(options, detector=detector).build(backbone)

    # -- faces ----------------------------------------------------------------------------------

    @property
    def detector(self):
        if self._detector is None:
            from .face import get_detector

            self._detector = get_detector("auto")
        return self._detector

    def prepare_faces(self, images: Sequence) -> list:
        """Detect, choose and align the face in each photo (what the model will see)."""
        from .face import crop_face

        if not images:
            raise InvalidRequestError("Add at least one photo of a face.")
        return [crop_face(image, self.detector) for image in images]

    @torch.no_grad()
    def encode_faces(self, crops: Sequence) -> torch.Tensor:
        """CLIP penultimate features of the aligned crops, stacked [uncond, cond] as [2, N, seq, dim].

        The unconditional branch is CLIP of an all-zeros normalised image, as in the release. Results are
        cached by the crop's pixels, so a repeated face skips the image encoder.
        """
        rows = []
        for crop in crops:
            image = getattr(crop, "image", crop)
            key = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
            if key not in self._face_cache:
                device = self.pipe._execution_device
                cond, uncond = self.pipe.encode_image([image], device, 1, output_hidden_states=True)
                self.face_encoder_calls += 1
                self._face_cache[key] = torch.stack([uncond[0], cond[0]]).cpu()
                if len(self._face_cache) > self._face_cache_size:
                    self._face_cache.popitem(last=False)
            self._face_cache.move_to_end(key)
            rows.append(self._face_cache[key])
        return torch.stack(rows, dim=1)

    # -- generation -----------------------------------------------------------------------------

    def __call__(
        self,
        face_images: Sequence,
        prompt: str,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        *,
        num_frames: int = 16,
        steps: int = 30,
        guidance_scale: float = 8.0,
        id_scale: float = 0.8,
        seed: int | None = None,
        height: int = 512,
        width: int = 512,
        add_prompt_suffix: bool = True,
        callback: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Make one video. ``face_images`` are photos (paths, PIL images, arrays) or prepared FaceCrops."""
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_frames=num_frames,
            steps=steps,
            guidance_scale=guidance_scale,
            id_scale=id_scale,
            seed=seed,
            height=height,
            width=width,
            add_prompt_suffix=add_prompt_suffix,
        ).validate()
        from .face import FaceCrop

        images = list(face_images) if isinstance(face_images, (list, tuple)) else [face_images]
        crops = [c for c in images if isinstance(c, FaceCrop)]
        if len(crops) != len(images):
            crops = self.prepare_faces(images)
        return self.generate(crops, settings, callback=callback, should_stop=should_stop)

    def generate(
        self,
        crops: Sequence,
        settings: GenerationSettings,
        *,
        callback: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Make one video from prepared face crops and validated settings."""
        result = self.denoise(crops, settings, callback=callback, should_stop=should_stop)
        result.frames = self.decode(result.latents)
        result.latents = None
        return result

    def denoise(
        self,
        crops: Sequence,
        settings: GenerationSettings,
        *,
        callback: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Run the denoising loop only; the result holds ``latents`` (decode them with :meth:`decode`,
        all at once or a few frames at a time, e.g. to stream the video as it is decoded)."""
        if should_stop is not None and should_stop():  # stopped while waiting in a queue
            raise GenerationCancelled("Generation was stopped.")
        warnings = [w for crop in crops for w in getattr(crop, "warnings", [])]
        prompt, negative = self._final_prompts(settings, warnings)
        seed = draw_seed() if settings.seed in (None, -1) else int(settings.seed)
        device = self.pipe._execution_device
        generator = torch.Generator(device=device).manual_seed(seed)
        embeds = self.encode_faces(crops)
        if settings.guidance_scale <= 1.0:
            embeds = embeds[1:]  # no classifier-free guidance: the conditional half only
        set_id_scale(self.pipe.unet, settings.id_scale)

        def on_step_end(pipe, step, timestep, tensors):
            if should_stop is not None and should_stop():
                raise GenerationCancelled("Generation was stopped.")
            if callback is not None:
                callback(step, settings.steps, tensors["latents"])
            return tensors

        try:
            output = self.pipe(
                prompt=prompt,
                negative_prompt=negative or None,
                num_frames=settings.num_frames,
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=generator,
                ip_adapter_image_embeds=[embeds.to(device=device, dtype=self.dtype)],
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
        finally:
            self.pipe.maybe_free_model_hooks()
        return GenerationResult(
            frames=None, latents=output.frames, seed=seed, settings=settings, faces=list(crops), warnings=warnings
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start:stop`` of denoised latents as [frames, height, width, 3] float32 in [0, 1]."""
        chunk = latents[:, :, start:stop]
        try:
            video = self.pipe.decode_latents(chunk, decode_chunk_size=8)
            frames = self.pipe.video_processor.postprocess_video(video=video, output_type="np")
        finally:
            self.pipe.maybe_free_model_hooks()
        return np.asarray(frames[0], dtype=np.float32)

    def _final_prompts(self, settings: GenerationSettings, warnings: list[str]) -> tuple[str, str]:
        prompt = settings.prompt + (PROMPT_SUFFIX if settings.add_prompt_suffix else "")
        negative = settings.negative_prompt or ""
        if settings.add_prompt_suffix:
            negative = (negative + NEGATIVE_PROMPT_SUFFIX).strip()
        tokenizer = self.pipe.tokenizer
        prompt, cut = fit_to_tokens(prompt, tokenizer)
        if cut:
            warnings.append("The prompt is longer than the text encoder's 77 tokens; the end was cut off.")
        negative, _ = fit_to_tokens(negative, tokenizer)  # the release's own default is longer: no warning
        return prompt, negative


def load_pipeline(backbone: str | Path = registry.DEFAULT_BACKBONE, **kwargs) -> IDAnimatorPipeline:
    """Shorthand for :meth:`IDAnimatorPipeline.from_pretrained`."""
    return IDAnimatorPipeline.from_pretrained(backbone, **kwargs)
