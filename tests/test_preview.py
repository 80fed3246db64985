"""Latent previews: cheap, the right shape, and they follow the latents."""

import torch

from idanimator.preview import latents_to_rgb, preview_strip


def test_preview_has_one_frame_per_latent_frame():
    latents = torch.randn(1, 4, 6, 8, 10)
    frames = latents_to_rgb(latents)
    assert frames.shape == (6, 8, 10, 3) and frames.dtype.name == "uint8"


def test_strip_picks_evenly_spaced_frames():
    strip = preview_strip(torch.randn(1, 4, 16, 8, 8), max_frames=4, frame_height=32)
    assert strip.size == (4 * 32, 32)


def test_preview_follows_the_latents():
    dark = latents_to_rgb(torch.full((1, 4, 1, 2, 2), -3.0) * torch.tensor([1, 1, 1, -1]).view(1, 4, 1, 1, 1))
    bright = latents_to_rgb(torch.full((1, 4, 1, 2, 2), 3.0) * torch.tensor([1, 1, 1, -1]).view(1, 4, 1, 1, 1))
    assert bright.mean() > dark.mean()
