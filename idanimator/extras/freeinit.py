"""FreeInit for one call: diffusers' ``FreeInitMixin`` re-runs the whole denoising loop from noise whose low
frequencies come from the previous pass's result, which steadies the video over time (arXiv 2312.07537).

Cost: ITERATIONS full denoising loops; the prompt and the faces are encoded once (the fixed work of a call is
not repeated). At real sizes, where the UNet is nearly all of it, expect ITERATIONS times, plus the frequency
filter diffusers builds in a Python loop at the start of every pass after the first. Measured figures:
benchmarks/RESULTS.md.

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


def passes(request) -> int:
    """How many denoising passes a request makes (for time estimates)."""
    return ITERATIONS if request.free_init else 1


@contextmanager
def free_init(pipe, request, arguments: dict) -> Iterator[dict]:
    """FreeInit on ``pipe`` (the pipeline that runs: a control pipeline may stand in for the AnimateDiff one) for
    the call, when ``request.free_init``; yields the call's arguments with its step callback renumbered."""
    if not request.free_init:
        yield arguments
        return
    inner = arguments.get("callback_on_step_end")
    if inner is not None:
        steps = arguments.get("num_inference_steps", request.num_inference_steps)
        arguments = {**arguments, "callback_on_step_end": _renumbered(inner, steps, request.num_inference_steps)}
    pipe.enable_free_init(num_iters=ITERATIONS, method=_METHOD)
    try:
        yield arguments
    finally:
        pipe.disable_free_init()
        pipe.__dict__.pop("_free_init_initial_noise", None)  # the first pass's noise, kept by diffusers


def _renumbered(inner, per_pass: int, steps: int):
    """A step callback that passes ``inner`` a step index moving once through 0..steps-1 over all passes of
    ``per_pass`` steps each."""
    done = [0]  # steps run so far, over every pass

    def on_step_end(pipe, step, timestep, tensors):
        total = per_pass * ITERATIONS
        overall = min(done[0] * steps // total, steps - 1)
        done[0] += 1
        return inner(pipe, overall, timestep, tensors)

    return on_step_end
