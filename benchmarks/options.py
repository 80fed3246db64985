"""What each option beyond the release costs, on the tiny kit, side by side in one process.

    python benchmarks/options.py [--quick] [--json] [--threads N]

Every request starts from the same aligned face crop (detection is not part of it) and ends with decoded
frames; the cases alternate and the medians are compared with the plain request (the release's settings at
tiny size: 16 frames, 25 DDIM steps, guidance 8, 64x64):

* ``fast_speedup``: plain / fast mode (AnimateLCM, its own 6 LCM steps at guidance 1.5).
* ``free_init_cost``: FreeInit (3 denoising passes) / plain.
* ``lora_cost``: one style LoRA (loaded, applied and removed within the request) / plain.
* ``sparse_sketch_cost``, ``canny_cost``: SparseCtrl with one sketch keyframe, a ControlNet on a driving
  video's canny edges / plain.
* ``long_video_per_frame``: a 48-frame video (FreeNoise windows of 16, stride 4) per frame / the plain 16-frame
  video per frame.

On the tiny kit a step is cheap, so fixed costs (text and face encoding, decoding, a LoRA's load) weigh more
than at real size. ``cpu.py`` runs this too and prints these figures with its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import PROMPT, face_photo, timed  # benchmarks/common.py


def driving_video(folder: Path, frames: int) -> Path:
    """A short video of a moving real face (scikit-image's astronaut), as a driving video."""
    from skimage import data

    from idanimator.video import write_mp4

    image = data.astronaut()
    return write_mp4([image[8 * i : 8 * i + 320, 6 * i : 6 * i + 320] for i in range(frames)], folder / "drive.mp4")


def option_costs(photo: Path, folder: Path, request: dict, repeats: int) -> dict:
    from idanimator.pipeline import IDAnimatorPipeline
    from idanimator.request import ControlSpec, KeyFrame, LoraSpec
    from idanimator.settings import FAST_GUIDANCE, FAST_STEPS
    from idanimator.tiny.load import tiny_lora_folder

    pipe = IDAnimatorPipeline.from_pretrained("tiny", tiny=True, device="cpu")
    pipe.pipe.set_progress_bar_config(disable=True)
    crops = pipe.prepare_faces([str(photo)])
    lora = tiny_lora_folder() / "tiny-style.safetensors"
    video = driving_video(folder, request["num_frames"])
    long_frames = 48 if request["num_frames"] > 2 else 34
    cases = {
        "plain": {},
        "fast": {"num_inference_steps": FAST_STEPS, "guidance_scale": FAST_GUIDANCE, "fast": True},
        "free_init": {"free_init": True},
        "lora": {"loras": (LoraSpec(str(lora), 0.8),)},
        "sparse_sketch": {"control": ControlSpec("sparse-sketch", (KeyFrame(str(photo), 0),))},
        "canny": {"control": ControlSpec("canny", video=str(video))},
        "long": {"num_frames": long_frames},
    }

    def run(name: str) -> None:  # each case: the request's fields it changes
        pipe(crops, PROMPT, **{**request, **cases[name]}, seed=0)

    for name in cases:  # first calls pay one-off costs (loading AnimateLCM, the control models)
        run(name)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name in cases:
            times[name].append(timed(lambda n=name: run(n))[0])
    s = {name: statistics.median(values) for name, values in times.items()}
    return {
        "fast_speedup": s["plain"] / s["fast"],
        "free_init_cost": s["free_init"] / s["plain"],
        "lora_cost": s["lora"] / s["plain"],
        "sparse_sketch_cost": s["sparse_sketch"] / s["plain"],
        "canny_cost": s["canny"] / s["plain"],
        "long_video_per_frame": (s["long"] / long_frames) / (s["plain"] / request["num_frames"]),
        "seconds": s,
        "request": {
            **request,
            "fast": {"num_inference_steps": FAST_STEPS, "guidance_scale": FAST_GUIDANCE},
            "long": long_frames,
        },
    }


def table(costs: dict) -> str:
    s = costs["seconds"]
    rows = [
        ("fast_speedup", costs["fast_speedup"], f"plain {s['plain']:.2f} s / fast {s['fast']:.2f} s"),
        ("free_init_cost", costs["free_init_cost"], f"FreeInit {s['free_init']:.2f} s / plain"),
        ("lora_cost", costs["lora_cost"], f"one style LoRA {s['lora']:.2f} s / plain"),
        ("sparse_sketch_cost", costs["sparse_sketch_cost"], f"one sketch keyframe {s['sparse_sketch']:.2f} s / plain"),
        ("canny_cost", costs["canny_cost"], f"canny ControlNet {s['canny']:.2f} s / plain"),
        ("long_video_per_frame", costs["long_video_per_frame"],
         f"{costs['request']['long']} frames {s['long']:.2f} s, per frame / plain per frame"),
    ]  # fmt: skip
    return "\n".join(f"{key:<22}  {value:7.2f}  {detail}" for key, value, detail in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--threads", type=int, help="torch threads (1 keeps figures steady on a shared machine)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    request = {"num_frames": 16, "num_inference_steps": 25, "height": 64, "width": 64}
    with tempfile.TemporaryDirectory(prefix="idanimator-options-") as tmp:
        costs = option_costs(face_photo(Path(tmp)), Path(tmp), request, 1 if args.quick else 3)
    print(json.dumps(costs, indent=2) if args.json else table(costs), file=sys.stdout)


if __name__ == "__main__":
    main()
