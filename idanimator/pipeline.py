"""IDAnimatorPipeline: face photo(s) + prompt -> an identity-preserving video, in one forward pass.

It composes diffusers' AnimateDiffPipeline (whose UNet carries the face adapter, see
:mod:`idanimator.adapter`) and adds what the release's demo did around it: face detection and
alignment, identity mixing over several photos, the release's prompt defaults, seeds that are always
reported, step callbacks and a stop hook. Read top to bottom like a diffusers pipeline: ``check_inputs``,
``prepare_faces``, ``encode_faces``, then ``denoise`` and ``decode`` (public, so a caller can stream the
video while it is decoded).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import GenerationCancelled, InvalidRequestError
from .extras.control import structure_control
from .extras.control_models import ControlModels
from .extras.fast import AnimateLCMWeights, fast_mode
from .extras.freeinit import free_init
from .extras.longvideo import long_video
from .extras.loras import style_loras
from .prompts import NEGATIVE_PROMPT_SUFFIX, PROMPT_SUFFIX, exceeds_tokens
from .request import GenerationRequest
from .settings import draw_seed

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, latents)
DECODE_CHUNK = 8  # frames through the VAE at a time (diffusers' decode_chunk_size)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GenerationResult:
    """What a call gives back. ``frames`` follows diffusers' AnimateDiffPipelineOutput: a batch of videos, so
    ``frames[0]`` is the video (PIL images, a [frames, height, width, 3] array in [0, 1], a [frames, 3, height,
    width] tensor, or the latents, by ``output_type``); the rest is what this project adds."""

    frames: object | None
    seed: int
    request: GenerationRequest  # validated, with the seed that was drawn
    faces: list = field(default_factory=list)  # the FaceCrop of each photo (what the model saw)
    warnings: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None  # [1, 4, frames, h/8, w/8], from denoise() before decoding


class FaceFeatureCache:
    """CLIP features of aligned crops, by the crop's pixels (LRU). One cache can serve every backbone's
    pipeline: the image encoder is shared, so a face is encoded once per process."""

    def __init__(self, size: int = 64):
        self.size = size
        self.misses = 0  # how often the image encoder actually ran
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, image, encode: Callable[[object], torch.Tensor]) -> torch.Tensor:
        key = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
        if key not in self._items:
            self._items[key] = encode(image)
            self.misses += 1
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class IDAnimatorPipeline:
    """The ID-Animator model: an AnimateDiff pipeline with the face adapter, plus face handling.

    Build it with :meth:`from_pretrained`; call it with face photos and a prompt. ``pipe`` is the
    underlying diffusers pipeline.
    """

    def __init__(
        self,
        pipe,
        *,
        dtype: torch.dtype,
        detector=None,
        face_cache: FaceFeatureCache | None = None,
        control_models: ControlModels | None = None,
        fast_weights: AnimateLCMWeights | None = None,
    ):
        """``pipe``: the AnimateDiff pipeline with the face adapter (models.build_animatediff). The options'
        models come from ``control_models`` and ``fast_weights`` (a service shares its own between pipelines;
        by default the registry's, loaded on first use)."""
        self.pipe = pipe
        self.dtype = dtype
        self._detector = detector
        self.face_cache = face_cache if face_cache is not None else FaceFeatureCache()
        self.control_models = control_models if control_models is not None else ControlModels()
        self.fast_weights = fast_weights if fast_weights is not None else AnimateLCMWeights()
        self.default_id_scale: float | None = None  # set_ip_adapter_scale's, for calls that give none
        # The release's negative prompt is longer than CLIP's 77 tokens, and the tokenizer is told to cut it: its
        # "sequence length is longer" notice (printed by diffusers' own untruncated check) is not for our users.
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "deprecation_warnings"):
            tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True

    @classmethod
    def from_pretrained(
        cls,
        backbone: str | Path | None = None,
        *,
        face_adapter: str | Path | None = None,
        motion_adapter: str | Path | None = None,
        image_encoder: str | Path | None = None,
        base: str | Path | None = None,
        device: str | None = None,
        torch_dtype: torch.dtype | None = None,
        offload: str = "none",
        tiny: bool = False,
        detector=None,
        fast_weights: str | Path | None = None,
        control_models: dict[str, str | Path] | None = None,
    ) -> IDAnimatorPipeline:
        """Load every part (registry names, Hub ids or local paths; the release's by default).

        ``backbone``: a registry name (default: the release's Realistic Vision V6.0 B1), Hub id or local
        folder/file. ``tiny=True`` takes every part not given from the tiny random kit (built on first use).
        ``fast_weights``: a local AnimateLCM folder; ``control_models``: control kind -> its model's folder or Hub
        id (others: the registry's, or tiny mode's). ``torch_dtype`` as in diffusers (default: float16 on CUDA,
        float32 on the CPU).
        """
        from .models import build_animatediff, load_shared_parts
        from .tiny import load_options

        parts = dict(face_adapter=face_adapter, motion_adapter=motion_adapter, image_encoder=image_encoder, base=base)
        options = load_options(tiny=tiny, device=device, dtype=torch_dtype, offload=offload, **parts)
        pipe = build_animatediff(load_shared_parts(options), backbone)
        control = options.control_models or ControlModels()
        control.sources.update(control_models or {})
        return cls(
            pipe,
            dtype=options.dtype,
            detector=detector,
            control_models=control,
            fast_weights=AnimateLCMWeights(fast_weights if fast_weights is not None else options.fast_weights),
        )

    # -- as a diffusers pipeline: placement and memory, delegated to the wrapped AnimateDiffPipeline ------------

    def to(self, device=None, dtype: torch.dtype | None = None) -> IDAnimatorPipeline:
        self.pipe.to(device=device, dtype=dtype)
        self.dtype = dtype or self.dtype
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        self.pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=device or "cuda")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        self.pipe.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device or "cuda")

    def enable_vae_slicing(self) -> None:
        """The VAE decodes one image at a time (diffusers 0.42 keeps this on the VAE, not the pipeline)."""
        self.pipe.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.pipe.vae.disable_slicing()

    def set_ip_adapter_scale(self, scale: float) -> None:
        """The ID scale of the calls that give no ``id_scale`` (diffusers' name for the face attention's weight)."""
        self.default_id_scale = scale

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    # -- inputs ---------------------------------------------------------------------------------

    @property
    def detector(self):
        if self._detector is None:
            from .face import get_detector

            self._detector = get_detector("auto")
        return self._detector

    def prepare_faces(self, images: Sequence) -> list:
        """Detect, choose and align the face in each photo (what the model will see); FaceCrops pass through."""
        from .face import crop_face

        if not images:
            raise InvalidRequestError("Add at least one photo of a face.")
        return [crop_face(image, self.detector) for image in images]

    @torch.no_grad()
    def encode_faces(self, crops: Sequence) -> torch.Tensor:
        """CLIP penultimate features of the aligned crops, stacked [uncond, cond] as [2, N, seq, dim].

        The unconditional branch is CLIP of an all-zeros normalised image, as in the release.
        """

        def encode(image) -> torch.Tensor:
            cond, uncond = self.pipe.encode_image([image], self.pipe._execution_device, 1, output_hidden_states=True)
            return torch.stack([uncond[0], cond[0]]).cpu()

        return torch.stack([self.face_cache.get(getattr(c, "image", c), encode) for c in crops], dim=1)

    # -- generation -----------------------------------------------------------------------------

    def __call__(
        self,
        face_images: Sequence | object | None = None,
        prompt: str | None = None,
        *,
        ip_adapter_image: Sequence | object | None = None,
        request: GenerationRequest | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        decode_chunk_size: int = DECODE_CHUNK,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        **settings,
    ) -> GenerationResult | tuple:
        """Make one video, with diffusers' names where diffusers has one.

        ``face_images`` (or diffusers' ``ip_adapter_image``): one or more photos (paths, PIL images, arrays) or
        prepared FaceCrops; several photos of one person are mixed. The rest is a
        :class:`~idanimator.request.GenerationRequest`, given whole as ``request`` or by its fields
        (``prompt``, ``negative_prompt``, ``num_frames``, ``num_inference_steps``, ``guidance_scale``,
        ``height``, ``width``, ``id_scale``, ``seed``, ``fast``, ...). ``generator``: a torch.Generator (or a
        list of one) instead of ``seed``; either way the seed used is reported. ``callback_on_step_end(pipe,
        step, timestep, callback_kwargs)`` as in diffusers; ``callback(step, total, latents)`` is this project's
        simpler one; ``should_stop()`` is asked before every step and ends the run with GenerationCancelled.
        ``output_type``: "pil" (default), "np", "pt" or "latent"; ``return_dict=False`` gives ``(frames,)``.
        """
        faces = face_images if face_images is not None else ip_adapter_image
        if faces is None:
            raise InvalidRequestError("Give the face photo(s) as face_images (or ip_adapter_image).")
        if output_type not in OUTPUT_TYPES:
            raise InvalidRequestError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (got {output_type!r}).")
        if request is None:
            if "id_scale" not in settings and self.default_id_scale is not None:
                settings["id_scale"] = self.default_id_scale
            try:
                request = GenerationRequest(prompt=prompt, **settings)
            except TypeError as exc:  # an argument that is no setting
                raise InvalidRequestError(f"Unknown setting: {exc}.") from None
        elif prompt is not None or settings:
            raise InvalidRequestError("Give the settings either as a request or by name, not both.")
        faces = list(faces) if isinstance(faces, (list, tuple)) else [faces]
        request = request.validate()
        crops = self.prepare_faces(faces)
        result = self.denoise(
            crops,
            request,
            generator=generator,
            callback=callback,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            should_stop=should_stop,
        )
        if output_type != "latent":
            result.frames, result.latents = self._video(result.latents, output_type, decode_chunk_size), None
        else:
            result.frames = result.latents
        return result if return_dict else (result.frames,)

    @torch.no_grad()
    def _video(self, latents: torch.Tensor, output_type: str, decode_chunk_size: int):
        """A batch of one video in diffusers' layout for ``output_type`` (pil, np, pt)."""
        try:
            video = self.pipe.decode_latents(latents, decode_chunk_size=decode_chunk_size)
            return self.pipe.video_processor.postprocess_video(video=video, output_type=output_type)
        finally:
            self.pipe.maybe_free_model_hooks()

    def denoise(
        self,
        crops: Sequence,
        request: GenerationRequest,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback: StepCallback | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """The denoising loop only, from aligned crops and a request (validated here if it was not yet); the
        result holds ``latents`` (decode them with :meth:`decode`, all at once or a few frames at a time)."""
        request = request.validate()  # the request itself when the caller validated it
        if should_stop is not None and should_stop():  # stopped while waiting in a queue
            raise GenerationCancelled("Generation was stopped.")
        warnings = [w for crop in crops for w in getattr(crop, "warnings", [])]
        prompt, negative = self._final_prompts(request, warnings)
        device = self.pipe._execution_device
        if generator is not None:  # the caller's random numbers; its seed is reported
            seed = (generator[0] if isinstance(generator, (list, tuple)) else generator).initial_seed()
        else:
            seed = draw_seed() if request.seed is None else request.seed
            generator = torch.Generator(device=device).manual_seed(seed)
        embeds = self.encode_faces(crops)
        if request.guidance_scale <= 1.0:
            embeds = embeds[1:]  # no classifier-free guidance: the conditional half only
        self.pipe.set_ip_adapter_scale(request.id_scale)

        def on_step_end(pipe, step, timestep, tensors):
            if should_stop is not None and should_stop():
                raise GenerationCancelled("Generation was stopped.")
            if callback_on_step_end is not None:
                tensors = {**tensors, **(callback_on_step_end(pipe, step, timestep, tensors) or {})}
            if callback is not None:
                callback(step, request.num_inference_steps, tensors["latents"])
            return tensors

        arguments = dict(
            prompt=prompt,
            negative_prompt=negative or None,
            num_frames=request.num_frames,
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            ip_adapter_image_embeds=[embeds.to(device=device, dtype=self.dtype)],
            output_type="latent",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=sorted({"latents", *callback_on_step_end_tensor_inputs}),
        )
        try:
            # The options beyond the release, put on in this order for this call and taken off after, error or
            # not, so the cached pipeline is the same for the next request (idanimator.extras, one module each).
            with ExitStack() as options:
                options.enter_context(fast_mode(self.pipe, request, self.fast_weights))
                pipe, arguments = options.enter_context(
                    structure_control(self.pipe, request, self.control_models, arguments)
                )  # the control's own pipeline on the same modules, or the AnimateDiff one itself
                options.enter_context(style_loras(self.pipe, request.loras))
                arguments = options.enter_context(free_init(pipe, request, arguments))
                options.enter_context(long_video(pipe, request.num_frames))
                output = pipe(**arguments)
        finally:
            self.pipe.maybe_free_model_hooks()
        used = replace(request, seed=seed)  # still valid: a drawn seed is in range
        return GenerationResult(
            frames=None, latents=output.frames, seed=seed, request=used, faces=list(crops), warnings=warnings
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start:stop`` of denoised latents as [frames, height, width, 3] float32 in [0, 1] (one video,
        not a batch: what the writers take; stream a long video a few frames at a time)."""
        return np.asarray(self._video(latents[:, :, start:stop], "np", DECODE_CHUNK)[0], dtype=np.float32)

    def _final_prompts(self, request: GenerationRequest, warnings: list[str]) -> tuple[str, str]:
        prompt = request.prompt + (PROMPT_SUFFIX if request.add_prompt_suffix else "")
        negative = request.negative_prompt or ""
        if request.add_prompt_suffix:
            negative = (negative + NEGATIVE_PROMPT_SUFFIX).strip()
        if exceeds_tokens(prompt, self.pipe.tokenizer):  # the release's own negative prompt is longer: no warning
            warnings.append("The prompt is longer than the text encoder's 77 tokens; the end is left out.")
        return prompt, negative
