"""The trainable face adapter: its modules on the frozen motion UNet, where its first weights come from, and
back to checkpoint weights.

Inference (:func:`idanimator.adapter.install_face_adapter`) fuses the LoRA into attn2's own weights
(W + up @ down) and runs diffusers' IP-Adapter processor. Training cannot fuse: the backbone must stay
frozen and the LoRA must get gradients. So here every spatial cross-attention gets
:class:`LoRAFaceAttnProcessor`, the release's processor: attn2's frozen linears plus the LoRA computed
beside them, plus the face attention. Both forms compute the same function (tested to float precision),
and :meth:`TrainableFaceAdapter.to_weights` writes the release's key names, so a checkpoint saved in
training loads in the inference pipeline unchanged.

The first weights (``train --init-adapter``, :func:`read_initial_adapter`):

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
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from .. import registry
from ..adapter import (
    AveragedFaceProjection,
    FaceAdapterWeights,
    build_resampler,
    checkpoint_index,
    face_adapter_layers,
    load_face_adapter_weights,
    random_resampler,
    resampler_from_diffusers,
)
from ..errors import CheckpointError, IDAnimatorError
from ..registry import HubFile
from ..weights import parse_hub_id, resolve

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # the checkpoint's {target}_lora keys
NAMES = {"ip-adapter-plus-face": registry.IP_ADAPTER_PLUS_FACE}
NUM_TOKENS = 16  # a new adapter's face tokens, as the release's
RESAMPLER_DEPTH = 4
_IP_PARTS = ("image_proj", "ip_adapter")
_IP_KEY = re.compile(r"^(\d+)\.to_(k|v)_ip\.weight$")


class LoRA(torch.nn.Module):
    """up(down(x)), both bias-free (diffusers' LoRALinearLayer at scale 1, as the release runs it)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = torch.nn.Linear(in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class LoRAFaceAttnProcessor(IPAdapterAttnProcessor2_0):
    """The release's LoRAFaceAttnProcessor for one spatial cross-attention:

        q = Wq x + LoRA_q(x);  k, v = W T + LoRA(T) on the text tokens T only
        h = attention(q, k, v) + scale * attention(q, Wk_face F, Wv_face F)   (F: the face tokens)
        out = Wo h + bo + LoRA_out(h)

    A subclass of diffusers' IP-Adapter processor, so ``to_k_ip/to_v_ip`` hold the face key/value as at
    inference and the pipeline's ``set_ip_adapter_scale`` sets ``scale``.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, rank: int, num_tokens: int):
        super().__init__(hidden_size, cross_attention_dim, num_tokens=(num_tokens,), scale=1.0)
        self.to_q_lora = LoRA(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRA(cross_attention_dim, hidden_size, rank)
        self.to_v_lora = LoRA(cross_attention_dim, hidden_size, rank)
        self.to_out_lora = LoRA(hidden_size, hidden_size, rank)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("The face attention needs (text states, [face tokens]) from the UNet's image projection.")
        text, (faces,) = encoder_hidden_states
        residual = hidden_states
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        query = attn.to_q(hidden_states) + self.to_q_lora(hidden_states)
        key = attn.to_k(text) + self.to_k_lora(text)
        value = attn.to_v(text) + self.to_v_lora(text)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def merged(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        query = heads(query)
        out = merged(F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=attention_mask))
        scale = self.scale[0]
        if scale != 0:
            face_key, face_value = heads(self.to_k_ip[0](faces)), heads(self.to_v_ip[0](faces))
            out = out + scale * merged(F.scaled_dot_product_attention(query, face_key, face_value))

        out = attn.to_out[1](attn.to_out[0](out) + self.to_out_lora(out))
        if residual.ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class TrainableFaceAdapter(torch.nn.Module):
    """What training updates: the resampler and, per spatial cross-attention (by checkpoint index 1, 3, 5,
    ...), a :class:`LoRAFaceAttnProcessor`."""

    def __init__(self, resampler: torch.nn.Module, layers: dict[int, LoRAFaceAttnProcessor]):
        super().__init__()
        self.resampler = resampler
        self.layers = torch.nn.ModuleDict({str(i): layer for i, layer in layers.items()})

    @classmethod
    def from_weights(cls, weights: FaceAdapterWeights, unet) -> TrainableFaceAdapter:
        """Build the modules for ``unet`` (a UNetMotionModel) and load ``weights`` into them, checking shapes."""
        indexed = face_adapter_layers(unet, weights)  # CheckpointError unless the layers match
        rank = weights.face_adapter[f"{checkpoint_index(0)}.to_q_lora.down.weight"].shape[0]
        layers = {}
        for index, name in indexed.items():
            attn = unet.get_submodule(name.removesuffix(".processor"))
            layer = LoRAFaceAttnProcessor(attn.to_q.out_features, attn.to_k.in_features, rank, weights.num_tokens)
            _load_layer(layer, weights.face_adapter, index)
            layers[index] = layer
        return cls(build_resampler(weights.image_proj).float(), layers)

    def attach(self, unet) -> None:
        """Install on ``unet``: the processors on its spatial attn2 layers, the resampler as its image
        projection (averaging the tokens of several references, as inference does)."""
        ours = {name: self.layers[str(index)] for index, name in face_adapter_layers(unet).items()}
        unet.set_attn_processor({name: ours.get(name, proc) for name, proc in unet.attn_processors.items()})
        unet.encoder_hid_proj = AveragedFaceProjection(self.resampler)
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")

    def to_weights(self) -> FaceAdapterWeights:
        """The adapter in the release's key names (float32 copies on the CPU)."""
        image_proj = resampler_from_diffusers(self.resampler.state_dict())
        face_adapter = {}
        for index, layer in self.layers.items():
            for target in LORA_TARGETS:
                lora = getattr(layer, f"{target}_lora")
                face_adapter[f"{index}.{target}_lora.down.weight"] = lora.down.weight
                face_adapter[f"{index}.{target}_lora.up.weight"] = lora.up.weight
            face_adapter[f"{index}.to_k_face.weight"] = layer.to_k_ip[0].weight
            face_adapter[f"{index}.to_v_face.weight"] = layer.to_v_ip[0].weight
        copy = {k: v.detach().float().cpu().clone() for k, v in image_proj.items()}
        return FaceAdapterWeights(copy, {k: v.detach().float().cpu().clone() for k, v in face_adapter.items()})


def _load_layer(layer: LoRAFaceAttnProcessor, face_adapter: dict[str, torch.Tensor], index: int) -> None:
    names = [f"{target}_lora.{part}.weight" for target in LORA_TARGETS for part in ("down", "up")]
    state = {name: face_adapter[f"{index}.{name}"] for name in names}
    state["to_k_ip.0.weight"] = face_adapter[f"{index}.to_k_face.weight"]
    state["to_v_ip.0.weight"] = face_adapter[f"{index}.to_v_face.weight"]
    own = layer.state_dict()
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"Tensor face_adapter.{index}.{key} has shape {tuple(value.shape)}, "
                f"the layer needs {tuple(own[key].shape)}."
            )
    with torch.no_grad():
        layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


class FaceAdapterTrainingModel(torch.nn.Module):
    """The frozen motion UNet with the trainable adapter attached: what accelerate prepares (and DDP wraps),
    so one forward call runs the whole denoiser and gradients reach only the adapter."""

    def __init__(self, unet, adapter: TrainableFaceAdapter):
        super().__init__()
        unet.requires_grad_(False)
        adapter.requires_grad_(True)
        adapter.attach(unet)
        self.unet, self.adapter = unet, adapter
        self.train()

    def train(self, mode: bool = True) -> FaceAdapterTrainingModel:
        super().train(mode)
        self.unet.eval()  # frozen: no dropout anywhere in the backbone, whatever the caller asks
        return self

    def forward(self, noisy_latents, timesteps, text_states, face_features) -> torch.Tensor:
        """Noise prediction for [batch, 4, frames, h, w] latents; ``face_features`` are CLIP's penultimate
        states of the references, [batch, references, tokens, width]."""
        text = text_states.repeat_interleave(noisy_latents.shape[2], dim=0)  # per frame, as AnimateDiffPipeline does
        added = {"image_embeds": [face_features]}  # the UNet repeats the face tokens per frame itself
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample


# -- the first weights (--init-adapter) ------------------------------------------------------------


@dataclass
class InitialAdapter:
    """What a file gives; :meth:`complete` fills in what it lacks for a given UNet (LoRA, or everything)."""

    image_proj: dict[str, torch.Tensor] | None
    face_adapter: dict[str, torch.Tensor]
    description: str

    def complete(self, unet, clip_width: int, rank: int, seed: int) -> FaceAdapterWeights:
        """Full weights for ``unet`` (a UNetMotionModel) and an image encoder of width ``clip_width``."""
        generator = torch.Generator().manual_seed(seed)
        image_proj = self.image_proj or _new_resampler(clip_width, unet.config.cross_attention_dim, seed)
        if image_proj["proj_in.weight"].shape[1] != clip_width:
            raise CheckpointError(
                f"The initial adapter reads {image_proj['proj_in.weight'].shape[1]}-wide CLIP features but the "
                f"image encoder gives {clip_width}: use the image encoder it was made for (ViT-H/14 for SD1.5)."
            )
        face = dict(self.face_adapter)
        for index, name in face_adapter_layers(unet).items():
            attn = unet.get_submodule(name.removesuffix(".processor"))
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
    if isinstance(hub := parse_hub_id(spec, file_suffixes=(".bin",)), HubFile):  # a Hub .bin file
        return resolve(hub, what="initial face adapter")
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
    hidden = -(-cross_attention_dim // 64) * 64  # the release derives heads = width / 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return random_resampler(clip_width, cross_attention_dim, hidden, RESAMPLER_DEPTH, NUM_TOKENS)


def _new_lora(index: int, attn, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA that changes nothing yet but learns: ``down`` ~ N(0, 1/rank) (diffusers' LoRA init), ``up`` = 0."""
    hidden, cross = attn.to_q.out_features, attn.to_k.in_features
    out = {}
    for target, fan_in in (("to_q", hidden), ("to_k", cross), ("to_v", cross), ("to_out", hidden)):
        out[f"{index}.{target}_lora.down.weight"] = torch.randn(rank, fan_in, generator=generator) / rank
        out[f"{index}.{target}_lora.up.weight"] = torch.zeros(hidden, rank)
    return out
