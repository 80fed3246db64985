"""Keeping the terminal for our own lines: the CLI and the app call :func:`quiet_libraries` before importing
torch, diffusers or transformers, so their import-time notices (e.g. transformers' "requires torchvision",
which only means a PIL image processor is used instead) and loading bars do not bury our messages.

Progress: on a terminal, tqdm bars; anywhere else (a log file, a pipe, a batch job's output) plain lines, since
bars redrawn in place leave carriage returns and cursor codes (``\x1b[A``) in a log (:func:`progress`,
:func:`step_lines`)."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def quiet_libraries() -> None:
    # Read by diffusers and transformers when they are first imported; set only if the user has not.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # torch's note on a checkpoint's format


def quiet_loading_bars() -> None:
    """After import: the libraries' per-file loading bars go (our own progress bars stay)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def interactive(stream=None) -> bool:
    """Whether ``stream`` (stderr by default) is a terminal, where progress bars can redraw in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(items: Iterable[T], *, desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """Each of ``items``, with a tqdm bar on stderr when it is a terminal, else a plain line on stderr after each
    item (``generating: 3/12 videos (41 s)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if interactive():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr)
        return
    started = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        of = f"/{total}" if total else ""
        print(f"{desc}: {done}{of} {unit}s ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)


def step_lines(desc: str = "denoising", lines: int = 10) -> Callable:
    """A step callback (``callback(step, total, latents)``, the pipeline's) that prints about ``lines`` plain
    lines on stderr over a run (``denoising: step 9/30``): progress where a bar cannot redraw."""

    def on_step(step: int, total: int, latents=None) -> None:
        every = max(1, math.ceil(total / lines))
        if (step + 1) % every == 0 or step + 1 == total:
            print(f"{desc}: step {step + 1}/{total}", file=sys.stderr, flush=True)

    return on_step
