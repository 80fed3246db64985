"""The single owner of loaded models in a long-running process (the app).

:class:`ModelService` loads the parts every backbone shares once (face adapter, motion adapter, image
encoder), keeps one pipeline at a time (a GPU never holds two UNets; a backbone switch loads only the new
backbone), owns the face detector and the face-feature cache that every pipeline shares, and turns CUDA
out-of-memory into a sentence after freeing what it holds. Callers ask it for things; nothing reaches
inside it.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import GPUOutOfMemoryError, InvalidRequestError
from .extras.control_models import ControlModels
from .extras.fast import AnimateLCMWeights
from .models import LoadOptions, SharedParts, build_animatediff, load_shared_parts, resolve_backbone
from .pipeline import FaceFeatureCache, IDAnimatorPipeline

log = logging.getLogger(__name__)

GIB = 1024**3
# Thresholds for the automatic offload choice (fp16, 16 frames at 512x512). Whole model on the GPU
# needs about 10 GB in the release; model offload keeps one part at a time on the GPU.
FULL_GPU_MIN_FREE = 14 * GIB
MODEL_OFFLOAD_MIN_FREE = 7 * GIB
OOM_MESSAGE = (
    "The GPU ran out of memory. Try fewer frames or a smaller resolution, or start with "
    "--offload model (or --offload sequential on small cards)."
)


def choose_offload(free_bytes: int | None) -> str:
    """Pick an offload mode from free GPU memory: none on large cards, model on mid, sequential on small."""
    if free_bytes is None or free_bytes >= FULL_GPU_MIN_FREE:
        return "none"
    return "model" if free_bytes >= MODEL_OFFLOAD_MIN_FREE else "sequential"


def free_gpu_memory(device: str) -> int | None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free


def release_memory(collect: bool = True) -> None:
    """Give cached GPU memory back (after an out-of-memory error, a stop or a backbone switch).

    ``collect=False`` skips the garbage collector (a full pass over every object of the process; its cost in
    the app is in benchmarks/RESULTS.md) when the caller knows nothing it dropped is held in a reference cycle.
    """
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def out_of_memory_guard(on_oom=None) -> Iterator[None]:
    """Turn CUDA out-of-memory into GPUOutOfMemoryError (with what to lower), after ``on_oom()`` frees memory."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if on_oom is not None:
            on_oom()
        release_memory()
        raise GPUOutOfMemoryError(OOM_MESSAGE) from exc


def _backbone_models(pipeline: IDAnimatorPipeline | None) -> list[weakref.ref]:
    """Weak references to the models a pipeline owns alone (the shared image encoder is not among them)."""
    if pipeline is None:
        return []
    parts = (getattr(pipeline.pipe, name, None) for name in ("unet", "vae", "text_encoder"))
    return [weakref.ref(part) for part in parts if part is not None]


class ModelService:
    """Hands out the pipeline for a backbone, building or switching it on demand. Thread-safe."""

    def __init__(self, options: LoadOptions, detector=None, face_cache_size: int = 64):
        self.options = options
        self.loads: Counter[str] = Counter()  # how many times each kind of part was loaded from disk
        self.face_cache = FaceFeatureCache(face_cache_size)
        self._detector = detector
        self._shared: SharedParts | None = None
        self._backbone: str | None = None
        self._pipeline: IDAnimatorPipeline | None = None
        self._lock = threading.RLock()
        # The options' models, kept across requests and backbone switches (dropped on out-of-memory): the control
        # models, one per kind, and the fast mode's AnimateLCM. Every pipeline built here is given these two.
        self.control_models = options.control_models or ControlModels()
        self.fast_weights = AnimateLCMWeights(options.fast_weights)

    # -- what callers ask for -------------------------------------------------------------------

    def detector(self):
        """The face detector (loaded on first use, shared by every pipeline)."""
        with self._lock:
            if self._detector is None:
                from .face import get_detector

                self._detector = get_detector("auto")
            return self._detector

    def check_backbone(self, name: str, allow_custom: bool = False) -> str:
        """What to load for a request: a backbone offered by name, or (operators only) a path or Hub id."""
        if name in self.options.backbone_names():
            return name
        if allow_custom:
            return name
        if "/" in name or "\\" in name:  # a path or a Hub id
            raise InvalidRequestError("Custom backbones are switched off on this server; pick one from the list.")
        raise InvalidRequestError(f"Unknown backbone {name!r}; pick one from the list.")

    def fetch_backbone(self, backbone: str) -> Path:
        """Make sure a backbone's files are on disk (downloading them) without loading it."""
        return resolve_backbone(self.options, backbone)

    def pipeline(self, backbone: str | None = None) -> IDAnimatorPipeline:
        """The pipeline for ``backbone`` (default: the options' default), built on first use or on a switch."""
        backbone = backbone or self.options.default_backbone
        with self._lock:
            if self._pipeline is not None and self._backbone == backbone:
                return self._pipeline
            if self._pipeline is not None:
                log.info("switching backbone %s -> %s", self._backbone, backbone)
                self.clear()
            pipe = build_animatediff(self._shared_parts(), backbone)
            self.loads["backbone"] += 1
            self._pipeline = IDAnimatorPipeline(
                pipe,
                dtype=self.options.dtype,
                detector=self.detector(),
                face_cache=self.face_cache,
                control_models=self.control_models,
                fast_weights=self.fast_weights,
            )
            self._backbone = backbone
            return self._pipeline

    @property
    def current_backbone(self) -> str | None:
        return self._backbone

    def clear(self) -> None:
        """Drop the pipeline (the shared parts stay) and free memory; the next request rebuilds it."""
        with self._lock:
            models = _backbone_models(self._pipeline)
            self._pipeline = None
            self._backbone = None
            # Usually nothing holds the models any more; offload hooks (and errors' tracebacks) make cycles that
            # only the collector frees. Collect only then: it costs time on every backbone switch (RESULTS.md).
            release_memory(collect=any(model() is not None for model in models))

    def guard(self):
        """A context in which CUDA out-of-memory drops the pipeline (freeing memory) and becomes a sentence."""
        return out_of_memory_guard(self._free_everything)

    def _free_everything(self) -> None:
        self.control_models.clear()
        self.fast_weights.clear()
        self.clear()

    # -- inside ---------------------------------------------------------------------------------

    def _shared_parts(self) -> SharedParts:
        if self._shared is None:
            self._shared = load_shared_parts(self.options)
            self.loads.update(["face_adapter", "motion_adapter", "image_encoder"])
        return self._shared
