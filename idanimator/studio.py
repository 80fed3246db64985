"""What the app does, without the widgets or their wording: a request in, events out.

A request goes through two stages, so the app can run the second one elsewhere (on ZeroGPU, in a forked
GPU worker): :meth:`Studio.prepare` checks the request, aligns the faces and loads the pipeline (CPU work,
in the server process), and returns a picklable :class:`Job`; :meth:`Studio.execute` denoises, decodes
and writes the video, yielding :class:`Progress`, :class:`Segment` and :class:`Finished` events.
:meth:`Studio.run` does both. Everything here is plain Python (no gradio), tested directly.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import settings as limits
from .errors import GenerationCancelled, IDAnimatorError, InvalidRequestError
from .extras.spec import Extras
from .models import LoadOptions
from .options import extras_for, lora_files
from .outputs import OutputFolder, own_folder
from .preview import preview_strip, tile_images
from .prompts import DEFAULT_NEGATIVE_PROMPT
from .service import ModelService, choose_offload, free_gpu_memory, release_memory
from .settings import GenerationSettings
from .video import Mp4Writer, write_mp4

log = logging.getLogger(__name__)

# Frames per streamed chunk: 1 s of video at 8 fps. The page starts playing after the first one; each costs
# gradio an ffprobe and an ffmpeg mux (about 0.25 s on 2 cores), so 4-frame chunks cost 1 s a video.
SEGMENT_FRAMES = 8


def _in_worker(work, stop: threading.Event):
    """Run ``work(emit)`` in a thread, yielding whatever it emits as it comes; return what it returns.

    The caller (gradio, ZeroGPU's worker) does its own work between items, which then overlaps with ours.
    If the consumer goes away (closes this generator), ``stop`` is set and the worker is awaited.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    done = object()
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = work(events.put)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
        finally:
            events.put(done)

    thread = threading.Thread(target=run, daemon=True, name="idanimator-worker")
    thread.start()
    try:
        while (event := events.get()) is not done:
            yield event
    finally:
        if thread.is_alive():
            stop.set()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@dataclass
class StudioOptions:
    device: str | None = None
    offload: str = "auto"  # auto: from free GPU memory
    tiny: bool = False  # force tiny mode (it is also chosen when the real weights cannot be had)
    allow_custom_backbones: bool = False  # operators only: local files/folders and any Hub id
    output_dir: Path | None = None
    lora_dir: Path | None = None  # style LoRAs offered by name: NAME.safetensors files in this folder
    max_outputs: int = 200  # entries (videos, segment folders) kept in the output folder
    max_output_age_s: float = 24 * 3600
    # prepare() builds the pipeline (so execute() only runs it). False on ZeroGPU, where only the main thread
    # may place models "on cuda" outside the GPU worker: prepare() then only downloads the backbone.
    load_in_prepare: bool = True
    # Stream the video while it is decoded only when decoding takes at least this long (seconds, estimated from
    # the first segment); faster, the finished video comes as soon as a stream would (benchmarks/RESULTS.md).
    stream_after_s: float = 1.0
    # A served page's caps per request (frames, steps, work); None: only the library's own ranges apply.
    serving_limits: limits.ServingLimits | None = None


@dataclass
class Request:
    """One generation request as the page (or the API) sends it; nothing here is trusted yet."""

    faces: list  # paths (or images) of the reference photos
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    add_prompt_suffix: bool = True
    backbone: str = ""  # a name the studio offers ("" : the default)
    custom_backbone: str = ""  # a local path or Hub id; honoured only with allow_custom_backbones
    seed: int | None = None  # None: a random seed (reported with the result)
    id_scale: float = limits.ID_SCALE.default
    num_frames: int = limits.FRAMES.default
    steps: int = limits.STEPS.default
    guidance_scale: float = limits.GUIDANCE.default
    fps: int = limits.FPS.default
    height: int = limits.HEIGHT.default
    width: int = limits.WIDTH.default
    # Beyond the release (idanimator.options turns these into the library's Extras):
    fast: bool = False  # AnimateLCM
    free_init: bool = False
    loras: list = field(default_factory=list)  # names the studio offers ("name" or "name:weight")
    lora_weight: float = 1.0  # for the names given without a weight
    control: str = ""  # "" (none) or one of extras.spec.CONTROL_KINDS
    control_images: list = field(default_factory=list)  # SparseCtrl keyframes (paths or images)
    control_frames: str = ""  # the frame of each control image, "0, 15" ("": spread over the video)
    control_video: str | None = None  # the driving video of openpose, depth or canny
    control_strength: float = 1.0


@dataclass
class Job:
    """A checked request, ready to run: validated settings, aligned faces, the backbone to use.

    Holds no models (it is pickled to a ZeroGPU worker); the pipeline comes from the service.
    """

    settings: GenerationSettings
    crops: list
    backbone: str  # a name the service offers, or an operator's path or Hub id
    fps: int
    notes: list[str] = field(default_factory=list)  # what we noticed about the photos
    extras: Extras = field(default_factory=Extras)  # the options beyond the release
    created: float = field(default_factory=time.monotonic)

    def work_units(self) -> float:
        """Denoising work in UNet frame-steps at 512x512 (guidance, FreeInit's passes and long videos' windows
        counted): what a video's time is proportional to, for estimates."""
        from .extras.longvideo import work_units

        return work_units(self.settings, self.extras)

    def gpu_seconds(self) -> int:
        """A generous estimate of the GPU time this job needs (for spaces.GPU's duration)."""
        s = self.settings
        pixels = s.height * s.width / (512 * 512)
        return int(min(300, 30 + 0.04 * self.work_units() + 0.5 * s.num_frames * pixels))


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


# The release's default request (16 frames, 30 steps, 512x512, guidance 8) in work units: the serving limits'
# measure of a request's size.
_DEFAULT_WORK = Job(settings=GenerationSettings(prompt=""), crops=[], backbone="", fps=limits.FPS.default).work_units()


def face_strip(crops: list, size: int = 150):
    """The aligned faces side by side, each `size` pixels square: what the model sees (None if no crops)."""
    return tile_images([crop.image for crop in crops], size) if crops else None


class Studio:
    """One per process: the model service, the output folder, and request handling."""

    def __init__(self, options: StudioOptions, detector=None):
        from .weights import real_weights_status

        self.options = options
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        offload = options.offload if options.offload != "auto" else choose_offload(free_gpu_memory(device))
        if options.tiny:
            self.tiny_reason, self.needs_download = "forced with --tiny.", False
        else:
            self.tiny_reason, self.needs_download = real_weights_status()
        self.tiny = self.tiny_reason is not None
        common = dict(device=device, offload=offload, allow_hub_ids=options.allow_custom_backbones)
        if self.tiny:
            from .testing import tiny_load_options

            load = tiny_load_options(**common)
        else:
            load = LoadOptions.for_device(**common)
        self.service = ModelService(load, detector=detector)
        root = own_folder(options.output_dir or Path(tempfile.gettempdir()))
        self.outputs = OutputFolder(Path(root), options.max_outputs, options.max_output_age_s)
        self._run_lock = threading.Lock()
        self.ready = threading.Event()  # set when warm_up() has finished (successfully or not)
        self.warm_error: str | None = None
        self._seconds_per_unit: float | None = None  # the last video's denoising speed, for estimates

    @property
    def device(self) -> str:
        return self.service.options.device

    @property
    def offload(self) -> str:
        return self.service.options.offload

    def loras(self) -> dict[str, Path]:
        """The style LoRAs a request may name (files in the operator's folder; the tiny kit's in tiny mode)."""
        folder = self.options.lora_dir or self.service.options.lora_dir
        return lora_files(folder() if callable(folder) else folder)  # listed when a request names LoRAs

    def backbones(self) -> list[str]:
        """The backbone names a request may pick (the first is the default)."""
        return self.service.options.backbone_names()

    def warm_up(self) -> None:
        """Download (if needed) and load the default pipeline and the face detector, so the first request
        does not wait for them. Run it in a background thread after the page is up (or before, on ZeroGPU).
        A failure is kept for the page and the next request tries again."""
        try:
            self.service.detector()
            with self.service.guard():
                self.service.pipeline()
        except IDAnimatorError as exc:
            self.warm_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - logged; the next request retries and reports it
            log.exception("warm-up failed")
            self.warm_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    # -- requests -------------------------------------------------------------------------------

    def prepare_faces(self, faces: list) -> tuple[list, list[str]]:
        """Aligned crops of every photo, and the sentences to show about them. Raises on a bad photo."""
        from .face import crop_face

        faces = [f for f in (faces or []) if f is not None]
        if not faces:
            raise InvalidRequestError("Upload at least one photo of a face.")
        crops = [crop_face(face, self.service.detector()) for face in faces]
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

    def prepare(self, request: Request) -> Job:
        """Check everything, align the faces and load the pipeline (downloading a backbone if needed).

        Raises IDAnimatorError subclasses with user-facing sentences.
        """
        fps = limits.FPS.check(request.fps)
        settings = GenerationSettings.taken_from(request).validate()
        backbone = self.service.check_backbone(
            request.backbone or self.service.options.default_backbone,
            limits.check_text("The custom backbone", request.custom_backbone, 1000),
            self.options.allow_custom_backbones,
        )
        extras = extras_for(request, settings.num_frames, self.loras)
        if self.options.serving_limits is not None:
            work = Job(settings=settings, crops=[], backbone="", fps=fps, extras=extras).work_units()
            self.options.serving_limits.check(settings.num_frames, settings.steps, work / _DEFAULT_WORK)
        crops, notes = self.prepare_faces(request.faces)
        if self.options.load_in_prepare:
            with self._run_lock, self.service.guard():
                self.service.pipeline(backbone)
        else:
            self.service.fetch_backbone(backbone)  # download now, outside the GPU's time
        return Job(settings=settings, crops=crops, backbone=backbone, fps=fps, notes=notes, extras=extras)

    def estimate_seconds(self, request: Request) -> float | None:
        """How long a request's denoising will take here, from the speed of the last video made by this
        process (None before the first one, or if the request is not valid yet)."""
        if self._seconds_per_unit is None:
            return None
        try:
            settings = GenerationSettings.taken_from(request).validate()
            extras = extras_for(replace(request, loras=[]), settings.num_frames, dict)  # LoRAs hardly change the time
            job = Job(settings=settings, crops=[], backbone="", fps=8, extras=extras)
        except IDAnimatorError:
            return None
        return self._seconds_per_unit * job.work_units()

    def preview_control(self, request: Request) -> list:
        """The conditioning frames a request's control would feed the model (edges, pose, keyframes),
        each captioned with its frame; raises InvalidRequestError with a sentence for bad control input."""
        from .extras.conditions import preview_condition

        settings = GenerationSettings.taken_from(request).validate()
        extras = extras_for(request, settings.num_frames, self.loras)
        if extras.control is None:
            return []
        return preview_condition(extras.control, settings.num_frames, (settings.height, settings.width))

    def execute(
        self,
        job: Job,
        stop: threading.Event | None = None,
        stream: bool = True,
        preview_every: int | None = None,
    ) -> Iterator[Progress | Segment | Finished]:
        """Denoise, decode and write one video, yielding progress (with previews every few steps), streamed
        segments (short MP4s of SEGMENT_FRAMES frames each, when `stream`), then the result.

        Raises IDAnimatorError subclasses with user-facing sentences; GenerationCancelled when `stop` is set.
        Whatever happens, the service stays usable for the next request.
        """
        stop = stop or threading.Event()
        settings = job.settings
        self.outputs.prune()
        with self._run_lock:  # one generation at a time per process; the queue also enforces it
            try:
                with self.service.guard():
                    pipe = self.service.pipeline(job.backbone)
                    started = time.monotonic()
                    result = yield from self._denoise(pipe, job, stop, preview_every or max(1, settings.steps // 6))
                    self._seconds_per_unit = (time.monotonic() - started) / job.work_units()
                    # Decoding and encoding run ahead in a worker while the caller handles the previous
                    # segment (gradio probes and re-muxes each one: two processes per segment).
                    video = yield from _in_worker(lambda emit: self._write(pipe, job, result, stop, stream, emit), stop)
            finally:
                if stop.is_set():
                    release_memory()
        yield Finished(
            video=video,
            seed=result.seed,
            settings={**settings.as_dict(), "seed": result.seed, "fps": job.fps, "backbone": job.backbone},
            warnings=result.warnings,
            seconds=time.monotonic() - job.created,
        )

    def _denoise(self, pipe, job: Job, stop: threading.Event, every: int):
        """Denoise in a worker thread, yielding its Progress events as they come; returns the result."""

        def work(emit):
            def on_step(step, total, latents):
                preview = preview_strip(latents) if (step + 1) % every == 0 or step + 1 == total else None
                emit(Progress(step + 1, total, preview))

            return pipe.denoise(job.crops, job.settings, extras=job.extras, callback=on_step, should_stop=stop.is_set)

        return (yield from _in_worker(work, stop))

    def _write(self, pipe, job: Job, result, stop: threading.Event, stream: bool, emit) -> Path:
        """Decode the video a segment at a time (emitting each as a short MP4 when `stream` and decoding is slow
        enough for it to matter), then write it."""
        starts = range(0, job.settings.num_frames, SEGMENT_FRAMES)
        segments = None
        with Mp4Writer(self.outputs.new_path(".mp4"), fps=job.fps) as whole:  # chunk by chunk: flat memory
            for index, start in enumerate(starts):
                if stop.is_set():
                    raise GenerationCancelled("Generation was stopped.")
                began = time.monotonic()
                chunk = pipe.decode(result.latents, start, start + SEGMENT_FRAMES)
                if index == 0 and stream:  # each segment costs gradio an ffprobe and a mux: stream slow decodes only
                    stream = (time.monotonic() - began) * len(starts) >= self.options.stream_after_s
                    segments = self.outputs.new_folder() if stream and len(starts) > 1 else None
                whole.write(chunk)
                if segments is not None:
                    emit(Segment(write_mp4(chunk, self.outputs.new_path(".mp4", segments), fps=job.fps)))
        if stream and segments is None:  # one segment: the video itself is streamed
            emit(Segment(whole.path))
        return whole.path

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
