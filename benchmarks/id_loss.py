"""What the identity loss costs the data loader: a training sample with and without the landmarks of its K frames.

    python benchmarks/id_loss.py [--size 512] [--frames 16] [--id-frames 2] [--repeats 12] [--threads 1]
                                 [--detector retinaface|insightface|auto] [--smoke] [--json]

A sample is what ``train``'s data loader makes of a clip (:class:`idanimator.training.dataset.ClipDataset`):
``--frames`` frames decoded from an MP4 and cropped to ``--size``, the reference face for CLIP, and with the
identity loss on, the face detector on ``--id-frames`` of those frames and the reference for ArcFace. The clip
is a 512x512 pan across scikit-image's astronaut (a real face in every frame), 72 frames. The cases alternate,
each over the same stream positions, and their medians are compared:

* ``loader_ratio``: a sample with the identity loss's landmarks / one without.
* ``detect_ms_per_frame``: the extra time per detected frame.

The GPU side of the loss (decoding K frames through the VAE with gradients, ArcFace) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SOURCE_FRAMES = 72


def make_clip(folder: Path, frames: int) -> Path:
    """A data set folder in build-dataset's layout: one clip of a moving real face, its face pool."""
    import numpy as np
    from skimage import data

    from idanimator.face import crop_face
    from idanimator.video import write_mp4

    photo = np.pad(data.astronaut(), ((64, 64), (64, 64), (0, 0)), mode="reflect")
    video = [photo[t : t + 512, t : t + 512] for t in range(frames)]  # the camera pans
    write_mp4(video, folder / "videos" / "a.mp4", fps=24)
    faces = []
    for index in range(0, frames, frames // 4):
        path = folder / "faces" / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop_face(video[index], "retinaface").image.save(path)
        faces.append((str(path.relative_to(folder)), index))
    record = {
        "clip_id": "a",
        "video": "videos/a.mp4",
        "start_frame": 0,
        "end_frame": frames,
        "fps": 24.0,
        "width": 512,
        "height": 512,
        "identity": "astronaut",
        "caption_attribute": "an astronaut",
        "caption_action": "turns the head",
        "caption": "an astronaut turns the head",
        "faces": [path for path, _ in faces],
        "face_frames": [index for _, index in faces],
    }
    (folder / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return folder


def measure(folder: Path, args) -> dict:
    from idanimator.face import get_detector
    from idanimator.images import clip_image_processor
    from idanimator.training.dataset import ClipDataset, Dropout, load_clips

    clips, _ = load_clips(folder, args.frames)
    get_detector(args.detector)  # loaded once, outside the timings (a data-loading worker loads it once too)
    common = dict(frames=args.frames, stride=args.stride, size=args.size, num_references=1, seed=0)
    datasets = {
        k: ClipDataset(
            clips,
            **common,
            dropout=Dropout(0, 0, 0),
            feature_extractor=clip_image_processor(),
            id_frames=k,
            detector=args.detector,
        )
        for k in (0, args.id_frames)
    }
    times: dict[int, list[float]] = {k: [] for k in datasets}
    found = 0
    for position in range(args.repeats + 1):
        for k, dataset in datasets.items():
            start = time.perf_counter()
            sample = dataset[(0, position)]
            if position:  # the first round warms the decoder and the caches
                times[k].append(time.perf_counter() - start)
                found += int(sample["id_found"].sum()) if k else 0
    plain, with_id = statistics.median(times[0]), statistics.median(times[args.id_frames])
    return {
        "loader_ratio": round(with_id / plain, 3),
        "detect_ms_per_frame": round(1000 * (with_id - plain) / args.id_frames, 1),
        "plain_ms": round(1000 * plain, 1),
        "with_landmarks_ms": round(1000 * with_id, 1),
        "faces_found": f"{found} of {args.repeats * args.id_frames}",
        "settings": {k: getattr(args, k) for k in ("size", "frames", "stride", "id_frames", "repeats", "detector")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--id-frames", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--detector", default="retinaface")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps figures steady)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, two repeats (the tests run this)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.frames, args.stride, args.repeats = 64, 4, 2, 2
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(make_clip(Path(tmp), SOURCE_FRAMES), args)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:22} {value}")


if __name__ == "__main__":
    sys.exit(main())
