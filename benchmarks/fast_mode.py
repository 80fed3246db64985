"""Fast mode (AnimateLCM) against the release's settings on the tiny kit, side by side in one process.

    python benchmarks/fast_mode.py [--frames N] [--size PX] [--repeats N] [--threads N]

* ``fast_vs_standard``: a standard request (30 DDIM steps, guidance 8) / a fast one (6 LCM steps, guidance 1.5),
  both from aligned face crops to decoded frames, alternating; medians.
* ``same_steps_ratio``: the fast request / the same 6 steps at guidance 1.5 without fast mode: what the LoRA layers
  and the swap cost on top of the steps themselves.
* ``fast_switch_s``: putting fast mode on and taking it off around no denoising, once AnimateLCM is loaded (motion
  swap, LoRA on and off, scheduler); ``lora_load_s``: the same when the LoRA must be loaded first (the first fast
  request of a pipeline).
* ``kept_lora_ratio``: a standard request with AnimateLCM's LoRA kept (inactive) on the UNet / without it.

On the tiny kit a step is cheap, so the fixed costs (text and face encoding, decoding, the LoRA's load) weigh
more than at real size, where the ratio approaches the step ratio (30 x 2 / 6 x 2 = 5). ``cpu.py`` can call
:func:`fast_vs_standard` directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a person smiling"


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def fast_vs_standard(photo: str | Path, *, frames: int = 16, size: int = 64, repeats: int = 3) -> dict:
    """Times of a standard and a fast request on the tiny kit (same photo, prompt and seed), their ratios, and what
    switching fast mode on and off costs."""
    from idanimator.extras import fast
    from idanimator.pipeline import IDAnimatorPipeline
    from idanimator.request import GenerationRequest
    from idanimator.settings import FAST_GUIDANCE, FAST_STEPS, GUIDANCE, STEPS
    from idanimator.tiny.fast_kit import build_fast_kit

    pipe = IDAnimatorPipeline.from_pretrained(tiny=True, device="cpu", fast_weights=build_fast_kit()["folder"])
    pipe.pipe.set_progress_bar_config(disable=True)
    crops = pipe.prepare_faces([str(photo)])  # detection is not part of either side
    common = dict(num_frames=frames, height=size, width=size, seed=0)
    runs = {
        "standard": dict(num_inference_steps=STEPS.default, guidance_scale=GUIDANCE.default),
        "fast": dict(num_inference_steps=FAST_STEPS, guidance_scale=FAST_GUIDANCE, fast=True),
        "same_steps": dict(num_inference_steps=FAST_STEPS, guidance_scale=FAST_GUIDANCE),
    }
    for options in runs.values():  # first calls pay one-off costs (fast mode: loading AnimateLCM, once)
        pipe(crops, PROMPT, **common, **options)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, options in runs.items():
            times[name].append(_timed(lambda o=options: pipe(crops, PROMPT, **common, **o)))
    median = {name: statistics.median(values) for name, values in times.items()}

    request = GenerationRequest(prompt=PROMPT, num_inference_steps=FAST_STEPS, fast=True).validate()
    unet = pipe.pipe.unet

    def switch():  # fast mode on and off around no denoising
        with fast.fast_mode(pipe.pipe, request, pipe.fast_weights):
            pass

    switch_s = statistics.median(_timed(switch) for _ in range(max(repeats, 5)))
    load_s = statistics.median(_timed(lambda: (fast.remove_lcm_lora(unet), switch())) for _ in range(3))
    same_steps = runs["same_steps"]
    fast.remove_lcm_lora(unet)  # the same steps without any PEFT layer, against the kept (inactive) LoRA's
    bare = statistics.median(_timed(lambda: pipe(crops, PROMPT, **common, **same_steps)) for _ in range(repeats))
    switch()
    kept = statistics.median(_timed(lambda: pipe(crops, PROMPT, **common, **same_steps)) for _ in range(repeats))
    return {
        "standard_s": median["standard"],
        "fast_s": median["fast"],
        "same_steps_s": median["same_steps"],
        "fast_vs_standard": median["standard"] / median["fast"],
        "same_steps_ratio": median["fast"] / median["same_steps"],
        "fast_switch_s": switch_s,
        "lora_load_s": load_s,
        "kept_lora_ratio": kept / bare,
        "request": {
            **common,
            "standard": runs["standard"],
            "fast": {"num_inference_steps": FAST_STEPS, "guidance": FAST_GUIDANCE},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (1 keeps figures steady on a shared machine)")
    args = parser.parse_args()
    import tempfile

    import torch
    from PIL import Image
    from skimage import data

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "astronaut.png"
        Image.fromarray(data.astronaut()).save(photo)
        result = fast_vs_standard(photo, frames=args.frames, size=args.size, repeats=args.repeats)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
