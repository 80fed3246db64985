"""The process-wide engine used by the app: one cached pipeline, face embeddings cached by image hash.

The pipeline is keyed by (backbone, device, dtype, offload). A backbone switch builds the new backbone
on the parts the store already holds (motion adapter, image encoder, face adapter), and only one
pipeline is kept at a time so a GPU never holds two UNets.
"""

from __future__ import annotations

import gc
import logging
import threading

import torch

from .loader import LoadOptions, ModelStore

log = logging.getLogger(__name__)

GIB = 1024**3
# Thresholds for the automatic offload choice (fp16, 16 frames at 512x512). Whole model on the GPU
# needs about 10 GB in the release; model offload keeps one part at a time on the GPU.
FULL_GPU_MIN_FREE = 14 * GIB
MODEL_OFFLOAD_MIN_FREE = 7 * GIB


def choose_offload(free_bytes: int | None) -> str:
    """Pick an offload mode from free GPU memory: none on large cards, model on mid, sequential on small."""
    if free_bytes is None:
        return "none"
    if free_bytes >= FULL_GPU_MIN_FREE:
        return "none"
    if free_bytes >= MODEL_OFFLOAD_MIN_FREE:
        return "model"
    return "sequential"


def free_gpu_memory(device: str) -> int | None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free


def release_memory() -> None:
    """Give cached GPU memory back (after an out-of-memory error or a backbone switch)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PipelineService:
    """Hands out the current pipeline, building or switching it on demand. Thread-safe."""

    def __init__(self, options: LoadOptions, detector=None):
        self.store = ModelStore(options, detector=detector)
        self._key: tuple | None = None
        self._pipeline = None
        self._lock = threading.RLock()

    @property
    def options(self) -> LoadOptions:
        return self.store.options

    def key(self, backbone: str) -> tuple:
        o = self.options
        return (backbone, o.device, str(o.dtype), o.offload)

    def pipeline(self, backbone: str):
        with self._lock:
            key = self.key(backbone)
            if self._pipeline is not None and self._key == key:
                return self._pipeline
            if self._pipeline is not None:
                log.info("switching backbone %s -> %s", self._key[0], backbone)
                self._pipeline = None
                release_memory()
            self._pipeline = self.store.build(backbone)
            self._key = key
            return self._pipeline

    @property
    def current_backbone(self) -> str | None:
        return self._key[0] if self._key else None

    def clear(self) -> None:
        """Drop the pipeline (kept parts stay) and free memory; the next request rebuilds it."""
        with self._lock:
            self._pipeline = None
            self._key = None
            release_memory()
