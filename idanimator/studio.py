"""What the app does, without the widgets: mode choice, requests, progress, previews, streaming, outputs.

`app.py` only lays out components and turns the events of :meth:`Studio.run` into UI updates; everything
here is plain Python (no gradio), so it is tested directly.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import registry
from .errors import GPUOutOfMemoryError, IDAnimatorError, InvalidRequestError, WeightsUnavailableError
from .loader import LoadOptions
from .pipeline import GenerationCancelled, GenerationSettings
from .preview import preview_strip
from .service import PipelineService, choose_offload, free_gpu_memory, release_memory
from .video import write_mp4

TINY_BACKBONES = {"tiny": "Tiny random model (folder)", "tiny-single-file": "Tiny random model (single file)"}
RESOLUTIONS = {"512x512": (512, 512), "512x768 (portrait)": (768, 512), "768x512 (landscape)": (512, 768)}
TINY_RESOLUTIONS = {"64x64 (tiny)": (64, 64), "64x96 (tiny)": (96, 64)}
SEGMENT_FRAMES = 4  # frames per streamed chunk


@dataclass
class StudioOptions:
    device: str | None = None
    offload: str = "auto"  # auto: from free GPU memory
    tiny: bool = False
    allow_custom_backbones: bool = False  # operators only: local files/folders and any Hub id
    output_dir: Path | None = None
    max_outputs: int = 200
    max_output_age_s: float = 24 * 3600


@dataclass
class Request:
    faces: list  # paths (or images) of the reference photos
    prompt: str
    negative_prompt: str = ""
    add_prompt_suffix: bool = True
    backbone: str = ""
    custom_backbone: str = ""  # a local path or Hub id; honoured only with allow_custom_backbones
    seed: int | None = None
    randomize_seed: bool = True
    id_scale: float = 0.8
    num_frames: int = 16
    steps: int = 30
    guidance_scale: float = 8.0
    fps: int = 9
    resolution: str = "512x512"


@dataclass
class Progress:
    step: int
    total: int
    preview: object | None = None  # PIL image strip, every few steps


@dataclass
class Segment:
    path: Path  # a short MP4 of the next frames, for streaming


@dataclass
class Finished:
    video: Path
    seed: int
    settings: dict
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class OutputFolder:
    """Generated files under random names, pruned by age and count so the folder stays bounded."""

    def __init__(self, root: Path, max_files: int, max_age_s: float):
        self.root = root
        self.max_files = max_files
        self.max_age_s = max_age_s
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise IDAnimatorError(
                f"The output folder {root} cannot be written ({exc.strerror or exc}); choose another with --output-dir."
            ) from exc

    def new_path(self, suffix: str) -> Path:
        return self.root / f"{secrets.token_hex(8)}{suffix}"

    def new_folder(self) -> Path:
        folder = self.root / secrets.token_hex(8)
        folder.mkdir()
        return folder

    def prune(self) -> None:
        entries = sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        now = time.time()
        for index, entry in enumerate(entries):
            if index >= self.max_files or now - entry.stat().st_mtime > self.max_age_s:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def real_weights_problem(options: LoadOptions) -> str | None:
    """None if the real weights are on disk (or downloadable); else the sentence saying why not."""
    from .weights import resolve

    try:
        resolve(options.face_adapter or registry.FACE_ADAPTER, what="face adapter")
        resolve(options.motion_adapter or registry.MOTION_ADAPTER, what="motion adapter")
        resolve(options.image_encoder or registry.IMAGE_ENCODER, what="image encoder")
        resolve(registry.DEFAULT_BACKBONE, what="backbone")
        resolve(options.base or registry.BASE_MODEL, what="SD1.5 base model")
    except WeightsUnavailableError as exc:
        return str(exc)
    return None


class Studio:
    """One per process: the cached pipeline service, the output folder, and request handling."""

    def __init__(self, options: StudioOptions, detector=None):
        import tempfile

        import torch

        self.options = options
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        offload = options.offload
        if offload == "auto":
            offload = choose_offload(free_gpu_memory(device))
        base = LoadOptions.for_device(device, offload=offload, allow_hub_ids=options.allow_custom_backbones)
        self.tiny_reason = "forced with --tiny." if options.tiny else real_weights_problem(base)
        self.tiny = self.tiny_reason is not None
        load = LoadOptions.for_device(
            device, offload=offload, tiny=self.tiny, allow_hub_ids=options.allow_custom_backbones
        )
        self.service = PipelineService(load, detector=detector)
        root = options.output_dir or Path(tempfile.gettempdir()) / "idanimator-outputs"
        self.outputs = OutputFolder(Path(root), options.max_outputs, options.max_output_age_s)
        self._run_lock = threading.Lock()

    # -- what the page shows --------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self.service.options.device

    def banner(self) -> str:
        lines = []
        if self.tiny:
            lines.append(
                "**Tiny mode: the weights are random, so videos are coloured noise.** "
                f"Reason: {self.tiny_reason} To use the real ID-Animator weights, run "
                "`python -m idanimator download` on a machine with internet access, then restart the app."
            )
        if self.device == "cpu" and not self.tiny:
            lines.append("Running on the CPU in float32: a full-size video takes a long time.")
        return "\n\n".join(lines)

    def backbone_choices(self) -> list[tuple[str, str]]:
        if self.tiny:
            return [(label, name) for name, label in TINY_BACKBONES.items()]
        return [(b.label, name) for name, b in registry.BACKBONES.items()]

    def resolutions(self) -> dict[str, tuple[int, int]]:
        return TINY_RESOLUTIONS if self.tiny else RESOLUTIONS

    def defaults(self) -> dict:
        """Slider defaults: the release's, or ones a CPU renders in seconds in tiny mode."""
        if self.tiny:
            return dict(
                num_frames=8,
                steps=4,
                guidance_scale=8.0,
                id_scale=0.8,
                fps=9,
                resolution=next(iter(TINY_RESOLUTIONS)),
                backbone="tiny",
            )
        return dict(
            num_frames=16,
            steps=30,
            guidance_scale=8.0,
            id_scale=0.8,
            fps=9,
            resolution=next(iter(RESOLUTIONS)),
            backbone=registry.DEFAULT_BACKBONE,
        )

    # -- requests -------------------------------------------------------------------------------

    def backbone_source(self, choice: str, custom: str = "") -> str | Path:
        """A dropdown value (or, for operators, a local path or Hub id) -> what the loader accepts."""
        if custom and custom.strip():
            if not self.options.allow_custom_backbones:
                raise InvalidRequestError("Custom backbones are switched off on this server; pick one from the list.")
            return custom.strip()
        if self.tiny:
            if choice not in TINY_BACKBONES:
                raise InvalidRequestError(f"Unknown backbone {choice!r}; pick one from the list.")
            kit = self.service.store.shared().kit
            return kit["single_file"] if choice == "tiny-single-file" else kit["base"]
        if choice not in registry.BACKBONES:
            raise InvalidRequestError(f"Unknown backbone {choice!r}; pick one from the list.")
        return choice

    def detector(self):
        store = self.service.store
        if store.detector is None:
            from .face import get_detector

            store.detector = get_detector("auto")
        return store.detector

    def prepare_faces(self, faces: list) -> tuple[list, list[str]]:
        """Aligned crops of every photo, and the sentences to show about them. Raises on a bad photo."""
        from .face import crop_face

        if not faces:
            raise InvalidRequestError("Upload at least one photo of a face.")
        crops = [crop_face(face, self.detector()) for face in faces]
        return crops, [w for crop in crops for w in crop.warnings]

    def settings_for(self, request: Request) -> GenerationSettings:
        if request.resolution not in self.resolutions():
            raise InvalidRequestError(f"Resolution must be one of {', '.join(self.resolutions())}.")
        height, width = self.resolutions()[request.resolution]
        seed = None if request.randomize_seed else request.seed
        if seed is not None and not isinstance(seed, int):
            seed = int(seed) if float(seed).is_integer() else seed
        return GenerationSettings(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_frames=request.num_frames,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            id_scale=request.id_scale,
            seed=seed,
            height=height,
            width=width,
            add_prompt_suffix=request.add_prompt_suffix,
        ).validate()

    def run(
        self,
        request: Request,
        stop: threading.Event | None = None,
        stream: bool = True,
        preview_every: int | None = None,
    ) -> Iterator[Progress | Segment | Finished]:
        """Generate one video, yielding progress (with previews), streamed segments, then the result.

        Raises IDAnimatorError subclasses with user-facing sentences; GenerationCancelled when stopped.
        Whatever happens, the service stays usable for the next request.
        """
        started = time.monotonic()
        stop = stop or threading.Event()
        if not 1 <= int(request.fps) <= 60:
            raise InvalidRequestError(f"Frames per second must be between 1 and 60 (got {request.fps}).")
        settings = self.settings_for(request)
        source = self.backbone_source(request.backbone, request.custom_backbone)
        crops, _ = self.prepare_faces(request.faces)
        every = preview_every or max(1, settings.steps // 6)
        events: list[Progress] = []

        def on_step(step, total, latents):
            preview = preview_strip(latents) if (step + 1) % every == 0 or step + 1 == total else None
            events.append(Progress(step + 1, total, preview))

        self.outputs.prune()
        with self._run_lock:  # one generation at a time per process; the queue also enforces it
            try:
                pipe = self.service.pipeline(str(source))
                result_holder: dict = {}
                worker_error: list[BaseException] = []

                def work():
                    try:
                        result_holder["result"] = pipe.denoise(
                            crops, settings, callback=on_step, should_stop=stop.is_set
                        )
                    except BaseException as exc:  # handed to the caller's thread below
                        worker_error.append(exc)

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                sent = 0
                try:
                    while thread.is_alive() or sent < len(events):
                        thread.join(timeout=0.1)
                        while sent < len(events):
                            yield events[sent]
                            sent += 1
                finally:  # the consumer went away (closed this generator): stop the worker at its next step
                    if thread.is_alive():
                        stop.set()
                        thread.join()
                if worker_error:
                    raise worker_error[0]
                result = result_holder["result"]
                frames = []
                for start in range(0, settings.num_frames, SEGMENT_FRAMES):
                    if stop.is_set():
                        raise GenerationCancelled("Generation was stopped.")
                    chunk = pipe.decode(result.latents, start, start + SEGMENT_FRAMES)
                    frames.extend(chunk)
                    if stream:
                        yield Segment(write_mp4(chunk, self.outputs.new_path(".mp4"), fps=request.fps))
                video = write_mp4(frames, self.outputs.new_path(".mp4"), fps=request.fps)
            except GenerationCancelled:
                raise
            except IDAnimatorError:
                raise
            except Exception as exc:
                if type(exc).__name__ == "OutOfMemoryError":
                    self.service.clear()
                    raise GPUOutOfMemoryError(
                        "The GPU ran out of memory. Try fewer frames, a smaller resolution, or start the app "
                        "with --offload model (or sequential)."
                    ) from exc
                raise
            finally:
                if stop.is_set():
                    release_memory()
        record = {**asdict(settings), "seed": result.seed, "fps": request.fps, "backbone": request.backbone}
        yield Finished(
            video=video, seed=result.seed, settings=record, warnings=result.warnings, seconds=time.monotonic() - started
        )
