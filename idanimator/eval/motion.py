"""Motion metrics, so that a model cannot win on identity by returning a still photo.

Optical flow is OpenCV's Farneback (dense, on greyscale frames at the video's own size; RAFT, which VBench
uses, is not installed). As VBench's dynamic degree, frames are taken about 8 times a second
(every ``round(fps / 8)``-th frame) and each consecutive pair scores the mean of its largest 5 % of flow
magnitudes; the video is *dynamic* when at least ``round(4 * frames / 16)`` pairs exceed
``6 * max(1, 8 / fps) * short_side / 256`` pixels. DynamicDegree is the share of dynamic videos (per video:
1 or 0). FlowMagnitude is the mean flow magnitude over all pixels and pairs, in pixels per step.
Farneback under-estimates large, fast motion compared with RAFT, so read DynamicDegree as a lower bound.
"""

from __future__ import annotations

import numpy as np

FLOW = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
FLOW_NAME = "OpenCV Farneback (pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2)"
TOP_FRACTION = 0.05


def flow_magnitudes(frames: np.ndarray) -> list[np.ndarray]:
    """Per consecutive pair, the (height, width) magnitude of the dense flow from one frame to the next."""
    import cv2

    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    out = []
    for a, b in zip(grey[:-1], grey[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, **FLOW)
        out.append(np.hypot(flow[..., 0], flow[..., 1]))
    return out


def motion_scores(frames: np.ndarray, fps: float) -> dict[str, float]:
    fps = fps if fps > 0 else 8.0
    step = max(1, round(fps / 8))
    picked = frames[::step]
    magnitudes = flow_magnitudes(picked)
    if not magnitudes:
        return {"DynamicDegree": 0.0, "FlowMagnitude": 0.0}
    pair_scores = []
    for mag in magnitudes:
        flat = np.sort(mag.ravel())[::-1]
        pair_scores.append(float(flat[: max(1, int(flat.size * TOP_FRACTION))].mean()))
    threshold = 6.0 * max(1.0, 8.0 / fps) * min(picked.shape[1:3]) / 256.0
    needed = max(1, round(4 * len(picked) / 16))
    moving = sum(score > threshold for score in pair_scores) >= needed
    return {"DynamicDegree": float(moving), "FlowMagnitude": float(np.mean([m.mean() for m in magnitudes]))}
