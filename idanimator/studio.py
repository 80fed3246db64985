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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import GenerationCancelled, IDAnimatorError, InvalidRequestError
from .estimate import SpeedModel
from .extras.freeinit import passes as freeinit_passes
from .extras.longvideo import work_units
from .outputs import OutputFolder, default_output_parent, own_folder
from .preview import preview_strip, tile_images
from .request import GenerationRequest
from .service import ModelService, choose_offload, free_gpu_memory, release_memory
from .settings import ServingLimits
from .tiny import load_options
from .video import Mp4Writer, write_mp4

log = logging.getLogger(__name__)

# Frames per streamed chunk: 1 s of video at 8 fps. The page starts playing after the first one; each costs
# gradio an ffprobe and an ffmpeg mux, so fewer, longer chunks cost less (measured: benchmarks/RESULTS.md).
SEGMENT_FRAMES = 8
# Previews shown while denoising, at most (and the last step's): each costs gradio a saved image and API clients
# a download, a quarter of the app's own time per request at 7 previews (benchmarks/RESULTS.md).
PREVIEWS = 4


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
    serving_limits: ServingLimits | None = None


@dataclass
class Job:
    """A checked request with its aligned faces, ready to run (the backbone is one the service offers, or an
    operator's path or Hub id). Holds no models: it is pickled to a ZeroGPU worker; the pipeline comes from
    the service."""

    request: GenerationRequest  # validated
    crops: list
    notes: list[str] = field(default_factory=list)  # what we noticed about the photos
    created: float = field(default_factory=time.monotonic)

    def work_units(self) -> float:
        """Denoising work in UNet frame-steps at 512x512 (guidance, FreeInit's passes and long videos' windows
        counted): what a video's time is proportional to, for estimates."""
        return work_units(self.request)

    def gpu_seconds(self) -> int:
        """A generous estimate of the GPU time this job needs (for spaces.GPU's duration)."""
        r = self.request
        pixels = r.height * r.width / (512 * 512)
        return int(min(300, 30 + 0.04 * self.work_units() + 0.5 * r.num_frames * pixels))


@dataclass
class Progress:
    step: int
    total: int
    preview: object | None = None  # PIL image strip, every few steps


@dataclass
class Segment:
    path: Path  # a short MP4 of the next frames, for streaming


@dataclass
class Failed:
    message: str  # one sentence for the user


@dataclass
class Finished:
    video: Path
    seed: int
    settings: dict
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


# The release's default request (16 frames, 30 steps, 512x512, guidance 8) in work units: the serving limits'
# measure of a request's size.
DEFAULT_WORK = work_units(GenerationRequest(prompt="the release's default request"))


def face_strip(crops: list, size: int = 150):
    """The aligned faces side by side, each `size` pixels square: what the model sees (None if no crops)."""
    return tile_images([crop.image for crop in crops], size) if crops else None


def _given(faces: list | None) -> list:
    """The photos given (None entries dropped); none at all is one sentence."""
    faces = [f for f in (faces or []) if f is not None]
    if not faces:
        raise InvalidRequestError("Upload at least one photo of a face.")
    return faces


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
        load = load_options(tiny=self.tiny, **common)
        self.service = ModelService(load, detector=detector)
        root = own_folder(options.output_dir or default_output_parent())  # the user's own cache, not /tmp
        self.outputs = OutputFolder(Path(root), options.max_outputs, options.max_output_age_s)
        self._run_lock = threading.Lock()
        self.ready = threading.Event()  # set when warm_up() has finished (successfully or not)
        self.warm_error: str | None = None
        self.speed = SpeedModel()  # this process's denoising speed, from its videos, for estimates

    @property
    def device(self) -> str:
        return self.service.options.device

    @property
    def offload(self) -> str:
        return self.service.options.offload

    def loras(self) -> dict[str, Path]:
        """The style LoRAs a request may name (files in the operator's folder; the tiny kit's in tiny mode)."""
        folder = self.options.lora_dir or self.service.options.lora_dir
        folder = folder() if callable(folder) else folder  # read when a request names LoRAs, not on every one
        if folder is None or not Path(folder).is_dir():
            return {}
        return {p.stem: p for p in sorted(Path(folder).iterdir()) if p.suffix == ".safetensors" and p.is_file()}

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

        crops = [crop_face(face, self.service.detector()) for face in _given(faces)]
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

    def prepare(self, faces: list, request: GenerationRequest) -> Job:
        """Check the request (once) and the server's policy for it (its backbone, LoRAs by name, the serving
        limits), align the faces and load the pipeline (downloading a backbone if needed).

        Raises IDAnimatorError subclasses with user-facing sentences.
        """
        _given(faces)  # first, as on the page: the photo, then the prompt and the rest
        request = self._offered(request.validate())
        if self.options.serving_limits is not None:
            work = work_units(request) / DEFAULT_WORK
            self.options.serving_limits.check(request.num_frames, request.num_inference_steps, work)
        crops, notes = self.prepare_faces(faces)
        if self.options.load_in_prepare:
            with self._run_lock, self.service.guard():
                self.service.pipeline(request.backbone)
        else:
            self.service.fetch_backbone(request.backbone)  # download now, outside the GPU's time
        return Job(request=request, crops=crops, notes=notes)

    def _offered(self, request: GenerationRequest) -> GenerationRequest:
        """The request with what this server offers by name put in: its backbone (a path or Hub id only with
        allow_custom_backbones) and the files of the LoRAs it names (only those of the LoRA folder)."""
        backbone = self.service.check_backbone(
            request.backbone or self.service.options.default_backbone, self.options.allow_custom_backbones
        )
        loras = request.loras
        if loras:
            offered = self.loras()
            unknown = [lora.source for lora in loras if lora.source not in offered]
            if unknown:
                names = ", ".join(offered) or "none are offered here"
                raise InvalidRequestError(f"Unknown LoRA {unknown[0]!r}; choose from: {names}.")
            loras = tuple(replace(lora, source=str(offered[lora.source])) for lora in loras)
        return replace(request, backbone=backbone, loras=loras)  # still valid: the values were checked

    def estimate_seconds(self, request: GenerationRequest) -> float | None:
        """How long a request's denoising will take here, from the videos made by this process (None before the
        first one, or if the request is not valid yet)."""
        try:
            request = request.validate()
        except IDAnimatorError:
            return None
        return self.speed.estimate(request.num_inference_steps * freeinit_passes(request), work_units(request))

    def preview_control(self, request: GenerationRequest) -> list:
        """The conditioning frames a request's control would feed the model (edges, pose, keyframes),
        each captioned with its frame; raises InvalidRequestError with a sentence for bad control input."""
        from .extras.conditions import preview_condition

        request = request.validate()
        if request.control is None:
            return []
        return preview_condition(request.control, request.num_frames, (request.height, request.width))

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
        request = job.request
        self.outputs.prune()
        with self._run_lock:  # one generation at a time per process; the queue also enforces it
            try:
                with self.service.guard():
                    pipe = self.service.pipeline(request.backbone)
                    started, first_step = time.monotonic(), []
                    every = preview_every or -(-request.num_inference_steps // PREVIEWS)
                    result = yield from self._denoise(pipe, job, stop, every, first_step)
                    self.speed.record(
                        before_s=first_step[0] - started if first_step else 0.0,
                        steps=request.num_inference_steps * freeinit_passes(request),
                        work=job.work_units(),
                        loop_s=time.monotonic() - (first_step[0] if first_step else started),
                    )
                    # Decoding and encoding run ahead in a worker while the caller handles the previous
                    # segment (gradio probes and re-muxes each one: two processes per segment).
                    video = yield from _in_worker(lambda emit: self._write(pipe, job, result, stop, stream, emit), stop)
            finally:
                if stop.is_set():
                    release_memory()
        yield Finished(
            video=video,
            seed=result.seed,
            settings=result.request.settings(),
            warnings=result.warnings,
            seconds=time.monotonic() - job.created,
        )

    def _denoise(self, pipe, job: Job, stop: threading.Event, every: int, first_step: list):
        """Denoise in a worker thread, yielding its Progress events as they come; returns the result. The time of
        the first step's end goes into ``first_step`` (what comes before it is the prompt and face encoding)."""

        def work(emit):
            def on_step(step, total, latents):
                if not first_step:
                    first_step.append(time.monotonic())
                preview = preview_strip(latents) if (step + 1) % every == 0 or step + 1 == total else None
                emit(Progress(step + 1, total, preview))

            return pipe.denoise(job.crops, job.request, callback=on_step, should_stop=stop.is_set)

        return (yield from _in_worker(work, stop))

    def _write(self, pipe, job: Job, result, stop: threading.Event, stream: bool, emit) -> Path:
        """Decode the video a segment at a time (emitting each as a short MP4 when `stream` and decoding is slow
        enough for it to matter), then write it."""
        starts = range(0, job.request.num_frames, SEGMENT_FRAMES)
        segments = None
        recipe = result.request.settings()  # into the MP4's metadata: the recipe travels with the video
        with Mp4Writer(self.outputs.new_path(".mp4"), fps=job.request.fps, settings=recipe) as whole:
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
                    emit(Segment(write_mp4(chunk, self.outputs.new_path(".mp4", segments), fps=job.request.fps)))
        if stream and segments is None:  # one segment: the video itself is streamed
            emit(Segment(whole.path))
        return whole.path

    def run(
        self,
        faces: list,
        request: GenerationRequest,
        stop: threading.Event | None = None,
        stream: bool = True,
        preview_every: int | None = None,
    ) -> Iterator[Progress | Segment | Finished]:
        """:meth:`prepare` then :meth:`execute`."""
        job = self.prepare(faces, request)
        yield from self.execute(job, stop=stop, stream=stream, preview_every=preview_every)
