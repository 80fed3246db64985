"""idanimator: zero-shot identity-preserving human video generation (ID-Animator) on diffusers."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["IDAnimatorPipeline", "GenerationResult", "GenerationSettings"]

if TYPE_CHECKING:
    from .pipeline import GenerationResult, IDAnimatorPipeline
    from .settings import GenerationSettings


def __getattr__(name: str):
    # Lazy: `import idanimator` stays cheap (torch and diffusers load on first use).
    if name == "GenerationSettings":
        from .settings import GenerationSettings

        return GenerationSettings
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
