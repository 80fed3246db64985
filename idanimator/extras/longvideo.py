"""Videos longer than the motion module's window, what they cost, and decoding them a few frames at a time.

The motion module's positional encoding holds ``motion_max_seq_length`` frames (32 for AnimateDiff v2). A longer
video turns on diffusers' FreeNoise (arXiv 2310.15169) for the call: the temporal transformers attend within
sliding windows of CONTEXT_LENGTH frames, CONTEXT_STRIDE apart, blended with pyramid weights, and the initial
noise repeats shuffled across windows. Only the temporal transformer blocks are windowed: the spatial
cross-attention, where the face tokens enter, still sees every frame, and the motion modules' per-frame
GroupNorms (``models.PerFrameGroupNorm``) are not touched.

Memory: diffusers' split inference runs the spatial layers TEMPORAL_SPLIT frames at a time and the temporal
layers SPATIAL_SPLIT positions at a time, so the UNet's working memory no longer grows with every layer's
activations for all frames. Its spatial-transformer wrapper passes a tuple ``encoder_hidden_states`` whole,
which the face adapter uses (text, face tokens), so those wrappers are swapped for :class:`FaceSplitInference`.

Everything is undone on exit: split wrappers unwrapped, FreeNoise blocks replaced by plain ones with the same
weights (diffusers' ``disable_free_noise``), so the next request runs the same modules' computation as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.pipelines.free_noise_utils import SplitInferenceModule

from ..errors import InvalidRequestError
from . import freeinit

CONTEXT_LENGTH = 16  # frames per window: what AnimateDiff v2 was trained on
CONTEXT_STRIDE = 4
WEIGHTING = "pyramid"
SPATIAL_SPLIT = 256  # diffusers' defaults for enable_free_noise_split_inference
TEMPORAL_SPLIT = 16
# The share of the UNet's work that FreeNoise repeats per window: the temporal attention layers (FreeNoise runs
# attn1/attn2 of each temporal block per window, its feed-forward once). FLOPs counted with torch's
# FlopCounterMode on the meta device, SD1.5 + AnimateDiff v2 at 512x512, 16 frames: 10.1% (all motion modules:
# 27.6%; the whole UNet: 1.11 TFLOP per frame and guidance branch).
WINDOWED_SHARE = 0.10
REFERENCE_PIXELS = 512 * 512


def window(unet) -> int:
    """The most frames the motion module takes at once."""
    return int(unet.config.motion_max_seq_length)


def needs_windows(unet, num_frames: int) -> bool:
    return num_frames > window(unet)


@contextmanager
def long_video(pipe, num_frames: int) -> Iterator[None]:
    """FreeNoise windows on ``pipe`` (the pipeline that runs) for a video longer than the motion module's window."""
    if not needs_windows(pipe.unet, num_frames):
        yield
        return
    if not hasattr(pipe, "enable_free_noise"):  # diffusers' SparseCtrl pipeline has no context windows
        raise InvalidRequestError(
            f"Videos over {window(pipe.unet)} frames cannot be combined with this control; make it shorter."
        )
    try:
        _without_offload_hooks(pipe, lambda: _enable(pipe))
        yield
    finally:
        _without_offload_hooks(pipe, lambda: _disable(pipe))


def _enable(pipe) -> None:
    adapter = pipe.motion_adapter
    if adapter is None:  # enable_free_noise reads the motion adapter's config; ours is folded into the UNet
        pipe.motion_adapter = SimpleNamespace(config=pipe.unet.config)
    try:
        pipe.enable_free_noise(
            context_length=min(CONTEXT_LENGTH, window(pipe.unet)),
            context_stride=CONTEXT_STRIDE,
            weighting_scheme=WEIGHTING,
        )
    finally:
        pipe.motion_adapter = adapter
    pipe.enable_free_noise_split_inference(spatial_split_size=SPATIAL_SPLIT, temporal_split_size=TEMPORAL_SPLIT)
    for block in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]:
        for attention in getattr(block, "attentions", None) or []:
            if type(attention) is SplitInferenceModule:
                attention.__class__ = FaceSplitInference


def _disable(pipe) -> None:
    for module in list(pipe.unet.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SplitInferenceModule):
                setattr(module, name, child.module)
    if pipe.free_noise_enabled or _has_free_noise_blocks(pipe.unet):
        pipe.disable_free_noise()


def _has_free_noise_blocks(unet) -> bool:
    from diffusers.models.attention import FreeNoiseTransformerBlock

    return any(isinstance(module, FreeNoiseTransformerBlock) for module in unet.modules())


def _without_offload_hooks(pipe, change) -> None:
    """Run ``change`` (which replaces UNet modules) with accelerate's offload hooks off and back on after, as
    diffusers does around LoRA loading: sequentially offloaded weights wait on the meta device, and new modules
    would have no hooks."""
    model_offload, sequential, _ = pipe._optionally_disable_offloading(pipe)
    try:
        change()
    finally:
        if sequential:
            pipe.enable_sequential_cpu_offload()
        elif model_offload:
            pipe.enable_model_cpu_offload()


class FaceSplitInference(SplitInferenceModule):
    """diffusers' split inference for a spatial transformer, also splitting the face adapter's
    ``(text states, [face tokens])`` pair, whose rows are frames like the hidden states'."""

    def forward(self, *args, **kwargs):
        states = kwargs.get("encoder_hidden_states")
        if not isinstance(states, tuple):
            return super().forward(*args, **kwargs)
        hidden = kwargs.pop("hidden_states")
        text, faces = kwargs.pop("encoder_hidden_states")
        outputs = []
        for start in range(0, hidden.shape[0], self.split_size):
            rows = slice(start, start + self.split_size)
            pair = (text[rows], [tokens[rows] for tokens in faces])
            outputs.append(self.module(*args, hidden_states=hidden[rows], encoder_hidden_states=pair, **kwargs))
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts, dim=0) for parts in zip(*outputs, strict=True))
        return torch.cat(outputs, dim=0)


# -- decoding and estimates --------------------------------------------------------------------------------


def decode_in_chunks(pipeline, latents: torch.Tensor, chunk: int = 8) -> Iterator[np.ndarray]:
    """The video's frames ``chunk`` at a time ([n, height, width, 3] float32 in [0, 1]), decoded only when the
    consumer asks for them, so memory holds one chunk of pixels however long the video is."""
    frames = latents.shape[2]
    for start in range(0, frames, chunk):
        yield pipeline.decode(latents, start, min(start + chunk, frames))


def unet_frames(num_frames: int, max_frames: int = 32) -> float:
    """The frames' worth of UNet work one denoising step does: ``num_frames`` up to the window; beyond it, the
    temporal attention (WINDOWED_SHARE of the work) runs once per FreeNoise window of CONTEXT_LENGTH frames."""
    if num_frames <= max_frames:
        return float(num_frames)
    length = min(CONTEXT_LENGTH, max_frames)
    starts = list(range(0, num_frames - length + 1, CONTEXT_STRIDE))
    windows = len(starts) + (starts[-1] + length != num_frames)
    return num_frames * (1 - WINDOWED_SHARE) + windows * length * WINDOWED_SHARE


def work_units(request, max_frames: int = 32) -> float:
    """A request's denoising work in UNet evaluations of one 512x512 frame for one guidance branch: steps x
    FreeInit passes x (2 with classifier-free guidance) x :func:`unet_frames` x pixels / 512^2. Decoding is not
    included (about one UNet evaluation per frame, once)."""
    branches = 2 if request.guidance_scale > 1 else 1
    pixels = request.height * request.width / REFERENCE_PIXELS
    steps = request.num_inference_steps * freeinit.passes(request)
    return steps * branches * unet_frames(request.num_frames, max_frames) * pixels


def estimate_seconds(request, seconds_per_frame_step: float, max_frames: int = 32) -> float:
    """Seconds the denoising of a request should take, before it runs.

    ``seconds_per_frame_step``: one unit of :func:`work_units` on this machine (measure it once: a plain run's
    denoising seconds / its work units).
    """
    return seconds_per_frame_step * work_units(request, max_frames)
