"""The frozen models of a training run, loaded through the same code as inference's.

The motion UNet is the inference one (SD1.5 backbone + AnimateDiff motion modules with per-frame norms)
without a face adapter; the noise schedule is the one the inference pipeline samples with (the release's
DDIM betas, linear 0.00085-0.012 over 1000 steps, which AnimateDiff's motion modules were trained with),
read as a DDPM schedule for adding noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import registry
from ..models import (
    LoadOptions,
    load_backbone,
    load_image_encoder,
    load_motion_adapter,
    motion_unet_from_parts,
    release_scheduler,
    resolve_backbone,
    use_per_frame_motion_norms,
)
from ..weights import resolve


@dataclass
class FrozenParts:
    unet: torch.nn.Module  # UNetMotionModel, no face adapter yet
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_encoder: torch.nn.Module
    feature_extractor: object  # CLIP's image preprocessing, as the inference pipeline's
    noise_scheduler: object  # DDPMScheduler
    tiny_adapter: Path | None = None  # the tiny kit's face adapter (tiny mode's default start)

    def modules(self) -> dict[str, torch.nn.Module]:
        names = ("unet", "vae", "text_encoder", "image_encoder")
        return {name: getattr(self, name) for name in names}

    def freeze(self, device, dtype: torch.dtype) -> None:
        """No gradients, eval mode, placed and cast (before the adapter is attached: it stays float32)."""
        for module in self.modules().values():
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
        self.vae.enable_slicing()  # encode a clip's frames one at a time: the same latents, far less memory


def clip_image_processor():
    try:  # the PIL implementation; the default one wants torchvision, which we keep out
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    return CLIPImageProcessor()


def load_frozen_parts(
    backbone: str | None = None,
    *,
    motion_adapter: str | None = None,
    image_encoder: str | None = None,
    tiny: bool = False,
) -> FrozenParts:
    """Resolve (download if needed) and load every frozen part, in float32 on the CPU."""
    from diffusers import DDPMScheduler

    if tiny:
        from ..testing.options import tiny_load_options

        options = tiny_load_options(device="cpu", motion_adapter=motion_adapter, image_encoder=image_encoder)
    else:
        options = LoadOptions.for_device("cpu", motion_adapter=motion_adapter, image_encoder=image_encoder)
    motion = load_motion_adapter(resolve(options.motion_adapter or registry.MOTION_ADAPTER, what="motion adapter"))
    encoder = load_image_encoder(resolve(options.image_encoder or registry.IMAGE_ENCODER, what="image encoder"))
    path = resolve_backbone(options, backbone)
    complete = path.is_dir() and all((path / s).is_dir() for s in ("vae", "text_encoder", "tokenizer"))
    base = None if complete else resolve(options.base or registry.BASE_MODEL, what="SD1.5 base model")
    parts = load_backbone(path, base)
    unet = motion_unet_from_parts(parts.unet, motion)
    use_per_frame_motion_norms(unet)
    return FrozenParts(
        unet=unet,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        image_encoder=encoder,
        feature_extractor=clip_image_processor(),
        noise_scheduler=DDPMScheduler.from_config(release_scheduler().config),
        tiny_adapter=Path(options.face_adapter) if tiny else None,
    )
