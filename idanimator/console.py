"""Keeping the terminal for our own lines: the CLI and the app call :func:`quiet_libraries` before importing
torch, diffusers or transformers, so their import-time notices (e.g. transformers' "requires torchvision",
which only means a PIL image processor is used instead) and loading bars do not bury our messages."""

from __future__ import annotations

import os
import warnings


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
