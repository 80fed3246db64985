"""The training objective: noise-prediction MSE over a clip's video latents (epsilon parameterisation).

The frozen encoders run without gradients: the VAE turns the frames into latents, CLIP's text encoder the
captions (a dropped caption is ""), and CLIP's image encoder the reference faces into its penultimate
hidden states (a dropped face arrives as all-zeros normalised pixels, exactly inference's unconditional
input). Noise, timesteps and the VAE's latent sample come from the generator given, so a micro-step's
randomness is fixed by the run's seed and its number alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor


def micro_step_generator(seed: int, micro_step: int, process: int) -> torch.Generator:
    """A CPU generator for one micro-step of one process (CPU, so every device draws the same numbers)."""
    state = np.random.SeedSequence([seed, micro_step, process]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def encode_conditions(parts, batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(text states [B, 77, width], face features [B, references, tokens, clip width])."""
    tokens = parts.tokenizer(
        batch["caption"],
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    text = parts.text_encoder(tokens)[0]
    faces = batch["faces"].to(device=device, dtype=dtype)
    hidden = parts.image_encoder(faces.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    return text, hidden.unflatten(0, faces.shape[:2])


@torch.no_grad()
def encode_video(vae, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, F, 3, H, W] in [-1, 1] -> scaled latents [B, 4, F, H/8, W/8] (a sample of the VAE's posterior)."""
    batch, count = frames.shape[:2]
    posterior = vae.encode(frames.flatten(0, 1)).latent_dist
    latents = posterior.sample(generator=generator) * vae.config.scaling_factor
    return latents.unflatten(0, (batch, count)).transpose(1, 2)


def diffusion_loss(model, parts, batch: dict, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """The loss of one micro-batch; gradients reach only the adapter inside ``model``."""
    latents = encode_video(parts.vae, batch["frames"].to(device=device, dtype=dtype), generator)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = parts.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    text, faces = encode_conditions(parts, batch, device, dtype)
    prediction = model(noisy, timesteps, text, faces)
    return F.mse_loss(prediction.float(), noise.float())
