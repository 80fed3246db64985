"""Building IDAnimatorPipelines from named weights, reusing what does not change between backbones.

A :class:`ModelStore` resolves and loads the parts shared by every backbone once (motion adapter, image
encoder, face adapter, SD1.5 base path) and builds a pipeline per backbone on top of them. The app keeps
one store for the life of the process, so a backbone switch only loads the new backbone.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import registry
from .adapter import FaceAdapterWeights, load_face_adapter_weights
from .models import (
    assemble_pipeline,
    build_motion_unet,
    load_backbone,
    load_image_encoder,
    load_motion_adapter,
    place_pipeline,
)
from .weights import resolve

OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass(frozen=True)
class LoadOptions:
    """Where the shared parts come from and how pipelines are placed."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    offload: str = "none"
    tiny: bool = False
    face_adapter: str | Path | None = None
    motion_adapter: str | Path | None = None
    image_encoder: str | Path | None = None
    base: str | Path | None = None
    allow_hub_ids: bool = True  # False on public deployments: registry backbones only

    @staticmethod
    def for_device(device: str | None = None, dtype: torch.dtype | None = None, **kwargs) -> LoadOptions:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        if kwargs.get("offload", "none") not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}")
        return LoadOptions(device=device, dtype=dtype, **kwargs)


@dataclass
class _Shared:
    face: FaceAdapterWeights
    motion_adapter: torch.nn.Module
    image_encoder: torch.nn.Module
    base_path: Path | None
    kit: dict = field(default_factory=dict)


class ModelStore:
    """Loads shared parts once and builds a pipeline per backbone (thread-safe)."""

    def __init__(self, options: LoadOptions, detector=None, face_cache_size: int = 64):
        self.options = options
        self.detector = detector
        self.loads: Counter[str] = Counter()  # how many times each kind of part was loaded from disk
        self.face_cache: OrderedDict = OrderedDict()  # CLIP features by crop hash, shared by all pipelines
        self.face_cache_size = face_cache_size
        self._shared: _Shared | None = None
        self._lock = threading.RLock()

    def _tiny_defaults(self) -> dict[str, Path]:
        from .testing import build_tiny_kit, default_tiny_dir

        return build_tiny_kit(default_tiny_dir())

    def shared(self) -> _Shared:
        with self._lock:
            if self._shared is None:
                o = self.options
                kit = self._tiny_defaults() if o.tiny else {}
                face_path = resolve(
                    o.face_adapter or kit.get("face_adapter") or registry.FACE_ADAPTER, what="face adapter"
                )
                motion_path = resolve(
                    o.motion_adapter or kit.get("motion_adapter") or registry.MOTION_ADAPTER, what="motion adapter"
                )
                encoder_path = resolve(
                    o.image_encoder or kit.get("image_encoder") or registry.IMAGE_ENCODER, what="image encoder"
                )
                face = load_face_adapter_weights(face_path)
                motion = load_motion_adapter(motion_path)
                encoder = load_image_encoder(encoder_path)
                self.loads.update(["face_adapter", "motion_adapter", "image_encoder"])
                self._shared = _Shared(face, motion, encoder, base_path=None, kit=kit)
            return self._shared

    def _base_path(self, shared: _Shared) -> Path:
        if shared.base_path is None:
            base = self.options.base or shared.kit.get("base") or registry.BASE_MODEL
            shared.base_path = resolve(base, what="SD1.5 base model")
        return shared.base_path

    def resolve_backbone(self, backbone: str | Path | None) -> Path:
        shared = self.shared()
        if self.options.tiny and backbone in (None, "", registry.DEFAULT_BACKBONE):
            return shared.kit["base"]
        return resolve(backbone or registry.DEFAULT_BACKBONE, what="backbone", allow_hub_ids=self.options.allow_hub_ids)

    def build(self, backbone: str | Path | None = None):
        """A ready IDAnimatorPipeline for `backbone` (registry name, Hub id or local path)."""
        from .pipeline import IDAnimatorPipeline

        with self._lock:
            shared = self.shared()
            path = self.resolve_backbone(backbone)
            complete_folder = path.is_dir() and all((path / s).is_dir() for s in ("vae", "text_encoder", "tokenizer"))
            parts = load_backbone(path, None if complete_folder else self._base_path(shared))
            self.loads["backbone"] += 1
            unet = build_motion_unet(parts, shared.motion_adapter, shared.face)
            pipe = assemble_pipeline(parts, unet, shared.image_encoder)
            o = self.options
            place_pipeline(pipe, o.device, o.dtype, o.offload)
            return IDAnimatorPipeline(
                pipe,
                device=o.device,
                dtype=o.dtype,
                offload=o.offload,
                detector=self.detector,
                face_cache=self.face_cache,
                face_cache_size=self.face_cache_size,
                backbone=str(backbone or ""),
            )
