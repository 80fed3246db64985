"""Tiny style LoRAs for the tiny kit's backbone, saved in the layouts real LoRA files come in.

``diffusers``: what diffusers' LoRA training scripts write (PEFT weights converted with
``convert_state_dict_to_diffusers`` and saved by ``StableDiffusionLoraLoaderMixin.save_lora_weights``);
``kohya``: the kohya-ss / A1111 layout (``lora_unet_…`` and ``lora_te_…`` with ``lora_down``/``lora_up``/
``alpha``). Both hold LoRAs on every spatial attention of the UNet and every self-attention of the text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(model: torch.nn.Module, targets: list[str], rank: int, std: float, seed: int) -> dict:
    """PEFT LoRA weights (``lora_A``/``lora_B``) for ``targets`` of ``model``, drawn from a seeded normal."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    state = get_peft_model_state_dict(model)
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) * std for key, value in state.items()}


def tiny_lora_weights(base: str | Path, *, rank: int = 4, std: float = 0.1, seed: int = 0) -> tuple[dict, dict]:
    """PEFT LoRA weights for the kit's UNet and text encoder (``base``: its SD1.5 folder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    return (
        _random_lora(unet, _UNET_TARGETS, rank, std, seed),
        _random_lora(text_encoder, _TEXT_TARGETS, rank, std, seed + 1),
    )


def save_tiny_lora(
    base: str | Path,
    path: str | Path,
    *,
    layout: str = "diffusers",
    text_encoder: bool = True,
    unet: bool = True,
    rank: int = 4,
    std: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write a random LoRA for the kit's backbone to ``path`` (a .safetensors file) in ``layout``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet_lora, text_lora = tiny_lora_weights(base, rank=rank, std=std, seed=seed)
    unet_lora = unet_lora if unet else {}
    # Files made with transformers 4 name the text encoder's layers text_model.*; transformers 5 dropped it.
    text_lora = {f"text_model.{k}": v for k, v in text_lora.items()} if text_encoder else {}
    if layout == "diffusers":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            path.parent,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_lora) or None,
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_lora) or None,
            weight_name=path.name,
        )
        return path
    if layout != "kohya":
        raise ValueError(f"layout must be 'diffusers' or 'kohya', not {layout!r}")
    flat = {}
    for prefix, state in (("lora_unet_", unet_lora), ("lora_te_", text_lora)):
        for key, value in state.items():
            module, _, part = key.rpartition(".lora_")  # "down_blocks.0....to_q", "A.weight"
            name = prefix + module.replace(".", "_")
            flat[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
            flat[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(flat, str(path))
    return path


def save_sdxl_lora(path: str | Path, rank: int = 4) -> Path:
    """A small LoRA with SDXL's names and shapes (2048-wide cross-attention, a second text encoder)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    text = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{attn}.to_k.lora.down.weight": torch.zeros(rank, 2048),
            f"{attn}.to_k.lora.up.weight": torch.zeros(640, rank),
            f"{text}.lora_linear_layer.down.weight": torch.zeros(rank, 1280),
            f"{text}.lora_linear_layer.up.weight": torch.zeros(1280, rank),
        },
        str(path),
    )
    return path
