"""Cheap previews while denoising: latents to RGB with a fixed linear map, no VAE decode.

Stable Diffusion 1.x latents are close to a linear function of the image colours; this 4x3 map (the
community's well-known fit for SD1.5) gives a blurry but faithful impression at a tiny fraction of the
VAE's cost, so the app can show progress every few steps.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SD15_LATENT_TO_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latents_to_rgb(latents: torch.Tensor) -> np.ndarray:
    """[batch, 4, frames, h, w] latents of the first video -> [frames, h, w, 3] uint8 (1/8 of the size)."""
    video = latents[0].detach().float().cpu()  # [4, frames, h, w]
    rgb = torch.einsum("cfhw,cr->fhwr", video, SD15_LATENT_TO_RGB)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()


def tile_images(images: list[Image.Image], height: int = 128) -> Image.Image:
    """Images side by side, each scaled to `height` (the app's preview strip and face crops)."""
    tiles = [
        im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.BILINEAR) for im in images
    ]
    strip = Image.new("RGB", (sum(t.width for t in tiles), height))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width
    return strip


def preview_strip(latents: torch.Tensor, max_frames: int = 8, frame_height: int = 128) -> Image.Image:
    """A horizontal strip of up to `max_frames` evenly spaced preview frames, each `frame_height` tall."""
    frames = latents_to_rgb(latents)
    picks = np.linspace(0, len(frames) - 1, num=min(max_frames, len(frames))).round().astype(int)
    return tile_images([Image.fromarray(frames[i]) for i in picks], frame_height)
