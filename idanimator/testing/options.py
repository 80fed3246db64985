"""Tiny mode's LoadOptions: every part, and the extras' models, from the tiny random kits."""

from __future__ import annotations

from pathlib import Path

from .control_kit import TinyControlModels
from .kit import TINY_BACKBONES, build_tiny_kit, default_tiny_dir


def tiny_load_options(root: str | Path | None = None, **overrides):
    """LoadOptions that take every part not given in ``overrides`` from the tiny kit (built on first use); the
    extras' models (control, fast mode, style LoRAs) are tiny too, built when a request first needs them."""
    from ..models import LoadOptions

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
        **overrides,
    )
