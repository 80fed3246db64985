"""Where the face adapter's first weights come from (``train --init-adapter``).

* An IP-Adapter-Plus-Face SD1.5 file (``ip-adapter-plus-face_sd15.safetensors`` or ``.bin``, or the name
  ``ip-adapter-plus-face``), as the release did: public reproductions report that training from scratch
  gives no identity. Its resampler is the adapter's resampler key for key, its ``to_k_ip/to_v_ip`` become
  the face key/value, and the LoRA starts at zero (``up`` = 0), so before training the model computes
  exactly what IP-Adapter-Plus-Face computes.
* An ID-Animator adapter: the release's ``animator.ckpt`` or our .safetensors (to fine-tune further).
* Nothing: with ``--tiny`` the tiny kit's adapter, else a new one (random resampler, face key/value copied
  from each attn2's text key/value as IP-Adapter initialises them, zero LoRA).

A local path, a Hub file ("owner/name/path/file.safetensors", downloaded into the Hugging Face cache) or
the name above. Every new tensor is drawn from the run's seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import registry
from ..adapter import FaceAdapterWeights, load_face_adapter_weights, resampler_from_diffusers
from ..errors import CheckpointError, IDAnimatorError
from ..registry import HubFile
from ..weights import resolve

NAMES = {"ip-adapter-plus-face": registry.IP_ADAPTER_PLUS_FACE}
NUM_TOKENS = 16  # a new adapter's face tokens, as the release's
RESAMPLER_DEPTH = 4
_IP_PARTS = ("image_proj", "ip_adapter")
_IP_KEY = re.compile(r"^(\d+)\.to_(k|v)_ip\.weight$")


@dataclass
class InitialAdapter:
    """What a file gives; :meth:`complete` fills in what it lacks for a given UNet (LoRA, or everything)."""

    image_proj: dict[str, torch.Tensor] | None
    face_adapter: dict[str, torch.Tensor]
    description: str

    def complete(self, unet, clip_width: int, rank: int, seed: int) -> FaceAdapterWeights:
        """Full weights for ``unet`` (a UNetMotionModel) and an image encoder of width ``clip_width``."""
        from ..adapter import spatial_cross_attention_names

        generator = torch.Generator().manual_seed(seed)
        image_proj = self.image_proj or _new_resampler(clip_width, unet.config.cross_attention_dim, seed)
        if image_proj["proj_in.weight"].shape[1] != clip_width:
            raise CheckpointError(
                f"The initial adapter reads {image_proj['proj_in.weight'].shape[1]}-wide CLIP features but the "
                f"image encoder gives {clip_width}: use the image encoder it was made for (ViT-H/14 for SD1.5)."
            )
        face = dict(self.face_adapter)
        for j, name in enumerate(spatial_cross_attention_names(unet)):
            index, attn = 2 * j + 1, unet.get_submodule(name.removesuffix(".processor"))
            if f"{index}.to_k_face.weight" not in face:  # IP-Adapter's own initialisation
                face[f"{index}.to_k_face.weight"] = attn.to_k.weight.detach().float().cpu().clone()
                face[f"{index}.to_v_face.weight"] = attn.to_v.weight.detach().float().cpu().clone()
            if f"{index}.to_q_lora.down.weight" not in face:
                face.update(_new_lora(index, attn, rank, generator))
        return FaceAdapterWeights(image_proj={k: v.float() for k, v in image_proj.items()}, face_adapter=face)


def read_initial_adapter(spec: str | None, tiny_adapter: Path | None = None) -> InitialAdapter:
    """Read ``--init-adapter`` (cheap checks: a bad file fails here, before any model loads)."""
    if spec is None:
        if tiny_adapter is not None:
            weights = load_face_adapter_weights(tiny_adapter)
            return InitialAdapter(weights.image_proj, weights.face_adapter, f"the tiny kit's adapter {tiny_adapter}")
        return InitialAdapter(None, {}, "a new adapter (starting from ip-adapter-plus-face is recommended)")
    path = _locate(spec)
    try:
        weights = load_face_adapter_weights(path)
    except CheckpointError as exc:
        ip_adapter = _read_ip_adapter(path)
        if ip_adapter is None:
            raise CheckpointError(
                f"--init-adapter {spec} is neither an ID-Animator face adapter nor an IP-Adapter-Plus file: {exc}"
            ) from exc
        return ip_adapter
    return InitialAdapter(weights.image_proj, weights.face_adapter, f"the face adapter {path}")


def _locate(spec: str) -> Path:
    if spec in NAMES:
        return resolve(NAMES[spec], what="IP-Adapter-Plus-Face file")
    if Path(spec).expanduser().exists():
        return Path(spec).expanduser()
    parts = spec.split("/")
    if len(parts) > 2 and spec.endswith(".bin") and not spec.startswith((".", "/", "~")):  # a Hub .bin file
        return resolve(HubFile("/".join(parts[:2]), "/".join(parts[2:])), what="initial face adapter")
    try:
        return resolve(spec, what="initial face adapter")
    except IDAnimatorError as exc:
        raise IDAnimatorError(f"--init-adapter {spec}: {exc}") from exc


def _read_ip_adapter(path: Path) -> InitialAdapter | None:
    """An IP-Adapter(-Plus) file: {"image_proj": ..., "ip_adapter": ...} (.bin) or the same flattened with
    "image_proj." / "ip_adapter." prefixes (.safetensors). None when the file is something else."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            raw = {p: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(p + ".")} for p in _IP_PARTS}
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: not an IP-Adapter file either
        return None
    if not isinstance(raw, dict) or not raw.get("image_proj") or not raw.get("ip_adapter"):
        return None
    if "latents" not in raw["image_proj"]:
        raise CheckpointError(
            f"{path} is an IP-Adapter without a resampler (not a Plus model); use ip-adapter-plus-face_sd15."
        )
    face = {}
    for key, value in raw["ip_adapter"].items():
        match = _IP_KEY.match(key)
        if not match:
            raise CheckpointError(f"{path} holds {key!r}: an IP-Adapter with a LoRA or other extras is not supported.")
        face[f"{match.group(1)}.to_{match.group(2)}_face.weight"] = value.float()
    image_proj = {k: v.float() for k, v in raw["image_proj"].items()}
    return InitialAdapter(image_proj, face, f"the IP-Adapter-Plus file {path} (LoRA starts at zero)")


def _new_resampler(clip_width: int, cross_attention_dim: int, seed: int) -> dict[str, torch.Tensor]:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    hidden = -(-cross_attention_dim // 64) * 64  # the release derives heads = width / 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = IPAdapterPlusImageProjection(
            embed_dims=clip_width,
            output_dims=cross_attention_dim,
            hidden_dims=hidden,
            depth=RESAMPLER_DEPTH,
            dim_head=64,
            heads=hidden // 64,
            num_queries=NUM_TOKENS,
        )
    return resampler_from_diffusers(resampler.state_dict())


def _new_lora(index: int, attn, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA that changes nothing yet but learns: ``down`` ~ N(0, 1/rank) (diffusers' LoRA init), ``up`` = 0."""
    hidden, cross = attn.to_q.out_features, attn.to_k.in_features
    out = {}
    for target, fan_in in (("to_q", hidden), ("to_k", cross), ("to_v", cross), ("to_out", hidden)):
        out[f"{index}.{target}_lora.down.weight"] = torch.randn(rank, fan_in, generator=generator) / rank
        out[f"{index}.{target}_lora.up.weight"] = torch.zeros(hidden, rank)
    return out
