"""Where tiny mode is chosen: :func:`load_options` gives the real parts' LoadOptions, or the tiny kit's.

Every caller (``IDAnimatorPipeline.from_pretrained``, the studio, training, the CLI) asks here instead of
choosing between the two itself. Tiny mode takes every part not given from the tiny random kit, and the
extras' models (control, fast mode, style LoRAs) are tiny too, built when a request first needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .kit import TINY_BACKBONES, build_tiny_kit, default_tiny_dir

if TYPE_CHECKING:
    import torch

    from ..models import LoadOptions

TINY_STYLE_LORAS = {"tiny-style": 0, "tiny-style-kohya": 1}  # name -> seed; the second in kohya's layout


def load_options(
    *,
    tiny: bool,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    offload: str = "none",
    **parts,
) -> LoadOptions:
    """Where every part comes from and how pipelines are placed (float16 on CUDA, float32 on the CPU unless
    ``dtype`` says otherwise). ``parts``: any other :class:`LoadOptions` field (``face_adapter``,
    ``motion_adapter``, ``image_encoder``, ``base``, ``allow_hub_ids``, ...); a part given as None is the
    registry's, or with ``tiny`` the tiny kit's."""
    from ..models import LoadOptions  # here, so importing the tiny kit does not import diffusers

    if tiny:
        return tiny_load_options(device=device, dtype=dtype, offload=offload, **parts)
    return LoadOptions.for_device(device, dtype, offload=offload, **parts)


def tiny_fast_folder() -> Path:
    """The tiny AnimateLCM folder (built on first use): tiny mode's fast-mode weights."""
    from .fast_kit import build_fast_kit

    return build_fast_kit()["folder"]


def tiny_lora_folder() -> Path:
    """A folder of tiny random style LoRAs for the tiny kit (built on first use): tiny mode's LoRA choices."""
    from .lora_kit import save_tiny_lora

    kit = build_tiny_kit(default_tiny_dir())
    folder = default_tiny_dir().parent / f"{default_tiny_dir().name}-loras"
    for name, seed in TINY_STYLE_LORAS.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            layout = "kohya" if name.endswith("kohya") else "diffusers"
            temp = save_tiny_lora(kit["base"], folder / f".{name}.partial.safetensors", layout=layout, seed=seed)
            temp.replace(path)
    return folder


def tiny_load_options(root: str | Path | None = None, **overrides) -> LoadOptions:
    """LoadOptions that take every part not given in ``overrides`` from the tiny kit (built on first use); the
    extras' models (control, fast mode, style LoRAs) are tiny too, built when a request first needs them."""
    from ..models import LoadOptions
    from .control_kit import TinyControlModels

    kit = build_tiny_kit(root or default_tiny_dir())
    parts = {
        part: overrides.pop(part, None) or kit[part] for part in ("face_adapter", "motion_adapter", "image_encoder")
    }
    return LoadOptions.for_device(
        **parts,
        base=overrides.pop("base", None) or kit["base"],
        backbones=tuple((name, kit[part]) for name, part in TINY_BACKBONES.items()),
        default_backbone=next(iter(TINY_BACKBONES)),
        tiny=True,
        control_models=overrides.pop("control_models", None) or TinyControlModels(),
        fast_weights=overrides.pop("fast_weights", None) or tiny_fast_folder,
        lora_dir=overrides.pop("lora_dir", None) or tiny_lora_folder,
        **overrides,
    )
