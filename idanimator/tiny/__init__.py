"""Tiny mode: random, tiny versions of every part in their real on-disk layouts, and the one place that
chooses them (:func:`load_options`).

Used by tiny mode (``--tiny``, or the app without real weights) and by the tests: every part loads through
exactly the same code as the real weights.
"""

from .kit import (
    TINY_BACKBONES,
    TINY_SETTINGS,
    build_tiny_kit,
    default_tiny_dir,
    random_face_adapter,
    tiny_kit_paths,
)
from .load import load_options, tiny_load_options

__all__ = [
    "TINY_BACKBONES",
    "TINY_SETTINGS",
    "build_tiny_kit",
    "default_tiny_dir",
    "load_options",
    "random_face_adapter",
    "tiny_kit_paths",
    "tiny_load_options",
]
