"""The metrics' names (the keys of ``summary.json``), what each measures, and choosing some of them."""

from __future__ import annotations

from ..errors import InvalidRequestError

FACE_METRICS = ("FaceSim-Arc", "FaceSim-Cur", "FaceSim-dlib")
CLIP_METRICS = ("CLIPScore", "CLIP-Temporal", "CLIPDist")
MOTION_METRICS = ("DynamicDegree", "FlowMagnitude")
METRICS = FACE_METRICS + CLIP_METRICS + MOTION_METRICS
FACE_RATE = "FaceDetectionRate"  # reported whenever a face metric is asked for

GROUPS = {"all": METRICS, "face": FACE_METRICS, "clip": CLIP_METRICS, "motion": MOTION_METRICS}

DESCRIPTIONS = {
    "FaceSim-Arc": "identity: cosine (clamped at 0) of insightface ArcFace embeddings, reference vs. 16 frames",
    "FaceSim-Cur": "identity: cosine (clamped at 0) of CurricularFace IR-101 embeddings, reference vs. 16 frames",
    "FaceSim-dlib": "identity: cosine (clamped at 0) of dlib ResNet embeddings, reference vs. 16 frames "
    "(not comparable with ArcFace figures)",
    "CLIPScore": "prompt: 100 x cosine of CLIP ViT-B/32 text and frame embeddings, 16 frames",
    "CLIP-Temporal": "smoothness: mean cosine of consecutive frames' CLIP ViT-B/32 image embeddings, all frames",
    "CLIPDist": "copy-paste: 1 - cosine of CLIP ViT-B/32 embeddings of the reference photo and 16 frames",
    "DynamicDegree": "motion: share of videos that move (VBench's rule on Farneback optical flow)",
    "FlowMagnitude": "motion: mean Farneback optical-flow magnitude, pixels per frame step at ~8 fps",
    FACE_RATE: "share of the 16 sampled frames in which a face was found",
}


def parse_metrics(text: str | None) -> tuple[str, ...]:
    """``"all"`` (None), or a comma-separated list of metric names and groups (face, clip, motion), in
    any letter case; returned in the canonical order. An empty list is refused (it is not "all")."""
    if text is None:
        return METRICS
    lookup = {name.lower(): (name,) for name in METRICS} | {group: names for group, names in GROUPS.items()}
    wanted: set[str] = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part not in lookup:
            choices = ", ".join([*GROUPS, *METRICS])
            raise InvalidRequestError(f"Unknown metric '{part}': choose from {choices}.")
        wanted.update(lookup[part])
    if not wanted:
        raise InvalidRequestError("No metric was named: give --metrics a list such as 'face,clip' or 'all'.")
    return tuple(m for m in METRICS if m in wanted)


def columns(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The keys each video gets for these metrics (the face-detection rate joins the face metrics)."""
    if any(m in FACE_METRICS for m in metrics):
        return (*metrics, FACE_RATE)
    return metrics
