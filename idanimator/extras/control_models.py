"""Loading the model each structure control needs (its Hub source is in :data:`idanimator.registry.CONTROL_MODELS`),
and a cache that keeps each one once loaded.

SparseCtrl (keyframes) uses diffusers' :class:`SparseControlNetModel`; the per-frame controls use SD1.5
ControlNet 1.1 :class:`ControlNetModel` s. Each is a diffusers folder, from the Hugging Face cache (downloaded
on first use when the Hub can be reached) or a local folder. A :class:`ControlModels` holds the sources and
the loaded models, one per kind, kept until :meth:`ControlModels.clear`; the service owns one and hands it to
its pipelines when it builds them (``IDAnimatorPipeline(..., control_models=...)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import IDAnimatorError, WeightsUnavailableError
from ..registry import CONTROL_MODELS, Source
from ..request import CONTROL_KINDS, SPARSE_KINDS
from ..weights import describe, resolve

# What each kind's condition is, for messages.
_TAKES = {
    "sparse-sketch": "sketches (pixels)",
    "sparse-rgb": "RGB keyframes (VAE latents)",
}


def load_control_model(kind: str, path: str | Path) -> torch.nn.Module:
    """The control model of ``kind`` from a diffusers folder, in float32 on the CPU.

    SparseCtrl's own motion modules get per-frame GroupNorms, as in the original AnimateDiff/SparseCtrl code
    (see :class:`idanimator.models.PerFrameGroupNorm`).
    """
    from diffusers import ControlNetModel, SparseControlNetModel

    from ..models import use_per_frame_motion_norms

    path = Path(path)
    sparse = kind in SPARSE_KINDS
    cls = SparseControlNetModel if sparse else ControlNetModel
    config = _read_config(path, kind)
    found = config.get("_class_name")
    if found and found != cls.__name__:
        raise WeightsUnavailableError(
            f"The folder {path} holds a {found}, but the {kind} control needs a {cls.__name__}."
        )
    if sparse and bool(config.get("use_simplified_condition_embedding", True)) != (kind == "sparse-rgb"):
        other = next(k for k in SPARSE_KINDS if k != kind)
        raise WeightsUnavailableError(
            f"The model in {path} takes {_TAKES[other]}, so it is a {other} model, not a {kind} one."
        )
    try:
        model = cls.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WeightsUnavailableError(
            f"The {kind} control model at {path} could not be loaded ({type(exc).__name__}); "
            "it may be incomplete, so delete it and download it again."
        ) from exc
    if sparse:
        use_per_frame_motion_norms(model)
    return model.eval().requires_grad_(False)


def _read_config(path: Path, kind: str) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(f"The {kind} control model folder {path} has no readable config.json.") from exc


class ControlModels:
    """Where each control's model comes from (``sources``: kind -> registry source, Hub id or local folder,
    over :data:`CONTROL_MODELS`) and the models loaded so far, one per kind."""

    def __init__(self, sources: Mapping[str, str | Path | Source] | None = None):
        unknown = sorted(set(sources or {}) - set(CONTROL_KINDS))
        if unknown:
            raise ValueError(f"Unknown control kind {unknown[0]!r}; the kinds are {', '.join(CONTROL_KINDS)}.")
        self.sources: dict[str, str | Path | Source] = {**CONTROL_MODELS, **(sources or {})}
        self._models: dict[str, torch.nn.Module] = {}

    def get(self, kind: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The model for ``kind`` on ``device`` in ``dtype``: loaded (and downloaded) on first use, then kept."""
        model = self._models.get(kind)
        if model is None:
            model = self._models[kind] = load_control_model(kind, self.path(kind))
        device = torch.device(device)
        placed = model.device.type == device.type and device.index in (None, model.device.index)
        if not placed or model.dtype != dtype:
            model.to(device=device, dtype=dtype)
        return model

    def path(self, kind: str) -> Path:
        """The local folder of ``kind``'s model, downloading it when it is not on disk yet and the Hub answers."""
        source = self.sources[kind]
        if isinstance(source, (str, Path)) and Path(source).expanduser().exists():
            return Path(source).expanduser()
        if isinstance(source, Path) or (isinstance(source, str) and source.startswith(("/", ".", "~"))):
            raise WeightsUnavailableError(f"The {kind} control model folder {source} does not exist.")
        try:
            return resolve(source, what=f"{kind} control model")
        except IDAnimatorError as exc:
            raise WeightsUnavailableError(
                f"The {kind} control model ({describe(source)}) is not on this machine and cannot be downloaded "
                "now; download it while online or give a local copy of its folder."
            ) from exc

    def loaded(self) -> list[str]:
        """The kinds whose model is in memory."""
        return list(self._models)

    def clear(self) -> None:
        """Forget every loaded model (to free memory, e.g. after running out of it)."""
        self._models.clear()
