"""idanimator: zero-shot identity-preserving human video generation (ID-Animator) on diffusers.

The package, lowest layer first: ``errors``, ``registry``, ``prompts`` -> ``settings`` (every default and
limit) -> ``request`` (GenerationRequest: one request, validated once) -> ``weights``, ``images``, ``video``,
``face``, ``adapter`` -> ``models`` -> ``extras/`` (options beyond the release) and ``tiny/`` (the tiny random
kit) -> ``pipeline`` -> ``service`` -> ``studio`` (the app's engine) and ``batch``; ``data/`` (build-dataset),
``training/`` (train) and ``eval/`` (metrics) beside them; ``cli/`` on top. ``tests/test_architecture.py``
holds the layer of every module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["IDAnimatorPipeline", "GenerationResult", "GenerationRequest"]

if TYPE_CHECKING:
    from .pipeline import GenerationResult, IDAnimatorPipeline
    from .request import GenerationRequest


def __getattr__(name: str):
    # Lazy: `import idanimator` stays cheap (torch and diffusers load on first use).
    if name == "GenerationRequest":
        from .request import GenerationRequest

        return GenerationRequest
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
