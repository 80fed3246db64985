"""Structure control for one call: SparseCtrl keyframes, or a ControlNet steering every frame, face adapter on.

The call's AnimateDiff pipeline is swapped, for this request only, for diffusers' control pipeline of the kind
(:class:`AnimateDiffSparseControlNetPipeline` or :class:`AnimateDiffControlNetPipeline`) built with its
constructor on the called pipeline's own modules plus the control model: nothing is copied, and nothing is put
on the shared modules (``from_pipe`` is not used: it casts every module to float32 unless told the dtype). Both
pipelines hand ``ip_adapter_image_embeds`` to the UNet as AnimateDiffPipeline does, so the face tokens reach
every spatial cross-attention next to the control residuals; the control model sees the text only, as in
diffusers and the original SparseCtrl. Strength 0 asks for no control at all, so nothing is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AnimateDiffControlNetPipeline, AnimateDiffSparseControlNetPipeline

from ..errors import InvalidRequestError
from .conditions import condition_frames
from .control_models import control_models_for
from .spec import SPARSE_KINDS, ControlSpec, Extras


class SparseControlPipeline(AnimateDiffSparseControlNetPipeline):
    """diffusers' SparseCtrl pipeline, except that RGB keyframes are encoded to the VAE posterior's mode rather
    than a draw from the global random generator (the original samples), so one seed gives one video."""

    def prepare_image(self, image, width, height, device, dtype):
        if not self.controlnet.use_simplified_condition_embedding:
            return super().prepare_image(image, width, height, device, dtype)
        pixels = self.control_image_processor.preprocess(image, height=height, width=width).to(device, dtype)
        latents = self.vae.encode(2 * pixels - 1).latent_dist.mode() * self.vae.config.scaling_factor
        return latents.unsqueeze(0).permute(0, 2, 1, 3, 4)  # [1, channels, keyframes, h, w]


def control_pipeline(pipe, kind: str, controlnet: torch.nn.Module):
    """A control pipeline of ``kind`` on ``pipe``'s own modules (an AnimateDiff pipeline) and ``controlnet``."""
    cls = SparseControlPipeline if kind in SPARSE_KINDS else AnimateDiffControlNetPipeline
    control = cls(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return control


def control_arguments(spec: ControlSpec, num_frames: int, size: tuple[int, int]) -> dict:
    """The control pipeline's own arguments for a validated ``spec``; ``size`` is (height, width)."""
    conditions = condition_frames(spec, num_frames, size)
    arguments = dict(conditioning_frames=conditions.images, controlnet_conditioning_scale=float(spec.strength))
    if spec.kind in SPARSE_KINDS:
        arguments["controlnet_frame_indices"] = conditions.frames
    return arguments


@contextmanager
def applied(pipeline, settings, extras: Extras, call) -> Iterator:
    """Run ``call`` through the control pipeline of ``extras.control`` (a no-op without control)."""
    spec = extras.control
    if spec is None or spec.strength == 0:
        yield call
        return
    arguments = control_arguments(spec, settings.num_frames, (settings.height, settings.width))
    base = call.pipe
    controlnet = control_models_for(pipeline).get(spec.kind, base._execution_device, base.unet.dtype)
    control = control_pipeline(base, spec.kind, controlnet)
    accepted = inspect.signature(type(control).__call__).parameters
    refused = sorted(set(call.kwargs) - set(accepted))
    if refused:
        raise InvalidRequestError(f"The {spec.kind} control cannot be combined with {refused[0]}.")
    before = {name: call.kwargs[name] for name in arguments if name in call.kwargs}
    call.pipe = control
    call.kwargs.update(arguments)
    try:
        yield call
    finally:
        call.pipe = base
        for name in arguments:
            call.kwargs.pop(name, None)
        call.kwargs.update(before)
