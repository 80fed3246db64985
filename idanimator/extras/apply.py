"""Put a request's extras on a pipeline for one denoising call, and take them off again after it.

Each option is a context manager ``applied(pipeline, settings, extras, call)`` in its own module: it may change
the diffusers pipeline's state (LoRA adapters, FreeInit, FreeNoise), add arguments to the call, or swap the
pipeline that is called (a ControlNet pipeline sharing the same modules), and it undoes all of it on exit,
error or not, so a cached pipeline is the same for the next request whatever this one asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from .spec import Extras

# The order they are put on (and taken off in reverse). Each module is imported when the list is read.
_STEPS: tuple[str, ...] = ("fast", "control", "loras", "freeinit", "longvideo")


@dataclass
class Call:
    """One call of a diffusers pipeline: which one, and its keyword arguments."""

    pipe: object
    kwargs: dict = field(default_factory=dict)

    def __call__(self):
        return self.pipe(**self.kwargs)


@contextmanager
def applied(pipeline, settings, extras: Extras, call: Call) -> Iterator[Call]:
    from importlib import import_module

    with ExitStack() as stack:
        for name in _STEPS:
            stack.enter_context(import_module(f"{__package__}.{name}").applied(pipeline, settings, extras, call))
        yield call
