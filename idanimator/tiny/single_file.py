"""Export a diffusers SD1.5 folder as one original-layout (LDM / CompVis) `.safetensors` checkpoint.

Community SD1.5 backbones ship as single files in the original layout, loaded with
``StableDiffusionPipeline.from_single_file(path, config=<diffusers SD1.5 folder>)``. This module is the
inverse of diffusers' own conversion (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), so a
diffusers folder (the tiny kit included) can be turned into such a file, e.g. to test that path offline.

The key mapping is derived from each model's ``config.json`` (number of blocks, ``layers_per_block``,
which blocks have attention), so it covers the real SD1.5 layout and smaller ones alike. Every tensor
is copied bit for bit; keys the mapping does not know raise `CheckpointError` rather than being
dropped, so a round trip through ``from_single_file`` is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D parameter names -> LDM ResBlock (UNet) / ResnetBlock (VAE) names.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# diffusers VAE mid-block Attention -> LDM AttnBlock; the legacy diffusers names (query/key/value/
# proj_attn), still found in older saved folders, are accepted too.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

# One rule: diffusers key prefix -> (LDM key prefix, how to rename and reshape what follows).
Rule = tuple[str, str, Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]]


def _same(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    return rest, tensor


def _renamer(table: dict[str, str]) -> Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]:
    def rename(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        for old, new in table.items():
            if rest.startswith(old + "."):
                return new + rest[len(old) :], tensor
        raise KeyError(rest)

    return rename


def _vae_attention(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    name, tensor = _renamer(_VAE_ATTENTION)(rest, tensor)
    # LDM's AttnBlock uses 1x1 convolutions where diffusers uses linear layers.
    if name.split(".")[0] in ("q", "k", "v", "proj_out") and name.endswith(".weight") and tensor.ndim == 2:
        tensor = tensor.reshape(*tensor.shape, 1, 1)
    return name, tensor


def _layers_per_block(config: dict, what: str) -> int:
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise CheckpointError(
                f"The {what} has a different number of layers per block; the original layout cannot hold it."
            )
        layers = layers[0]
    return int(layers)


def unet_rules(config: dict) -> list[Rule]:
    """The diffusers -> LDM prefix rules of a UNet2DConditionModel with this config."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = _layers_per_block(config, "UNet")
    resnet = _renamer(_UNET_RESNET)
    rules: list[Rule] = [
        ("time_embedding.linear_1", "time_embed.0", _same),
        ("time_embedding.linear_2", "time_embed.2", _same),
        ("conv_in", "input_blocks.0.0", _same),
        ("conv_norm_out", "out.0", _same),
        ("conv_out", "out.2", _same),
    ]
    # input_blocks.0 is conv_in; then each down block's resnet (+ attention) layers, then its
    # downsampler (all but the last block) as a block of its own.
    index = 1
    for b, kind in enumerate(down_types):
        for j in range(layers):
            rules.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", resnet))
            if "CrossAttn" in kind:
                rules.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", _same))
            index += 1
        if b < len(down_types) - 1:
            rules.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", _same))
            index += 1
    # middle_block: resnet, attention, resnet.
    rules += [
        ("mid_block.resnets.0", "middle_block.0", resnet),
        ("mid_block.attentions.0", "middle_block.1", _same),
        ("mid_block.resnets.1", "middle_block.2", resnet),
    ]
    # Each up block has one layer more than a down block; its upsampler (all but the last block)
    # sits in the block's last layer, after the attention when there is one.
    index = 0
    for b, kind in enumerate(up_types):
        attention = "CrossAttn" in kind
        for j in range(layers + 1):
            rules.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", resnet))
            if attention:
                rules.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", _same))
            if j == layers and b < len(up_types) - 1:
                slot = 2 if attention else 1
                rules.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv", _same))
            index += 1
    return rules


def vae_rules(config: dict) -> list[Rule]:
    """The diffusers -> LDM prefix rules of an AutoencoderKL with this config."""
    num_down = len(config["down_block_types"])
    num_up = len(config["up_block_types"])
    layers = _layers_per_block(config, "VAE")
    resnet = _renamer(_VAE_RESNET)
    rules: list[Rule] = [
        (name, name, _same)
        for name in (
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        )
    ]
    rules += [
        ("encoder.conv_norm_out", "encoder.norm_out", _same),
        ("decoder.conv_norm_out", "decoder.norm_out", _same),
    ]
    for i in range(num_down):
        for j in range(layers):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", resnet))
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", _same))
    # The decoder's up blocks are numbered from the bottom in LDM, from the top in diffusers.
    for i in range(num_up):
        level = num_up - 1 - i
        for j in range(layers + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", resnet))
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", _same))
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", resnet),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", resnet),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _vae_attention),
        ]
    return rules


def _map_key(key: str, tensor: torch.Tensor, rules: list[Rule]) -> tuple[str, torch.Tensor] | None:
    for old, new, convert in rules:
        if key.startswith(old + "."):
            try:
                rest, value = convert(key[len(old) + 1 :], tensor)
            except KeyError:
                return None
            return f"{new}.{rest}", value
    return None


def _apply_rules(state: dict[str, torch.Tensor], rules: list[Rule], what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        mapped = _map_key(key, tensor, rules)
        if mapped is None:
            unknown.append(key)
        else:
            out[mapped[0]] = mapped[1]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise CheckpointError(
            f"The {what} has {len(unknown)} weight(s) the original SD1.5 layout has no place for (e.g. {shown})."
        )
    if len(out) != len(state):
        raise CheckpointError(f"Two {what} weights map to the same original key; the layout is not SD1.5-like.")
    return out


def convert_unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the LDM layout (without `model.diffusion_model.`)."""
    return _apply_rules(state, unet_rules(config), "UNet")


def convert_vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (without `first_stage_model.`)."""
    return _apply_rules(state, vae_rules(config), "VAE")


def convert_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in the layout under `cond_stage_model.transformer.`.

    That layout nests everything under `text_model.` (as transformers < 5.6 did); newer transformers
    save the text model flattened, so the prefix is added back. The `position_ids` buffer is dropped:
    current transformers do not keep it in checkpoints.
    """
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        out["text_model." + key.removeprefix("text_model.")] = tensor
    return out


def _read_weights(folder: Path, stems: tuple[str, ...], variant: str | None) -> dict[str, torch.Tensor]:
    """The state dict saved in a diffusers/transformers model folder (single, sharded or `.bin`)."""
    from safetensors.torch import load_file

    suffix = f".{variant}" if variant else ""
    for stem in stems:
        single = folder / f"{stem}{suffix}.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = folder / f"{stem}{suffix}.safetensors.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(str(folder / shard)))
            return state
    bins = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}
    for stem in stems:
        legacy = folder / f"{bins[stem]}{suffix}.bin"
        if legacy.is_file():
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
            return {k: v.clone() for k, v in state.items()}  # no shared storage: safetensors refuses it
    raise CheckpointError(f"No model weights were found in {folder}.")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; it is not a diffusers model folder.")
    return json.loads(path.read_text())


def ldm_state_dict(diffusers_folder: str | Path, *, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder of a diffusers SD1.5 folder as one original-layout state dict."""
    root = Path(diffusers_folder)
    state: dict[str, torch.Tensor] = {}
    unet = convert_unet_to_ldm(
        _read_weights(root / "unet", ("diffusion_pytorch_model",), variant), _read_config(root / "unet")
    )
    state.update({UNET_PREFIX + k: v for k, v in unet.items()})
    vae = convert_vae_to_ldm(
        _read_weights(root / "vae", ("diffusion_pytorch_model",), variant), _read_config(root / "vae")
    )
    state.update({VAE_PREFIX + k: v for k, v in vae.items()})
    clip = convert_clip_to_ldm(_read_weights(root / "text_encoder", ("model",), variant))
    state.update({CLIP_PREFIX + k: v for k, v in clip.items()})
    return state


def export_single_file(
    diffusers_folder: str | Path,
    out_path: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a diffusers SD1.5 folder's UNet, VAE and CLIP text encoder as one original-layout
    (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) safetensors
    file that ``StableDiffusionPipeline.from_single_file(out_path, config=diffusers_folder)`` loads.

    ``variant`` picks weight files such as ``diffusion_pytorch_model.fp16.safetensors``; ``dtype``
    casts floating-point tensors (default: kept as stored). The file is written under a temporary
    name and renamed into place, so an interrupted export never leaves a partial file at
    ``out_path``. Returns ``out_path``.
    """
    from safetensors.torch import save_file

    out_path = Path(out_path)
    state = ldm_state_dict(diffusers_folder, variant=variant)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_path(out_path) as temp:
        save_file(state, str(temp), metadata={"format": "pt"})
    return out_path
