"""The ID-Animator face adapter on diffusers, and the official `animator.ckpt` format.

The adapter has two trained parts (nothing else in the model is trained):

* ``image_proj``: a Perceiver resampler (learnable facial latent queries) reading CLIP ViT-H
  penultimate hidden states. Its layout is IP-Adapter-Plus's, so diffusers'
  :class:`IPAdapterPlusImageProjection` runs it once the keys are renamed.
* ``face_adapter``: for every spatial cross-attention (attn2) of the UNet, a LoRA on to_q/to_k/to_v/
  to_out and decoupled face key/value projections. The face projections become diffusers'
  ``IPAdapterAttnProcessor2_0.to_k_ip/to_v_ip``; the LoRA is fused into attn2's own linears, which is
  exactly equivalent because the k/v LoRA only ever sees text tokens and the release keeps the LoRA on at
  every ID scale.

Loading never iterates a processor list (the release's silent failure on diffusers >= 0.30): every
tensor is copied by name, and a missing or unexpected tensor is an error naming it.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import atomic_path, kind_problem

RESAMPLER_DIM_HEAD = 64  # fixed by the release (and by IP-Adapter-Plus)

# Release Resampler key prefix <-> diffusers IPAdapterPlusImageProjection key prefix ({i}: layer number).
# `to_kv` has no pair: the release packs k and v in one matrix, diffusers has two.
_RESAMPLER_PREFIXES = [
    ("layers.{i}.0.norm1.", "layers.{i}.ln0."),
    ("layers.{i}.0.norm2.", "layers.{i}.ln1."),
    ("layers.{i}.0.to_q.", "layers.{i}.attn.to_q."),
    ("layers.{i}.0.to_out.", "layers.{i}.attn.to_out.0."),
    ("layers.{i}.1.0.", "layers.{i}.ff.0."),
    ("layers.{i}.1.1.", "layers.{i}.ff.1.net.0.proj."),
    ("layers.{i}.1.3.", "layers.{i}.ff.1.net.2."),
]
_LORA_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_FACE_KEY = re.compile(
    r"^(\d+)\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora|to_k_face|to_v_face)\.(?:(down|up)\.)?weight$"
)


@dataclass
class FaceAdapterWeights:
    """The two state dicts of an ID-Animator face adapter, in the release's key names."""

    image_proj: dict[str, torch.Tensor]
    face_adapter: dict[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.image_proj["latents"].shape[1]

    @property
    def cross_attention_indices(self) -> list[int]:
        return sorted({int(_FACE_KEY.match(k).group(1)) for k in self.face_adapter})

    def num_parameters(self) -> int:
        tensors = list(self.image_proj.values()) + list(self.face_adapter.values())
        return sum(t.numel() for t in tensors)


# ----------------------------------------------------------------------------------------------
# Reading and writing checkpoints


def _read_raw(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CheckpointError(
                f"The face adapter file {path} is damaged or not a safetensors file ({exc}). Download it again."
            ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _is_pickle(path):  # a well-formed pickle the safe loader refused: it holds more than tensors
            raise CheckpointError(
                f"Refused to load {path}: it contains code or objects other than tensors, which could be unsafe. "
                "Only plain tensor checkpoints (or .safetensors) are accepted."
            ) from exc
        raise _not_a_checkpoint(path) from exc
    except Exception as exc:  # noqa: BLE001 - torch's loader raises KeyError, IndexError, ... on junk bytes
        raise _not_a_checkpoint(path) from exc


def _is_pickle(path: Path) -> bool:
    """Whether the file (or a zip checkpoint's data.pkl) is a whole pickle stream (parsed only: nothing runs)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        return bool(list(pickletools.genops(data)))
    except Exception:  # noqa: BLE001 - anything unparsable is simply not a pickle
        return False


def _not_a_checkpoint(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a PyTorch checkpoint, or it is truncated or corrupt. Download the face adapter again."
    )


def _split_layouts(raw: dict, path: Path) -> tuple[dict, dict]:
    """Accept the release's two layouts and ours; return (image_proj, face_adapter) state dicts."""
    if set(raw) == {"image_proj", "face_adapter"}:  # layout A
        return dict(raw["image_proj"]), dict(raw["face_adapter"])
    if set(raw) == {"state_dict"}:  # layout B: an IP-Adapter-style training wrapper, maybe DDP-prefixed
        image_proj, face_adapter, unknown = {}, {}, []
        for key, value in raw["state_dict"].items():
            name = key.removeprefix("module.")
            if name.startswith("image_proj_model."):
                image_proj[name.removeprefix("image_proj_model.")] = value
            elif name.startswith("adapter_modules."):
                face_adapter[name.removeprefix("adapter_modules.")] = value
            else:
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"Unexpected tensor {unknown[0]!r} in {path} ({len(unknown)} unknown in all).")
        return image_proj, face_adapter
    if raw and all(isinstance(k, str) and k.split(".", 1)[0] in {"image_proj", "face_adapter"} for k in raw):
        image_proj = {k.removeprefix("image_proj."): v for k, v in raw.items() if k.startswith("image_proj.")}
        face_adapter = {k.removeprefix("face_adapter."): v for k, v in raw.items() if k.startswith("face_adapter.")}
        return image_proj, face_adapter  # our flat safetensors layout
    keys = ", ".join(map(repr, list(raw)[:5]))
    raise CheckpointError(
        f"{path} is not an ID-Animator face adapter: expected 'image_proj' and 'face_adapter' (or 'state_dict'), "
        f"found {keys}."
    )


# The resampler tensors every ID-Animator (IP-Adapter-Plus) checkpoint has; the rest is checked when it is built.
_RESAMPLER_REQUIRED = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight")


def _validate(weights: FaceAdapterWeights, path: Path) -> None:
    for key, value in {**weights.image_proj, **weights.face_adapter}.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"Entry {key!r} in {path} is not a tensor.")
    for key in weights.face_adapter:
        if not _FACE_KEY.match(key):
            raise CheckpointError(f"Unexpected tensor 'face_adapter.{key}' in {path}.")
    for key in _RESAMPLER_REQUIRED:
        if key not in weights.image_proj:
            raise CheckpointError(f"Missing tensor 'image_proj.{key}' in {path}.")
    if not weights.face_adapter:
        raise CheckpointError(f"{path} has no face attention tensors ('face_adapter.*'); it is incomplete.")
    expected = {k for i in weights.cross_attention_indices for k in _layer_keys(i)}
    missing = sorted(expected - set(weights.face_adapter))
    if missing:
        raise CheckpointError(f"Missing tensor 'face_adapter.{missing[0]}' in {path} ({len(missing)} missing).")


def _layer_keys(index: int) -> list[str]:
    keys = [f"{index}.{lora}.{part}.weight" for lora in _LORA_TARGETS for part in ("down", "up")]
    return keys + [f"{index}.to_k_face.weight", f"{index}.to_v_face.weight"]


def load_face_adapter_weights(path: str | Path) -> FaceAdapterWeights:
    """Read an ID-Animator face adapter: the official `animator.ckpt` (either layout) or our .safetensors.

    Pickles are read with ``weights_only=True``: a file that tries to run code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Face adapter file {path} {kind_problem(path, folder=False)}.")
    raw = _read_raw(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a dictionary of tensors.")
    image_proj, face_adapter = _split_layouts(raw, path)
    weights = FaceAdapterWeights(image_proj=image_proj, face_adapter=face_adapter)
    _validate(weights, path)
    return weights


def save_face_adapter_weights(weights: FaceAdapterWeights, path: str | Path) -> Path:
    """Write our layout: one flat safetensors file with `image_proj.*` and `face_adapter.*` keys."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"The face adapter is written as safetensors, so {path} must end in .safetensors.")
    flat = {f"image_proj.{k}": v for k, v in weights.image_proj.items()}
    flat.update({f"face_adapter.{k}": v for k, v in weights.face_adapter.items()})
    with atomic_path(path) as temp:
        save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, str(temp), metadata={"format": "pt"})
    return path


def save_official_checkpoint(weights: FaceAdapterWeights, path: str | Path) -> Path:
    """Write the release's `animator.ckpt` layout A (used by the tiny kit and by training)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"The release's layout is a pickle, so {path} must not end in .safetensors; use .ckpt.")
    with atomic_path(path) as temp:
        torch.save({"image_proj": weights.image_proj, "face_adapter": weights.face_adapter}, str(temp))
    return path


# ----------------------------------------------------------------------------------------------
# The resampler


def _rename_prefix(key: str, pairs: list[tuple[str, str]]) -> str:
    for source, target in pairs:
        match = re.match(re.escape(source).replace(r"\{i\}", r"(\d+)"), key)
        if match:
            return target.format(i=match.group(1)) + key[match.end() :]
    return key


def resampler_to_diffusers(image_proj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the release's Resampler keys to IPAdapterPlusImageProjection's."""
    out = {}
    for key, value in image_proj.items():
        match = re.fullmatch(r"layers\.(\d+)\.0\.to_kv\.weight", key)
        if match:
            out[f"layers.{match.group(1)}.attn.to_k.weight"], out[f"layers.{match.group(1)}.attn.to_v.weight"] = (
                value.chunk(2, dim=0)
            )
        else:
            out[_rename_prefix(key, _RESAMPLER_PREFIXES)] = value
    return out


def random_resampler(clip_width: int, cross_attention_dim: int, hidden: int, depth: int, num_queries: int) -> dict:
    """A new resampler (diffusers' initialisation, torch's current random state) in the release's layout."""
    module = _resampler(clip_width, cross_attention_dim, hidden, depth, hidden // RESAMPLER_DIM_HEAD, num_queries)
    return resampler_from_diffusers(module.state_dict())


def _resampler(clip_width: int, output: int, hidden: int, depth: int, heads: int, queries: int):
    return IPAdapterPlusImageProjection(clip_width, output, hidden, depth, RESAMPLER_DIM_HEAD, heads, queries)


def resampler_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`resampler_to_diffusers` (to write official checkpoints)."""
    swapped = [(target, source) for source, target in _RESAMPLER_PREFIXES]
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.attn\.to_k\.weight", key)
        if match:
            layer = match.group(1)
            out[f"layers.{layer}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{layer}.attn.to_v.weight"]])
        elif not re.fullmatch(r"layers\.\d+\.attn\.to_v\.weight", key):
            out[_rename_prefix(key, swapped)] = value
    return out


def build_resampler(image_proj: dict[str, torch.Tensor]) -> IPAdapterPlusImageProjection:
    """Build diffusers' resampler with the checkpoint's shapes and load it strictly."""
    depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
    (_, queries, hidden), heads = image_proj["latents"].shape, image_proj["layers.0.0.to_q.weight"].shape[0]
    heads //= RESAMPLER_DIM_HEAD
    width, output = image_proj["proj_in.weight"].shape[1], image_proj["proj_out.weight"].shape[0]
    module = _resampler(width, output, hidden, depth, heads, queries)
    _load_strict(module, resampler_to_diffusers(image_proj), "image_proj")
    return module


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"The {what} weights do not fit the model: {detail}.")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"Tensor {what}.{key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}."
            )
    module.load_state_dict(state, strict=True)


class AveragedFaceProjection(MultiIPAdapterImageProjection):
    """Projects CLIP features of N reference photos and averages the N token sets.

    The release mixes identities by averaging resampler outputs; diffusers would concatenate them.
    Input: a one-element list of [batch, N, seq, dim]; output: a list of [batch, tokens, dim].
    """

    def __init__(self, resampler: IPAdapterPlusImageProjection):
        super().__init__([resampler])

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tokens.mean(dim=1) for tokens in super().forward(image_embeds)]


# ----------------------------------------------------------------------------------------------
# Installing on a UNet


def spatial_cross_attention_names(unet) -> list[str]:
    """Processor names of the UNet's spatial attn2 layers, in the checkpoint's index order.

    The release numbers processors down blocks, up blocks, then mid block, attn1 and attn2 alternating,
    and never counts motion modules. diffusers' UNetMotionModel lists processors in that same module
    order, with motion-module processors interleaved: filtering them out gives index 2*j+1
    (:func:`checkpoint_index`).
    """
    return [name for name in unet.attn_processors if "motion_modules" not in name and name.endswith("attn2.processor")]


def checkpoint_index(j: int) -> int:
    """The checkpoint's index of the ``j``-th spatial cross-attention (see :func:`spatial_cross_attention_names`)."""
    return 2 * j + 1


def face_adapter_layers(unet, weights: FaceAdapterWeights | None = None) -> dict[int, str]:
    """The checkpoint's index (1, 3, 5, ...) of each spatial cross-attention processor of ``unet``, in order.

    With ``weights``, also checks that they have exactly those layers (CheckpointError saying which differs).
    """
    layers = {checkpoint_index(j): name for j, name in enumerate(spatial_cross_attention_names(unet))}
    if weights is not None and weights.cross_attention_indices != list(layers):
        extra = sorted(set(weights.cross_attention_indices) - set(layers))
        missing = sorted(set(layers) - set(weights.cross_attention_indices))
        hint = f"it has layer {extra[0]}, this UNet has none" if extra else f"layer {missing[0]} is missing"
        raise CheckpointError(
            f"The face adapter does not fit this UNet ({len(layers)} cross-attention layers): {hint}. "
            "Use an SD1.5 backbone with the SD1.5 face adapter."
        )
    return layers


def _attention_module(unet, processor_name: str):
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def install_face_adapter(unet, weights: FaceAdapterWeights, scale: float = 1.0) -> int:
    """Put the face adapter on a UNetMotionModel (fp32 weights expected for the LoRA fusion).

    Returns the number of checkpoint tensors applied; every one of them is used.
    """
    if getattr(unet, "_idanimator_face_adapter", False):
        raise CheckpointError("A face adapter is already installed on this UNet; load a fresh backbone first.")
    used = 0
    processors = {}
    for index, name in face_adapter_layers(unet, weights).items():
        attn = _attention_module(unet, name)
        used += _fuse_lora(attn, weights.face_adapter, index)
        k_face = weights.face_adapter[f"{index}.to_k_face.weight"]
        v_face = weights.face_adapter[f"{index}.to_v_face.weight"]
        hidden, cross = k_face.shape
        if hidden != attn.to_q.out_features or cross != attn.to_k.in_features:
            raise CheckpointError(
                f"Tensor face_adapter.{index}.to_k_face.weight has shape {tuple(k_face.shape)}, "
                f"the layer needs ({attn.to_q.out_features}, {attn.to_k.in_features})."
            )
        proc = IPAdapterAttnProcessor2_0(hidden, cross, num_tokens=(weights.num_tokens,), scale=scale)
        proc.to_k_ip[0].weight.data.copy_(k_face)
        proc.to_v_ip[0].weight.data.copy_(v_face)
        processors[name] = proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        used += 2
    all_processors = {
        name: processors.get(name, proc if proc is not None else AttnProcessor2_0())
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(all_processors)

    resampler = build_resampler(weights.image_proj)
    used += len(weights.image_proj)
    unet.encoder_hid_proj = AveragedFaceProjection(resampler).to(device=unet.device, dtype=unet.dtype)
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    unet._idanimator_face_adapter = True

    total = len(weights.image_proj) + len(weights.face_adapter)
    if used != total:  # a guard against the release's "loaded nothing" failure mode
        raise CheckpointError(f"Only {used} of {total} face adapter tensors were applied.")
    return used


def _fuse_lora(attn, face_adapter: dict[str, torch.Tensor], index: int) -> int:
    """W += up @ down on attn2's q/k/v/out, computed in fp32 (the release runs LoRA at scale 1)."""
    for lora, target in _LORA_TARGETS.items():
        linear = attn.get_submodule(target)
        down = face_adapter[f"{index}.{lora}.down.weight"].float()
        up = face_adapter[f"{index}.{lora}.up.weight"].float()
        if down.shape[1] != linear.in_features or up.shape[0] != linear.out_features:
            raise CheckpointError(
                f"Tensor face_adapter.{index}.{lora} has shape {tuple(up.shape)}x{tuple(down.shape)}, "
                f"the layer is {linear.out_features}x{linear.in_features}."
            )
        delta = (up @ down).to(linear.weight.device)
        linear.weight.data = (linear.weight.data.float() + delta).to(linear.weight.dtype)
    return 2 * len(_LORA_TARGETS)
