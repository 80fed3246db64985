"""The identity-preserving loss (``train --id-loss-weight W``): ArcFace's cosine distance between the reference
face and the face in the model's own estimate of the clean frames.

The paper's later version names an ID-preserving loss but publishes no recipe, so this one is ours, from public
peers: PuLID's ``1 - cos(ArcFace(reference), ArcFace(x0_hat))``; LCM-Lookahead's crop of the predicted face onto
the ArcFace template with landmarks found on the real frame and a differentiable warp; ID-Booth's one-step
``x0_hat`` from the training step's own noise prediction, weighted by ``(1 - t/T)^2`` (a noisy step's estimate is
a blur, whose face says little). Faces are never detected on ``x0_hat``.

Per micro-batch: ``x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)`` for the K frames the data loader
chose (:class:`~.dataset.ClipDataset` with ``id_frames``), decoded by the frozen VAE with gradients (checkpointed:
its activations are recomputed in the backward pass instead of kept), warped onto the 112-pixel template with
the real frame's 5 landmarks, embedded by the frozen ArcFace. Frames where the real frame has no face, and
samples trained without their face (condition dropout), are left out. The reference embedding (the mean of the
sample's reference faces' unit embeddings) takes no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..arcface import IResNet, warp_to_template


def predicted_x0(noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod):
    """The clean latents an epsilon prediction implies (float32), for latents [N, ...] at timesteps [N]."""
    abar = alphas_cumprod.to(noisy.device, torch.float32)[timesteps]
    abar = abar.view(-1, *([1] * (noisy.ndim - 1)))
    return (noisy.float() - (1 - abar).sqrt() * prediction.float()) / abar.sqrt()


def timestep_weights(timesteps: torch.Tensor, total: int, kind: str) -> torch.Tensor:
    """Each sample's weight: 1 (``none``), or ``(1 - t/T)^2`` (``one-minus-t-squared``, ID-Booth's)."""
    if kind == "none":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if kind == "one-minus-t-squared":
        return (1 - timesteps.float() / total) ** 2
    raise ValueError(f"unknown timestep weighting {kind!r}")


@dataclass
class IdentityTerm:
    """One micro-batch's identity loss: ``loss`` is what --id-loss-weight multiplies (the mean over the frames
    used of ``w(t) * (1 - cos)``, a zero without gradient when no frame could be used); the sums and the count
    (detached) are for the log."""

    loss: torch.Tensor
    weighted_sum: torch.Tensor  # sum of w(t) * (1 - cos)
    similarity_sum: torch.Tensor  # sum of cos
    count: int  # frames used

    def sums(self) -> torch.Tensor:
        """[3]: the weighted sum, the similarity sum and the count, to add up over micro-steps and processes."""
        count = self.weighted_sum.new_tensor(float(self.count))
        return torch.stack([self.weighted_sum.float(), self.similarity_sum.float(), count])


def identity_record(sums: torch.Tensor) -> dict[str, float]:
    """A step's log entries from its added-up :meth:`IdentityTerm.sums`: ``id_loss`` (the mean term the weight
    multiplies), ``id_similarity`` (the mean cosine) and ``id_frames`` (how many frames had a face); empty when
    no frame had one."""
    total, similarity, count = (float(v) for v in sums)
    if count == 0:
        return {}
    return {"id_loss": total / count, "id_similarity": similarity / count, "id_frames": int(count)}


class IdentityLoss:
    """The frozen ArcFace and the settings; called in the loss step with the step's tensors."""

    def __init__(self, arcface: IResNet, timestep_weight: str, noise_scheduler=None):
        self.arcface, self.timestep_weight = arcface, timestep_weight
        self.num_train_timesteps, self.alphas_cumprod = 1000, None
        if noise_scheduler is not None:
            self.attach(noise_scheduler)

    def attach(self, noise_scheduler, device=None) -> IdentityLoss:
        """Take the run's noise schedule (a DDPMScheduler) and put the ArcFace on the frozen models' device. It
        stays float32 whatever the run's precision (it is small beside the UNet, and a cosine near 1 needs the
        digits); so does the warp (bf16 grid coordinates would be off by pixels)."""
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.alphas_cumprod = noise_scheduler.alphas_cumprod
        self.arcface.to(device=device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def reference(self, images: torch.Tensor) -> torch.Tensor:
        """[B, R, 3, 112, 112] aligned reference faces in [-1, 1] -> [B, D]: the unit mean of unit embeddings."""
        embeddings = self.arcface.embed(images.flatten(0, 1).float())
        return F.normalize(embeddings.unflatten(0, images.shape[:2]).mean(1), dim=-1)

    def __call__(self, vae, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor, batch: dict):
        """``noisy``/``prediction``: [B, 4, F, h, w] latents and the model's noise estimate; ``batch``: the
        collated samples with ``id_frames`` [B, K], ``id_landmarks`` [B, K, 5, 2], ``id_found`` [B, K],
        ``face_dropped`` [B] and ``id_reference`` [B, R, 3, 112, 112]."""
        device = noisy.device
        usable = batch["id_found"].to(device) & ~batch["face_dropped"].to(device)[:, None]
        zero = torch.zeros((), device=device)
        if not usable.any():
            return IdentityTerm(zero, zero, zero, 0)
        sample, slot = usable.nonzero(as_tuple=True)
        frame = batch["id_frames"].to(device)[sample, slot]
        x0 = predicted_x0(noisy[sample, :, frame], prediction[sample, :, frame], timesteps[sample], self.alphas_cumprod)
        latents = (x0 / vae.config.scaling_factor).to(vae.dtype)
        pixels = checkpoint(lambda z: vae.decode(z).sample, latents, use_reentrant=False)  # [N, 3, H, W], ~[-1, 1]
        landmarks = batch["id_landmarks"][sample.cpu(), slot.cpu()]
        faces = warp_to_template(pixels.float(), landmarks)
        similarity = (self.arcface.embed(faces) * self.reference(batch["id_reference"].to(device))[sample]).sum(-1)
        weights = timestep_weights(timesteps[sample], self.num_train_timesteps, self.timestep_weight)
        weighted = weights * (1 - similarity)
        return IdentityTerm(weighted.mean(), weighted.detach().sum(), similarity.detach().sum(), int(len(sample)))
