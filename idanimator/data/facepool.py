"""A clip's face pool: faces from frames picked at random across the clip, aligned exactly as at inference.

Training with a random reference (the paper's face pool) needs several views of the clip's person. For each
clip, twice as many candidate frames as wanted faces are drawn, one at random from each of equal stretches of
the clip (spread over the whole clip, yet random), with a generator seeded by the clip's id (the same faces
on every run, whatever the order videos are processed in). Each candidate goes through
:func:`idanimator.face.crop_face`, the very function inference uses (largest face, ArcFace-template warp,
bicubic 224), and is kept only if its face is clear:

* detection score of at least ``min_score``;
* face box at least ``min_size`` pixels across (the inference minimum by default);
* sharp: the variance of the Laplacian of the grey 112x112 aligned face is at least ``min_sharpness`` (a
  focus measure; sharp faces score in the hundreds, a 7-pixel Gaussian blur brings one to about 40);
* only one face in the frame (with two people, "the largest" may switch between them from frame to frame).

The first ``faces_per_clip`` accepted candidates in the random order form the pool, saved as
``faces/<clip_id>/<frame:06d>.png``.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import FaceTooSmallError, InvalidImageError, NoFaceError
from ..face import MIN_FACE_SIZE, FaceCrop, FaceDetector, crop_face
from ..files import atomic_path, ensure_folder
from .shots import Clip

FACES_PER_CLIP = 8
OVERSAMPLE = 2  # candidates per wanted face: room for frames that fail the filter


@dataclass(frozen=True)
class FaceFilter:
    min_score: float = 0.8
    min_size: float = MIN_FACE_SIZE
    min_sharpness: float = 30.0
    single_face: bool = True


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey image: low for a blurred face."""
    import cv2

    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def judge_frame(frame: np.ndarray, detector: FaceDetector, rules: FaceFilter) -> tuple[FaceCrop | None, str]:
    """The aligned face of a frame and "", or None and the reason it was turned down."""
    try:
        crop = crop_face(frame, detector, min_face_size=rules.min_size)
    except NoFaceError:
        return None, "no face"
    except FaceTooSmallError:
        return None, "face too small"
    except InvalidImageError:
        return None, "frame too small"
    if rules.single_face and crop.num_faces > 1:
        return None, "several faces"
    if crop.face.score < rules.min_score:
        return None, "low detection score"
    if sharpness(crop.aligned) < rules.min_sharpness:
        return None, "blurry"
    return crop, ""


def candidate_frames(clip: Clip, wanted: int, seed: str) -> list[int]:
    """Up to ``OVERSAMPLE * wanted`` distinct frames of the clip, one drawn at random from each of as many equal
    stretches, returned in the (seeded, random) order in which they are preferred."""
    rng = random.Random(seed)
    count = max(1, min(len(clip), OVERSAMPLE * wanted))
    edges = np.linspace(clip.start, clip.end, count + 1)
    frames = []
    for low, high in zip(edges[:-1], edges[1:], strict=False):
        first, last = int(np.ceil(low - 1e-6)), int(np.ceil(high - 1e-6)) - 1  # each stretch is >= 1 frame wide
        frames.append(rng.randint(first, max(first, last)))
    frames = list(dict.fromkeys(frames))
    rng.shuffle(frames)
    return frames


@dataclass
class FacePool:
    """Collects one clip's faces as its candidate frames arrive (in any order)."""

    clip: Clip
    candidates: list[int]  # preferred first
    wanted: int
    rules: FaceFilter
    accepted: dict[int, FaceCrop] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    best_frame: np.ndarray | None = None  # the full frame with the largest accepted face (for a captioner)
    _best_area: float = 0.0

    def offer(self, index: int, frame: np.ndarray, detector: FaceDetector, keep_frame: bool = False) -> None:
        crop, reason = judge_frame(frame, detector, self.rules)
        if crop is None:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            return
        self.accepted[index] = crop
        if keep_frame and crop.face.area > self._best_area:
            self.best_frame, self._best_area = frame, crop.face.area

    def chosen(self) -> list[tuple[int, FaceCrop]]:
        """The first ``wanted`` accepted candidates in order of preference, sorted by frame."""
        picked = [index for index in self.candidates if index in self.accepted][: self.wanted]
        return [(index, self.accepted[index]) for index in sorted(picked)]

    def why_empty(self) -> str:
        if not self.rejected:
            return "no frame could be examined"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        return f"no usable face in {sum(self.rejected.values())} sampled frames ({reasons})"


def save_faces(faces: list[tuple[int, FaceCrop]], folder: Path) -> list[Path]:
    """Write each face's CLIP input (224x224, as at inference) as ``folder/<frame:06d>.png``; a pool from an
    earlier run with other settings is replaced, not mixed in. The pool is written into a hidden sibling
    folder and renamed into place, so ``folder`` is only ever a whole pool (or missing for an instant)."""
    work = folder.with_name(f".{folder.name}.partial-{secrets.token_hex(4)}")
    try:
        ensure_folder(work)
        for index, crop in faces:
            with atomic_path(work / f"{index:06d}.png") as temp:
                crop.image.save(temp, format="PNG")
        if folder.is_dir():
            shutil.rmtree(folder)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [folder / f"{index:06d}.png" for index, _ in faces]
