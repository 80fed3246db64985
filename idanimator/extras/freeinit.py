"""FreeInit for one call: diffusers' ``FreeInitMixin`` re-runs the whole denoising loop from noise whose low
frequencies come from the previous pass's result, which steadies the video over time (arXiv 2312.07537).

Cost: ITERATIONS full denoising loops; the prompt and the faces are encoded once. Measured on the tiny kit
(CPU, one thread), a call took 2.6 times as long with the default 3 iterations at 8 frames 64x64 4 steps, and
2.5 times at 16 frames 128x128 (the fixed work of a call is not repeated). At real sizes, where the UNet is nearly
all of it, expect 3 times, plus the frequency filter diffusers builds in a Python loop at the start of every pass
after the first: 0.5 s for 16 frames at 512x512, 4.4 s for 128 frames (same CPU).

Progress: the pipeline's step callback runs once per step of every pass, with the pass's own step index.
While FreeInit is on it is renumbered so that, against the request's ``steps``, it moves steadily from the
first step of the first pass to the last step of the last (each number is reported ITERATIONS times); the
stop check still runs at every step of every pass. The face embeddings are passed once and used by every pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

ITERATIONS = 3  # diffusers' and the paper's default
_METHOD = "butterworth"


def passes(extras) -> int:
    """How many denoising passes a request's extras make (for time estimates)."""
    return ITERATIONS if extras.free_init else 1


@contextmanager
def applied(pipeline, settings, extras, call) -> Iterator:
    if not extras.free_init:
        yield call
        return
    pipe = call.pipe  # the pipeline that runs (a control option may have swapped it in)
    inner = call.kwargs.get("callback_on_step_end")
    if inner is not None:
        call.kwargs["callback_on_step_end"] = _renumbered(inner, call, settings.steps)
    pipe.enable_free_init(num_iters=ITERATIONS, method=_METHOD)
    try:
        yield call
    finally:
        pipe.disable_free_init()
        pipe.__dict__.pop("_free_init_initial_noise", None)  # the first pass's noise, kept by diffusers
        if inner is not None:
            call.kwargs["callback_on_step_end"] = inner


def _renumbered(inner, call, steps: int):
    """A step callback that passes ``inner`` a step index moving once through 0..steps-1 over all passes (the
    steps of one pass are read from the call when it runs, in case another option changed them)."""
    done = [0]  # steps run so far, over every pass

    def on_step_end(pipe, step, timestep, tensors):
        total = call.kwargs.get("num_inference_steps", steps) * ITERATIONS
        overall = min(done[0] * steps // total, steps - 1)
        done[0] += 1
        return inner(pipe, overall, timestep, tensors)

    return on_step_end
