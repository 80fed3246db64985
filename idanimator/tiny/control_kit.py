"""Tiny random control models for tests and tiny mode, saved as diffusers folders (``save_pretrained``), sized
from the tiny kit's own UNet so their residuals fit it.

A freshly built ControlNet adds nothing (its output convolutions start at zero) and its default initialisation
fades a condition out over the condition encoder's convolutions, so the encoder is He-initialised and every
parameter that starts at zero gets random values: the tiny models then steer the tiny UNet visibly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..extras.control_models import ControlModels
from ..files import atomic_folder
from ..request import CONTROL_KINDS

CONTROL_KIT_VERSION = 2
_EMBEDDING_CHANNELS = (8, 8, 16, 16)  # the condition encoder: three stride-2 convolutions, images -> latents' size


def tiny_control_models(root: str | Path | None = None, base: str | Path | None = None) -> dict[str, Path]:
    """kind -> folder of a tiny random model for every control kind, built once under ``root`` (default: beside
    the ``--tiny`` kit) for the tiny kit's SD1.5 folder ``base`` (default: the ``--tiny`` kit's, built if needed).
    ``ControlModels(tiny_control_models())`` is what tiny mode uses."""
    from .kit import build_tiny_kit, default_tiny_dir

    kit = default_tiny_dir()
    root = Path(root) if root is not None else kit.parent / f"{kit.name}-control"
    base = Path(base) if base is not None else build_tiny_kit(kit)["base"]
    paths = {kind: root / kind for kind in CONTROL_KINDS}
    marker = root / "control-kit.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == CONTROL_KIT_VERSION:
        return paths
    with atomic_folder(root, marker="control-kit.json", what="a tiny control kit") as work:
        _build(work, base)
        (work / "control-kit.json").write_text(json.dumps({"version": CONTROL_KIT_VERSION}))
    return paths


class TinyControlModels(ControlModels):
    """Tiny mode's control models: the tiny random ones, built (once) when a request first asks for control."""

    def path(self, kind: str) -> Path:
        return tiny_control_models()[kind]


def _build(folder: Path, base: Path, seed: int = 0) -> None:
    from diffusers import ControlNetModel, SparseControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    c = unet.config
    torch.manual_seed(seed)
    for kind in CONTROL_KINDS:
        if kind.startswith("sparse-"):
            rgb = kind == "sparse-rgb"
            model = SparseControlNetModel(
                in_channels=c.in_channels,
                conditioning_channels=4 if rgb else 3,  # VAE latents for RGB keyframes, pixels for sketches
                use_simplified_condition_embedding=rgb,
                concat_conditioning_mask=True,
                down_block_types=tuple(_motion_block(t) for t in c.down_block_types),
                block_out_channels=tuple(c.block_out_channels),
                layers_per_block=c.layers_per_block,
                norm_num_groups=c.norm_num_groups,
                cross_attention_dim=c.cross_attention_dim,
                attention_head_dim=c.attention_head_dim,
                conditioning_embedding_out_channels=_EMBEDDING_CHANNELS,
                motion_num_attention_heads=2,
                motion_max_seq_length=32,
            )
        else:
            model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_EMBEDDING_CHANNELS)
        _randomise(model)
        model.save_pretrained(folder / kind)


def _motion_block(block_type: str) -> str:
    return "CrossAttnDownBlockMotion" if "CrossAttn" in block_type else "DownBlockMotion"


@torch.no_grad()
def _randomise(model: torch.nn.Module, std: float = 0.1) -> None:
    """He-initialised condition encoder (its default initialisation fades a condition out over its seven
    convolutions), and random values for every parameter that starts at zero."""
    for module in model.controlnet_cond_embedding.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            module.bias.normal_(0.0, std)
    for parameter in model.parameters():
        if not parameter.any():
            parameter.normal_(0.0, std)
