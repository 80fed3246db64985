"""The tiny-model kit: random, tiny versions of every part in their real on-disk layouts.

Used by the tests and by tiny mode (``--tiny``, or the app without real weights); production code imports
it only for tiny mode.
"""

from .kit import (
    TINY_BACKBONES,
    TINY_SETTINGS,
    build_tiny_kit,
    default_tiny_dir,
    random_face_adapter,
    tiny_kit_paths,
)
from .options import tiny_load_options

__all__ = [
    "TINY_BACKBONES",
    "TINY_SETTINGS",
    "build_tiny_kit",
    "default_tiny_dir",
    "random_face_adapter",
    "tiny_kit_paths",
    "tiny_load_options",
]
