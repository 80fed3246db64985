"""A tiny AnimateLCM for the fast mode, in the real repository's on-disk layout.

``wangfuyun/AnimateLCM`` holds, in its root, a diffusers MotionAdapter (``config.json`` +
``diffusion_pytorch_model.safetensors``) and the spatial LCM LoRA ``AnimateLCM_sd15_t2v_lora.safetensors`` in the
kohya/A1111 layout that AnimateLCM's own loader reads (``lora_unet_<module path with underscores>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``) on the attention layers of the SD1.5 UNet (q/k/v/out of both attentions, the
feed-forward, proj_in/proj_out). The tiny one is the same for the tiny kit: a MotionAdapter with the kit's
configuration and other random weights, and a LoRA on the kit UNet's attention layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_folder
from ..registry import ANIMATELCM_LORA as LORA_FILE

FAST_KIT_VERSION = 1
TINY_LCM_LORA_RANK = 4

# The layers AnimateLCM's spatial LoRA adapts (in every transformer block of the SD1.5 UNet).
_LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)


def lora_target_names(unet) -> list[str]:
    """The names of the UNet's modules a spatial LCM LoRA adapts."""
    return [
        name
        for name, module in unet.named_modules()
        if ".attentions." in f".{name}" and name.endswith(_LORA_TARGETS) and hasattr(module, "weight")
    ]


def kohya_lora(unet, *, rank: int = TINY_LCM_LORA_RANK, seed: int = 1, std: float = 0.3) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet``'s attention layers with kohya keys (alpha = rank, so its scale is 1 in every
    loader). Large enough to change the tiny model's output clearly."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in lora_target_names(unet):
        weight = unet.get_submodule(name).weight
        out_features, in_features = weight.shape[:2]
        extra = (1, 1) if weight.dim() == 4 else ()  # proj_in/proj_out are 1x1 convolutions in SD1.5
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(rank, in_features, *extra, generator=generator) * (std / in_features**0.5)
        up = torch.randn(out_features, rank, *extra, generator=generator) * std
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def fast_kit_paths(root: str | Path) -> dict[str, Path]:
    root = Path(root)
    return {"folder": root, "motion_adapter": root, "lora": root / LORA_FILE}


def default_fast_kit_dir() -> Path:
    """Next to the tiny kit (``$IDANIMATOR_CACHE``), outside it: rebuilding one leaves the other."""
    from .kit import default_tiny_dir

    tiny = default_tiny_dir()
    return tiny.parent / f"{tiny.name}-animatelcm-v{FAST_KIT_VERSION}"


def build_fast_kit(
    root: str | Path | None = None, kit: dict[str, Path] | None = None, *, seed: int = 1
) -> dict[str, Path]:
    """Build (once) the tiny AnimateLCM folder for the tiny kit ``kit`` (the default kit, built if needed).

    Built in a temporary sibling folder and renamed into place, so an interrupted build leaves nothing half-made.
    """
    from diffusers import MotionAdapter, UNet2DConditionModel
    from safetensors.torch import save_file

    from .kit import build_tiny_kit, default_tiny_dir

    root = Path(root) if root is not None else default_fast_kit_dir()
    paths = fast_kit_paths(root)
    if (root / "kit.json").is_file():
        return paths
    kit = kit or build_tiny_kit(default_tiny_dir())
    with atomic_folder(root, marker="kit.json", what="a tiny fast-mode kit") as work:
        torch.manual_seed(seed)  # the kit's configuration, other random weights
        MotionAdapter.from_config(MotionAdapter.load_config(kit["motion_adapter"])).save_pretrained(work)
        unet = UNet2DConditionModel.from_pretrained(kit["base"], subfolder="unet")
        save_file(kohya_lora(unet, seed=seed), str(work / LORA_FILE), metadata={"format": "pt"})
        (work / "kit.json").write_text(json.dumps({"version": FAST_KIT_VERSION, "seed": seed}))
    return paths
