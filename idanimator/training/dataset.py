"""Training clips as tensors: the manifest's clips, their frames, and the reference faces each is conditioned on.

A dataset folder holds ``manifest.jsonl`` (one clip a line, written by ``build-dataset``, read with
:func:`idanimator.data.manifest.read_manifest`): the clip's video and frame range, its caption and its face
pool (face crops aligned as inference aligns a photo, and the frame each came from). Per sample, only the
frames used are handed over, shrunk in the decoder to the training size, by the package's one reader
(:mod:`idanimator.video`): frame n is the n-th decoded frame, as ``build-dataset`` counts, and decoding stops
after the last.

The references follow the paper's "random reference training": drawn at random from the clip's own face pool
(faces cropped from frames of the same clip, hence the same person), so the adapter cannot learn to copy the
pose, expression and lighting of the frames it denoises. Never another clip's face (it could be another
identity), and never the face of a frame being denoised while the pool has others.

Every random draw of a sample (its frames, references and condition dropout) comes from the run's seed and
the sample's position in the stream, so a resumed run reads exactly the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.manifest import MANIFEST_NAME, read_manifest
from ..errors import IDAnimatorError
from ..face import ALIGNED_SIZE, detect_faces, get_detector, largest_face
from ..images import CLIP_SIZE, cover_crop
from ..video import read_video

# Every random draw is seeded with (seed, stream, number): the streams keep the draws of different jobs apart.
_SAMPLE_STREAM, _ORDER_STREAM, _HOLD_OUT_STREAM = 0, 1, 2
_ID_STREAM = 3  # the identity loss's frames (its own stream: turning the loss on changes no other draw)


@dataclass(frozen=True)
class PoolFace:
    """One face of a clip's pool: an aligned crop (as inference crops a photo) and the frame it came from."""

    path: Path
    frame: int  # the source video's frame index


def reference_candidates(pool: Sequence[PoolFace], window: Sequence[int]) -> list[int]:
    """Indices into ``pool`` a reference may be drawn from, for a clip whose denoised frames are ``window``.

    Preferred: faces from outside the window's span (not even a neighbour of a denoised frame); else faces
    from frames between the denoised ones; only when every face of the pool is a denoised frame's, all.
    """
    if not pool:
        raise ValueError("A clip with an empty face pool cannot be trained on.")
    first, last, denoised = min(window), max(window), set(window)
    outside = [i for i, face in enumerate(pool) if not first <= face.frame <= last]
    between = [i for i, face in enumerate(pool) if face.frame not in denoised]
    return outside or between or list(range(len(pool)))


def draw_references(pool: Sequence[PoolFace], window: Sequence[int], count: int, rng: np.random.Generator) -> list[int]:
    """``count`` pool indices drawn at random among :func:`reference_candidates` (distinct when the
    candidates are enough, else repeated: a batch needs the same number of references for every clip)."""
    candidates = reference_candidates(pool, window)
    picks = rng.choice(len(candidates), size=count, replace=len(candidates) < count)
    return [candidates[int(i)] for i in picks]


@dataclass(frozen=True)
class TrainingClip:
    """A manifest clip as training reads it (build-dataset's shot is :class:`idanimator.data.shots.Clip`)."""

    clip_id: str
    video: Path
    start: int  # first source frame of the clip
    end: int  # one past its last frame
    fps: float
    caption: str
    identity: str | None
    faces: tuple[PoolFace, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def _clip_from(record) -> TrainingClip:
    faces = zip(record.face_paths, record.face_frames, strict=True)
    return TrainingClip(
        clip_id=record.clip_id,
        video=record.video_path,
        start=record.start_frame,
        end=record.end_frame,
        fps=record.fps,
        caption=record.caption or "",
        identity=record.identity,
        faces=tuple(PoolFace(path, frame) for path, frame in faces),
    )


def load_clips(data: Path, frames: int) -> tuple[list[TrainingClip], str | None]:
    """The clips a run with ``frames`` frames can use, and a sentence counting those skipped (or None).

    A clip is skipped when it is shorter than ``frames``, when its video is missing, or when its face pool
    is empty (face files that are missing are left out of the pool first).
    """
    path = Path(data) / MANIFEST_NAME
    records = read_manifest(path)
    if not records:
        raise IDAnimatorError(f"{path} lists no clips; build the dataset again.")
    clips, short, no_video, no_face, missing_faces = [], 0, [], 0, 0
    for record in records:
        clip = _clip_from(record)
        present = tuple(face for face in clip.faces if face.path.is_file())
        missing_faces += len(clip.faces) - len(present)
        if clip.length < frames:
            short += 1
        elif not clip.video.is_file():
            no_video.append(record.video)  # as the manifest names it
        elif not present:
            no_face += 1
        else:
            clips.append(replace(clip, faces=present))
    reasons = [
        f"{short} shorter than --frames {frames}" if short else "",
        _missing_videos(no_video) if no_video else "",
        f"{no_face} with no face in its pool" if no_face else "",
    ]
    reasons = ", ".join(r for r in reasons if r)
    if not clips:
        raise IDAnimatorError(f"None of the {len(records)} clips in {path} can be used: {reasons}.")
    notes = []
    if reasons:
        notes.append(f"Skipped {len(records) - len(clips)} of {len(records)} clips: {reasons}.")
    if missing_faces:
        notes.append(f"Left out {missing_faces} face files that are missing.")
    return clips, " ".join(notes) or None


def hold_out(clips: list[TrainingClip], count: int, seed: int) -> tuple[list[TrainingClip], list[TrainingClip]]:
    """(training clips, validation clips): every clip of ``count`` identities drawn with the run's seed (a clip
    the manifest gives no identity is one of its own), so no validation face, nor another clip of its person,
    is ever trained on. Both lists keep the manifest's order."""
    if not count:
        return clips, []

    def key(clip: TrainingClip) -> tuple[str, str]:
        return ("identity", clip.identity) if clip.identity else ("clip", clip.clip_id)

    keys = sorted({key(clip) for clip in clips})
    if count >= len(keys):
        raise IDAnimatorError(
            f"--val-clips {count} would hold out all {len(keys)} identities of the usable clips and leave none to "
            "train on; give fewer, or --val-clips 0 to validate on training clips."
        )
    order = np.random.default_rng([seed, _HOLD_OUT_STREAM]).permutation(len(keys))
    chosen = {keys[int(i)] for i in order[:count]}
    return [c for c in clips if key(c) not in chosen], [c for c in clips if key(c) in chosen]


def _missing_videos(videos: list[str], shown: int = 3) -> str:
    """'2 whose video is missing (videos/a.mp4, videos/b.mp4)': the first few videos named, once each."""
    names = list(dict.fromkeys(videos))
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"{len(videos)} whose video is missing ({listed})"


def stride_note(clips: list[TrainingClip], frames: int, stride: int) -> str | None:
    """A sentence counting the clips too short for ``frames`` frames ``stride`` apart (their frames are taken
    closer together, see :func:`sample_window`), or None; said once per run, not per sample."""
    span = (frames - 1) * stride + 1
    short = sum(clip.length < span for clip in clips)
    if not short:
        return None
    return (
        f"{short} of {len(clips)} clips are too short for --frames {frames} at --stride {stride} ({span} source "
        "frames), so their frames are taken closer together."
    )


def sample_window(clip: TrainingClip, frames: int, stride: int, rng: np.random.Generator) -> list[int]:
    """``frames`` source frame indices, ``stride`` apart (less for a clip too short for it, which
    :func:`stride_note` reports once), at a random start."""
    if frames > 1:
        stride = max(1, min(stride, (clip.length - 1) // (frames - 1)))
    span = (frames - 1) * stride + 1
    first = clip.start + int(rng.integers(0, clip.length - span + 1))
    return [first + i * stride for i in range(frames)]


def read_frames(video: Path, indices: list[int], fps: float | None = None, *, cover: int | None = None) -> np.ndarray:
    """Frames ``indices`` (ascending) of a video as [frames, height, width, 3] uint8, addressed as
    ``build-dataset`` counts them (the n-th decoded frame, right on variable frame rate files too); decoding
    stops after the last. ``cover``: shrunk in the decoder to at least ``cover`` x ``cover`` (never enlarged).
    ``fps`` is not used: frames are found by number, not by time."""
    return read_video(video, indices, cover=None if cover is None else (cover, cover)).frames


def clip_input(face: Image.Image) -> Image.Image:
    """An aligned face crop as inference hands it to CLIP: RGB, enlarged (bicubic) to CLIP_SIZE x CLIP_SIZE
    (the 112-pixel aligned crops)."""
    face = face.convert("RGB")
    if face.size != (CLIP_SIZE, CLIP_SIZE):
        face = face.resize((CLIP_SIZE, CLIP_SIZE), Image.Resampling.BICUBIC)
    return face


@dataclass(frozen=True)
class Dropout:
    """Condition dropout for classifier-free guidance: the share of samples without text, face, or both."""

    text: float = 0.05
    face: float = 0.05
    both: float = 0.05

    def draw(self, rng: np.random.Generator) -> tuple[bool, bool]:
        """(drop the text, drop the face)."""
        u = rng.random()
        if u < self.text:
            return True, False
        if u < self.text + self.face:
            return False, True
        return (True, True) if u < self.text + self.face + self.both else (False, False)


class ClipDataset(torch.utils.data.Dataset):
    """Samples keyed by (clip index, stream position); the position seeds every random draw of the sample.

    A sample: ``frames`` [F, 3, size, size] in [-1, 1]; ``faces`` [K, 3, 224, 224], CLIP-normalised pixels,
    all zeros when the face is dropped (what inference's unconditional branch feeds CLIP); ``caption``
    ("" when dropped); ``clip_id``, ``window`` and ``references`` (the pool faces used) for inspection.

    With ``id_frames`` K > 0 (the identity loss), also: ``id_frames`` [K] (positions in the window, drawn at
    random), ``id_landmarks`` [K, 5, 2] and ``id_found`` [K] (the 5 landmarks of the largest face ``detector``
    finds on each of those real frames at the training size; a frame without a face is not found),
    ``id_reference`` [R, 3, 112, 112] (the reference faces, aligned, in [-1, 1]) and ``face_dropped``.
    """

    def __init__(
        self,
        clips: list[TrainingClip],
        *,
        frames: int,
        stride: int,
        size: int,
        num_references: int,
        dropout: Dropout,
        seed: int,
        feature_extractor,
        id_frames: int = 0,
        detector: str = "auto",
    ):
        self.clips, self.frames, self.stride, self.size = clips, frames, stride, size
        self.num_references, self.dropout, self.seed = num_references, dropout, seed
        self.feature_extractor = feature_extractor
        self.id_frames, self.detector = min(id_frames, frames), detector  # a name: each worker loads its own

    def __len__(self) -> int:
        return len(self.clips)

    def rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SAMPLE_STREAM, position])

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        clip, rng = self.clips[index], self.rng(position)
        window = sample_window(clip, self.frames, self.stride, rng)
        chosen = [clip.faces[i] for i in draw_references(clip.faces, window, self.num_references, rng)]
        drop_text, drop_face = self.dropout.draw(rng)
        pixels = read_frames(clip.video, window, cover=self.size)  # cover_crop finishes
        frames = np.stack([np.asarray(cover_crop(Image.fromarray(f), self.size, self.size)) for f in pixels])
        identity = self.identity_targets(frames, chosen, drop_face, position) if self.id_frames else {}
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        faces = [clip_input(Image.open(face.path)) for face in chosen]
        faces = self.feature_extractor(images=faces, return_tensors="pt").pixel_values
        if drop_face:
            faces = torch.zeros_like(faces)
        return {
            "frames": frames,
            "faces": faces,
            "caption": "" if drop_text else clip.caption,
            "clip_id": clip.clip_id,
            "window": window,
            "references": [str(face.path) for face in chosen],
            **identity,
        }

    def identity_targets(self, frames: np.ndarray, chosen: list[PoolFace], drop_face: bool, position: int) -> dict:
        """The identity loss's part of a sample (see the class); ``frames``: [F, size, size, 3] uint8, real."""
        rng = np.random.default_rng([self.seed, _ID_STREAM, position])
        picked = np.sort(rng.choice(len(frames), size=self.id_frames, replace=False))
        landmarks, found = np.zeros((len(picked), 5, 2), np.float32), np.zeros(len(picked), bool)
        detector = get_detector(self.detector)
        for slot, index in enumerate(picked):
            faces = detect_faces(detector, frames[index])
            if faces:
                landmarks[slot], found[slot] = largest_face(faces).landmarks, True
        references = [arcface_input(Image.open(face.path)) for face in chosen]
        return {
            "id_frames": torch.from_numpy(picked.astype(np.int64)),
            "id_landmarks": torch.from_numpy(landmarks),
            "id_found": torch.from_numpy(found),
            "id_reference": torch.stack(references),
            "face_dropped": torch.tensor(drop_face),
        }


def arcface_input(face: Image.Image) -> torch.Tensor:
    """A pool face (the aligned crop, 112 pixels, or CLIP's 224-pixel enlargement of it) as ArcFace's input:
    [3, 112, 112] RGB in [-1, 1]."""
    face = face.convert("RGB")
    if face.size != (ALIGNED_SIZE, ALIGNED_SIZE):
        face = face.resize((ALIGNED_SIZE, ALIGNED_SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(face).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def collate(samples: list[dict]) -> dict:
    """Tensors are stacked (``frames``, ``faces`` and the identity loss's); everything else becomes a list."""
    batch = {key: [s[key] for s in samples] for key in samples[0]}
    return {key: torch.stack(v) if isinstance(v[0], torch.Tensor) else v for key, v in batch.items()}


class ClipStream(torch.utils.data.Sampler):
    """An endless stream of (clip index, position) keys for one process, starting after ``start`` of its
    samples: epoch e is a permutation of the clips drawn from (seed, e), and process p of w takes the
    stream's items p, p + w, p + 2w, ... The same arguments always give the same keys, whatever the
    number of data-loading workers."""

    def __init__(self, num_clips: int, seed: int, *, rank: int = 0, world: int = 1, start: int = 0):
        self.num_clips, self.seed, self.rank, self.world, self.start = num_clips, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position, epoch, order = self.start, -1, None
        while True:
            item = position * self.world + self.rank
            if item // self.num_clips != epoch:
                epoch = item // self.num_clips
                order = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(self.num_clips)
            yield int(order[item % self.num_clips]), item
            position += 1
