"""What the app does, without the widgets: mode choice, requests, progress, previews, streaming, outputs.

`app.py` only lays out components and turns the events of :meth:`Studio.execute` into UI updates;
everything here is plain Python (no gradio), so it is tested directly.

A request goes through two stages, so the app can run the second one elsewhere (on ZeroGPU, in a forked
GPU worker): :meth:`Studio.prepare` checks the request, aligns the faces and loads the pipeline (CPU work,
in the server process), and returns a picklable :class:`Job`; :meth:`Studio.execute` denoises, decodes
and writes the video, yielding :class:`Progress`, :class:`Segment` and :class:`Finished` events.
:meth:`Studio.run` does both.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import registry
from .errors import GPUOutOfMemoryError, IDAnimatorError, InvalidRequestError, WeightsUnavailableError
from .loader import LoadOptions
from .pipeline import GenerationCancelled, GenerationSettings, whole_number
from .preview import preview_strip, tile_images
from .service import PipelineService, choose_offload, free_gpu_memory, release_memory
from .video import write_mp4

log = logging.getLogger(__name__)

TINY_BACKBONES = {"tiny": "Tiny random model (folder)", "tiny-single-file": "Tiny random model (single file)"}
RESOLUTIONS = {"512x512": (512, 512), "512x768 (portrait)": (768, 512), "768x512 (landscape)": (512, 768)}
TINY_RESOLUTIONS = {"64x64 (tiny)": (64, 64), "64x96 (tiny)": (96, 64)}
SEGMENT_FRAMES = 4  # frames per streamed chunk
MAX_FPS = 60
OOM_MESSAGE = (
    "The GPU ran out of memory. Try fewer frames or a smaller resolution, or start the app with "
    "--offload model (or --offload sequential on small cards)."
)


@dataclass
class StudioOptions:
    device: str | None = None
    offload: str = "auto"  # auto: from free GPU memory
    tiny: bool = False
    allow_custom_backbones: bool = False  # operators only: local files/folders and any Hub id
    output_dir: Path | None = None
    max_outputs: int = 200  # entries (videos, segment folders) kept in the output folder
    max_output_age_s: float = 24 * 3600
    # prepare() builds the pipeline (so execute() only runs it). False on ZeroGPU, where only the main thread
    # may place models "on cuda" outside the GPU worker: prepare() then only downloads the backbone.
    load_in_prepare: bool = True


@dataclass
class Request:
    """One generation request as the page (or the API) sends it; nothing here is trusted yet."""

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
class Job:
    """A checked request, ready to run: validated settings, aligned faces, the backbone to use.

    Holds no models (it is pickled to a ZeroGPU worker); the pipeline comes from the service's cache.
    """

    settings: GenerationSettings
    crops: list
    source: str  # what the pipeline service is keyed by
    backbone: str  # what the user picked (shown in the history)
    fps: int
    notes: list[str] = field(default_factory=list)  # what we noticed about the photos
    created: float = field(default_factory=time.monotonic)

    def gpu_seconds(self) -> int:
        """A generous estimate of the GPU time this job needs (for spaces.GPU's duration)."""
        s = self.settings
        pixels = s.height * s.width / (512 * 512)
        cfg = 2 if s.guidance_scale > 1 else 1
        return int(min(300, 30 + 0.04 * cfg * s.steps * s.num_frames * pixels + 0.5 * s.num_frames * pixels))


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

    def new_path(self, suffix: str, folder: Path | None = None) -> Path:
        return (folder or self.root) / f"{secrets.token_hex(8)}{suffix}"

    def new_folder(self) -> Path:
        folder = self.root / secrets.token_hex(8)
        folder.mkdir()
        return folder

    def prune(self) -> None:
        """Keep the newest `max_files` entries younger than `max_age_s`; remove the rest."""
        entries = []
        for entry in self.root.iterdir():
            try:
                entries.append((entry.stat().st_mtime, entry))
            except FileNotFoundError:  # removed by a concurrent prune
                continue
        entries.sort(key=lambda item: item[0], reverse=True)
        now = time.time()
        for index, (mtime, entry) in enumerate(entries):
            if index >= self.max_files or now - mtime > self.max_age_s:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# -- real weights or tiny mode -------------------------------------------------------------------


def real_weights_status(options: LoadOptions) -> tuple[str | None, bool]:
    """(problem, needs_download): problem is None when the real weights are on disk or can be downloaded
    (then needs_download says whether they still have to be); else it is the sentence saying why not.

    Nothing is downloaded here, so the page comes up at once; :meth:`Studio.warm_up` fetches them.
    """
    from .weights import hub_reachable, is_cached, resolve

    wanted = [
        (options.face_adapter or registry.FACE_ADAPTER, "face adapter"),
        (options.motion_adapter or registry.MOTION_ADAPTER, "motion adapter"),
        (options.image_encoder or registry.IMAGE_ENCODER, "image encoder"),
        (registry.DEFAULT_BACKBONE, "backbone"),
        (options.base or registry.BASE_MODEL, "SD1.5 base model"),
    ]
    try:
        missing = [(value, what) for value, what in wanted if not is_cached(value)]
    except WeightsUnavailableError as exc:  # e.g. a local path that does not exist
        return str(exc), False
    if not missing:
        return None, False
    if hub_reachable():
        return None, True
    try:
        resolve(missing[0][0], what=missing[0][1])  # raises the sentence that says what to do
    except WeightsUnavailableError as exc:
        return str(exc), False
    return None, False


@contextmanager
def out_of_memory_guard(service: PipelineService):
    """Turn CUDA out-of-memory into GPUOutOfMemoryError after dropping the cached pipeline."""
    try:
        yield
    except IDAnimatorError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError
            service.clear()
            raise GPUOutOfMemoryError(OOM_MESSAGE) from exc
        raise


def _from_text(name: str, value):
    """Numbers typed into a text field or sent as JSON strings ("8") become numbers; ranges are checked by
    :func:`idanimator.pipeline.whole_number` and :meth:`GenerationSettings.validate`."""
    if not isinstance(value, str):
        return value
    try:
        return float(value.strip())
    except ValueError:
        raise InvalidRequestError(f"{name} must be a number (got {value!r}).") from None


def _short_names(exc: IDAnimatorError, faces: list) -> IDAnimatorError:
    """The same error with uploaded files named by their base name, not the server's temp path."""
    message = str(exc)
    for face in faces:
        if isinstance(face, (str, Path)) and str(face) in message:
            message = message.replace(str(face), Path(face).name)
    if message == str(exc):
        return exc
    renamed = type(exc)(message)
    renamed.__cause__ = exc.__cause__
    return renamed


def face_strip(crops: list, size: int = 150):
    """The aligned faces side by side, each `size` pixels square: what the model sees (None if no crops)."""
    return tile_images([crop.image for crop in crops], size) if crops else None


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
        if options.tiny:
            self.tiny_reason, self.needs_download = "forced with --tiny.", False
        else:
            self.tiny_reason, self.needs_download = real_weights_status(base)
        self.tiny = self.tiny_reason is not None
        load = LoadOptions.for_device(
            device, offload=offload, tiny=self.tiny, allow_hub_ids=options.allow_custom_backbones
        )
        self.service = PipelineService(load, detector=detector)
        root = options.output_dir or Path(tempfile.gettempdir()) / "idanimator-outputs"
        self.outputs = OutputFolder(Path(root), options.max_outputs, options.max_output_age_s)
        self._run_lock = threading.Lock()
        self.ready = threading.Event()  # set when warm_up() has finished (successfully or not)
        self.warm_error: str | None = None

    # -- what the page shows --------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self.service.options.device

    @property
    def offload(self) -> str:
        return self.service.options.offload

    def banner(self) -> str:
        """Markdown for the top of the page: the mode, and anything the user should know (may be empty)."""
        lines = []
        if self.tiny:
            lines.append(
                "**Tiny mode: the weights are random, so videos are coloured noise.** "
                f"Reason: {self.tiny_reason.split('. ')[0].rstrip('.')}. To use the real ID-Animator weights, run "
                "`python -m idanimator download` on a machine with internet access, then restart the app. "
                "Sizes are cut to 64x64 pixels, 8 frames and 4 steps so a CPU makes a video in seconds."
            )
        if self.warm_error:
            lines.append(f"**The models could not be loaded:** {self.warm_error}")
        elif self.needs_download and not self.ready.is_set():
            lines.append(
                "Downloading the ID-Animator weights (several GB) in the background; the first video starts "
                "when they are in. Reload the page to see whether they are."
            )
        if self.device == "cpu" and not self.tiny:
            lines.append(
                "Running on the CPU in float32: a full-size video takes a long time (many minutes). "
                "Use fewer frames, fewer steps and 512x512 to try it out."
            )
        return "\n\n".join(lines)

    def backbone_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the backbone dropdown."""
        if self.tiny:
            return [(label, name) for name, label in TINY_BACKBONES.items()]
        return [(b.label, name) for name, b in registry.BACKBONES.items()]

    def resolutions(self) -> dict[str, tuple[int, int]]:
        """Preset label -> (height, width)."""
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

    # -- start-up -------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Download (if needed) and load the default pipeline and the face detector, so the first request
        does not wait for them. Run it in a background thread after the page is up (or before, on ZeroGPU).
        A failure is kept for the banner and the next request tries again."""
        try:
            self.detector()
            with out_of_memory_guard(self.service):
                self.service.pipeline(str(self.backbone_source(self.defaults()["backbone"])))
        except IDAnimatorError as exc:
            self.warm_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - logged; the next request retries and reports it
            log.exception("warm-up failed")
            self.warm_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

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

        faces = [f for f in (faces or []) if f is not None]
        if not faces:
            raise InvalidRequestError("Upload at least one photo of a face.")
        crops = []
        for face in faces:
            try:
                crops.append(crop_face(face, self.detector()))
            except IDAnimatorError as exc:
                raise _short_names(exc, faces) from exc.__cause__
        for crop in crops:  # these sentences reach the user (here and in the result's warnings)
            crop.warnings = [str(_short_names(IDAnimatorError(w), faces)) for w in crop.warnings]
        return crops, [w for crop in crops for w in crop.warnings]

    def preview_faces(self, faces: list) -> tuple[list, list[str]]:
        """For the page after an upload: the crops of the photos that work, and a sentence for each photo
        that does not (no face, several faces, unreadable); never raises for a bad photo."""
        crops, notes = [], []
        for face in [f for f in (faces or []) if f is not None]:
            try:
                found, said = self.prepare_faces([face])
            except IDAnimatorError as exc:
                notes.append(str(exc))
                continue
            crops.extend(found)
            notes.extend(said)
        return crops, notes

    def settings_for(self, request: Request) -> GenerationSettings:
        resolutions = self.resolutions()
        if request.resolution not in resolutions:
            raise InvalidRequestError(f"Resolution must be one of {', '.join(resolutions)}.")
        height, width = resolutions[request.resolution]
        seed = None if request.randomize_seed or request.seed in (None, "", -1) else request.seed
        return GenerationSettings(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_frames=_from_text("Frames", request.num_frames),
            steps=_from_text("Steps", request.steps),
            guidance_scale=request.guidance_scale,
            id_scale=request.id_scale,
            seed=_from_text("Seed", seed),
            height=height,
            width=width,
            add_prompt_suffix=bool(request.add_prompt_suffix),
        ).validate()

    def prepare(self, request: Request) -> Job:
        """Check everything, align the faces and load the pipeline (downloading a backbone if needed).

        Raises IDAnimatorError subclasses with user-facing sentences.
        """
        fps = whole_number("Frames per second", _from_text("Frames per second", request.fps), 1, MAX_FPS)
        settings = self.settings_for(request)
        source = str(self.backbone_source(request.backbone, request.custom_backbone))
        crops, notes = self.prepare_faces(request.faces)
        if self.options.load_in_prepare:
            with self._run_lock, out_of_memory_guard(self.service):
                self.service.pipeline(source)
        else:
            self.service.store.resolve_backbone(source)  # download now, outside the GPU's time
        backbone = request.custom_backbone.strip() if request.custom_backbone else request.backbone
        return Job(settings=settings, crops=crops, source=source, backbone=backbone, fps=fps, notes=notes)

    def execute(
        self,
        job: Job,
        stop: threading.Event | None = None,
        stream: bool = True,
        preview_every: int | None = None,
    ) -> Iterator[Progress | Segment | Finished]:
        """Denoise, decode and write one video, yielding progress (with previews every few steps), streamed
        segments (short MP4s of 4 frames each, when `stream`), then the result.

        Raises IDAnimatorError subclasses with user-facing sentences; GenerationCancelled when `stop` is set.
        Whatever happens, the service stays usable for the next request.
        """
        stop = stop or threading.Event()
        settings = job.settings
        every = preview_every or max(1, settings.steps // 6)
        events: list[Progress] = []

        def on_step(step, total, latents):
            preview = preview_strip(latents) if (step + 1) % every == 0 or step + 1 == total else None
            events.append(Progress(step + 1, total, preview))

        self.outputs.prune()
        with self._run_lock:  # one generation at a time per process; the queue also enforces it
            try:
                with out_of_memory_guard(self.service):
                    pipe = self.service.pipeline(job.source)
                    result_holder: dict = {}
                    worker_error: list[BaseException] = []

                    def work():
                        try:
                            result_holder["result"] = pipe.denoise(
                                job.crops, settings, callback=on_step, should_stop=stop.is_set
                            )
                        except BaseException as exc:  # handed to the caller's thread below
                            worker_error.append(exc)

                    # Denoising runs in a thread so progress events reach the caller while it works.
                    thread = threading.Thread(target=work, daemon=True, name="idanimator-denoise")
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
                    segments = self.outputs.new_folder() if stream else None
                    for start in range(0, settings.num_frames, SEGMENT_FRAMES):
                        if stop.is_set():
                            raise GenerationCancelled("Generation was stopped.")
                        chunk = pipe.decode(result.latents, start, start + SEGMENT_FRAMES)
                        frames.extend(chunk)
                        if segments is not None:
                            yield Segment(write_mp4(chunk, self.outputs.new_path(".mp4", segments), fps=job.fps))
                    video = write_mp4(frames, self.outputs.new_path(".mp4"), fps=job.fps)
            finally:
                if stop.is_set():
                    release_memory()
        record = {**asdict(settings), "seed": result.seed, "fps": job.fps, "backbone": job.backbone}
        yield Finished(
            video=video,
            seed=result.seed,
            settings=record,
            warnings=result.warnings,
            seconds=time.monotonic() - job.created,
        )

    def run(
        self,
        request: Request,
        stop: threading.Event | None = None,
        stream: bool = True,
        preview_every: int | None = None,
    ) -> Iterator[Progress | Segment | Finished]:
        """:meth:`prepare` then :meth:`execute`."""
        job = self.prepare(request)
        yield from self.execute(job, stop=stop, stream=stream, preview_every=preview_every)
