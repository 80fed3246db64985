"""The FaceSim protocol of ConsisID's released evaluation, for any set of face embedders.

Per video: 16 frames sampled evenly (``linspace(0, n - 1, 16)``); in each, the largest face the detector
finds, or, when none is found, the largest one in the frame padded by a quarter of its height and width on
each side with grey (128) (ConsisID's ``scale=1.25`` pad); a frame still without a face is skipped and
counted. After such a retry ConsisID embeds ArcFace from the padded copy (insightface computes the embedding
where it detected) but cuts the CurricularFace crop from the unpadded frame with the landmarks shifted back
(black beyond the edge); each embedder's ``crop_source`` ("detection" or "frame") does the same here.
Each face's embedding is compared with the reference photo's (found the same way) by cosine
similarity clamped at 0, and the video's score is the mean over the frames with a face. A video with no
face in any sampled frame scores 0.0, as in ConsisID's script, and its face-detection rate says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..face import DetectedFace, FaceDetector, largest_face
from .reader import evenly_spaced

PAD_FRACTION = 0.25  # each side, as a fraction of the frame's height (top, bottom) and width (left, right)
PAD_VALUE = 128


@dataclass
class FoundFace:
    image: np.ndarray  # the frame the face was found in (the padded copy after a retry)
    face: DetectedFace  # in ``image``'s coordinates
    padded: bool
    frame: np.ndarray | None = None  # the unpadded frame; None: ``image`` is the frame
    offset: tuple[int, int] = (0, 0)  # (left, top) border added by the retry

    @property
    def unpadded(self) -> tuple[np.ndarray, DetectedFace]:
        """The frame as given and the face in its coordinates (the landmarks shifted back after a retry)."""
        if not self.padded:
            return self.image, self.face
        return self.frame, self.face.transformed(1.0, -self.offset[0], -self.offset[1])


def pad_grey(rgb: np.ndarray) -> np.ndarray:
    dx, dy = pad_offset(rgb)
    return np.pad(rgb, ((dy, dy), (dx, dx), (0, 0)), constant_values=PAD_VALUE)


def pad_offset(rgb: np.ndarray) -> tuple[int, int]:
    """The (left, top) border :func:`pad_grey` adds: ``int(side * 0.25)``, as ConsisID's ``pad_np_bgr_image``."""
    return int(rgb.shape[1] * PAD_FRACTION), int(rgb.shape[0] * PAD_FRACTION)


def find_face(detector: FaceDetector, rgb: np.ndarray) -> FoundFace | None:
    """The largest face, with one retry on the grey-padded frame; None when there is none."""
    faces = detector.detect(rgb)
    if faces:
        return FoundFace(rgb, largest_face(faces), padded=False)
    padded = pad_grey(rgb)
    faces = detector.detect(padded)
    if faces:
        return FoundFace(padded, largest_face(faces), padded=True, frame=rgb, offset=pad_offset(rgb))
    return None


@dataclass
class IdentityResult:
    scores: dict[str, float]  # metric name -> the video's score
    per_frame: dict[str, list[float | None]]  # metric name -> per sampled frame (None: no face)
    frames_with_face: int
    frames_sampled: int
    notes: list[str] = field(default_factory=list)

    @property
    def face_rate(self) -> float:
        return self.frames_with_face / self.frames_sampled if self.frames_sampled else 0.0


class IdentityScorer:
    """Finds faces with one detector and embeds them with each embedder (``name`` -> ``embed(rgb, face)``)."""

    def __init__(self, detector: FaceDetector, embedders: list):
        self.detector = detector
        self.embedders = embedders

    def embed(self, found: FoundFace) -> dict[str, np.ndarray]:
        embeddings = {}
        for e in self.embedders:
            from_frame = getattr(e, "crop_source", "detection") == "frame"
            image, face = found.unpadded if from_frame else (found.image, found.face)
            embeddings[e.name] = e.embed(image, face)
        return embeddings

    def reference(self, rgb: np.ndarray) -> dict[str, np.ndarray] | None:
        found = find_face(self.detector, rgb)
        return None if found is None else self.embed(found)

    def score_video(self, frames: np.ndarray, reference: dict[str, np.ndarray] | None) -> IdentityResult:
        """Scores against ``reference`` (the embeddings of :meth:`reference`); with None only the faces are
        counted (no similarity)."""
        indices = evenly_spaced(len(frames))
        per_frame: dict[str, list[float | None]] = {e.name: [] for e in self.embedders} if reference else {}
        found_count = 0
        seen: dict[int, tuple[bool, dict[str, np.ndarray]]] = {}  # a short video repeats indices: work once
        for index in indices:
            if index not in seen:
                found = find_face(self.detector, frames[index])
                seen[index] = (found is not None, self.embed(found) if found is not None and reference else {})
            has_face, embeddings = seen[index]
            found_count += has_face
            for name, values in per_frame.items():
                emb = embeddings.get(name)
                values.append(None if emb is None else max(0.0, float(np.dot(emb, reference[name]))))
        scores = {}
        for name, values in per_frame.items():
            seen = [v for v in values if v is not None]
            scores[name] = float(np.mean(seen)) if seen else 0.0
        notes = []
        if found_count == 0:
            notes.append(f"no face in any of the {len(indices)} sampled frames (face similarity counted as 0)")
        elif found_count < len(indices):
            notes.append(f"no face in {len(indices) - found_count} of the {len(indices)} sampled frames (skipped)")
        return IdentityResult(scores, per_frame, found_count, len(indices), notes)
