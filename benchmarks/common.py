"""What the CPU benchmarks share: the prompt, the face photo, a timer and the median.

``cpu.py`` and ``options.py`` both import this (run as scripts, ``benchmarks/`` is on ``sys.path``); neither
imports the other's helpers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

PROMPT = "a person smiling"


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """Seconds ``function()`` took, and what it returned."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def face_photo(folder: Path) -> Path:
    """A real face photo (scikit-image's astronaut, public domain) as a PNG file, as a user uploads it."""
    from PIL import Image
    from skimage import data

    path = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path
