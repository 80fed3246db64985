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
from ..request import SPARSE_KINDS, ControlSpec
from .conditions import condition_frames
from .control_models import ControlModels


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
def structure_control(pipe, request, models: ControlModels, arguments: dict) -> Iterator[tuple[object, dict]]:
    """The pipeline to call and its arguments under ``request.control``: diffusers' control pipeline of the kind
    on ``pipe``'s own modules, with the control's arguments added (``pipe`` and ``arguments`` as they are without
    control, or at strength 0). Nothing to undo after: ``pipe`` itself is not changed."""
    spec = request.control
    if spec is None or spec.strength == 0:
        yield pipe, arguments
        return
    added = control_arguments(spec, request.num_frames, (request.height, request.width))
    controlnet = models.get(spec.kind, pipe._execution_device, pipe.unet.dtype)
    control = control_pipeline(pipe, spec.kind, controlnet)
    accepted = inspect.signature(type(control).__call__).parameters
    refused = sorted(set(arguments) - set(accepted))
    if refused:
        raise InvalidRequestError(f"The {spec.kind} control cannot be combined with {refused[0]}.")
    yield control, {**arguments, **added}
