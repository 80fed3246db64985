"""How close the page's time estimate comes to the real denoising time, on the tiny kit.

The studio learns its speed from the videos it has made (``studio.SpeedModel``); this script makes a few
calibration videos of different sizes, then for each test request prints the estimate shown before the run,
the denoising time measured in the same run, and their ratio. Targets: every ratio within 0.75-1.25.

    python benchmarks/estimate.py [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import PROMPT, face_photo

CALIBRATION = [
    dict(num_frames=8, num_inference_steps=4),
    dict(num_frames=16, num_inference_steps=8),
    dict(num_frames=8, num_inference_steps=12, height=96),
]
TESTS = {
    "24 frames, 60 steps": dict(num_frames=24, num_inference_steps=60),
    "FreeInit, 8 frames, 10 steps": dict(num_frames=8, num_inference_steps=10, free_init=True),
    "32 frames, 30 steps, 64x96": dict(num_frames=32, num_inference_steps=30, height=96),
    "fast mode, 16 frames": dict(num_frames=16, num_inference_steps=6, guidance_scale=1.5, fast=True),
    "12 frames, 20 steps, no guidance": dict(num_frames=12, num_inference_steps=20, guidance_scale=1.0),
}


def denoising_seconds(studio, photo: Path, fields: dict) -> float:
    """The time from the request's start to its last denoising step (what the estimate predicts)."""
    from idanimator.request import GenerationRequest
    from idanimator.studio import Progress

    request = GenerationRequest(**{"prompt": PROMPT, "seed": 1, "height": 64, "width": 64, **fields})
    job = studio.prepare([str(photo)], request)
    started, last = time.monotonic(), None
    for event in studio.execute(job, stream=False):
        if isinstance(event, Progress):
            last = time.monotonic()
    return last - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from idanimator.request import GenerationRequest
    from idanimator.studio import Studio, StudioOptions

    with tempfile.TemporaryDirectory() as folder:
        studio = Studio(StudioOptions(tiny=True, device="cpu", output_dir=Path(folder)))
        photo = face_photo(Path(folder))
        # Not calibration runs: the models load, and fast mode's AnimateLCM and LoRA load once (one-off costs).
        denoising_seconds(studio, photo, dict(num_frames=8, num_inference_steps=2))
        denoising_seconds(studio, photo, dict(num_frames=8, num_inference_steps=2, guidance_scale=1.5, fast=True))
        studio.speed.runs.clear()
        for fields in CALIBRATION:
            denoising_seconds(studio, photo, fields)
        rows = {}
        for name, fields in TESTS.items():
            request = GenerationRequest(**{"prompt": PROMPT, "height": 64, "width": 64, **fields})
            estimate = studio.estimate_seconds(request)
            kept = list(studio.speed.runs)
            real = denoising_seconds(studio, photo, fields)
            studio.speed.runs = kept  # each test is estimated from the calibration runs only
            rows[name] = {"estimate_s": estimate, "real_s": real, "ratio": estimate / real}
    print(f"{'request':36} {'estimate':>9} {'real':>8} {'ratio':>6}")
    for name, row in rows.items():
        met = "" if 0.75 <= row["ratio"] <= 1.25 else "  [outside 0.75-1.25]"
        print(f"{name:36} {row['estimate_s']:8.2f}s {row['real_s']:7.2f}s {row['ratio']:6.2f}{met}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
