"""idanimator's Gradio page: a face photo and a prompt in, an identity-preserving video out.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--device cuda] [--offload auto]
                  [--tiny] [--allow-custom-backbones] [--output-dir DIR] [--max-outputs N] [--lora-dir DIR]
                  [--max-frames N] [--max-steps N] [--max-work X] [--max-jobs-per-visitor N] [--queue-size N]

Only widgets and events live here; the work is in `idanimator.studio`. Runs unchanged as a Hugging
Face Space: the GPU part of a request is wrapped with `spaces.GPU` (a pass-through elsewhere), and on
ZeroGPU the models are loaded before the page starts, in the main process, as ZeroGPU expects.
Nothing is loaded when this module is imported.
"""

from __future__ import annotations

# ruff: noqa: E402 - when run as a script, the arguments are parsed before the slow imports below
import argparse
import os


def argument_parser() -> argparse.ArgumentParser:
    """The command line (argparse only, so `python app.py --help` answers before gradio and torch load)."""
    parser = argparse.ArgumentParser(description="idanimator web app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--offload",
        choices=["auto", "none", "model", "sequential"],
        default="auto",
        help="CPU offload: auto picks from free GPU memory (none from 14 GB, model from 7 GB, else sequential)",
    )
    parser.add_argument("--tiny", action="store_true", help="random tiny weights (no download)")
    parser.add_argument(
        "--allow-custom-backbones",
        action="store_true",
        help="let users load local files/folders and any Hub id (operators only)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="videos go into DIR/idanimator-outputs, served to anyone who knows a name (default: ~/.cache/idanimator)",
    )
    parser.add_argument("--max-outputs", type=int, default=200, help="entries kept in the output folder")
    parser.add_argument("--lora-dir", default=None, help="style LoRAs offered by name: NAME.safetensors files")
    # What one request or visitor may ask for (settings.py imports no torch, so --help stays instant).
    from idanimator.settings import ServingLimits

    cap = ServingLimits()
    caps = parser.add_argument_group("limits per request and visitor (the defaults suit a public Space)")
    caps.add_argument("--max-frames", type=int, default=cap.max_frames, help="frames per video (default %(default)s)")
    caps.add_argument("--max-steps", type=int, default=cap.max_steps, help="denoising steps (default %(default)s)")
    caps.add_argument(
        "--max-work",
        type=float,
        default=cap.max_work,
        help="a request's denoising work, in multiples of the release's default video (default %(default)s)",
    )
    caps.add_argument(
        "--max-jobs-per-visitor",
        type=int,
        default=cap.jobs_per_visitor,
        help="videos one visitor may have waiting or running (default %(default)s)",
    )
    caps.add_argument(
        "--queue-size", type=int, default=cap.queue_size, help="requests waiting, all visitors (default %(default)s)"
    )
    return parser


def serving_limits(args: argparse.Namespace):
    """The operator's caps as the studio's ServingLimits; a value out of range is one sentence."""
    from idanimator.settings import FRAMES, STEPS, ServingLimits

    for flag, value, low, high in (
        ("--max-frames", args.max_frames, 1, FRAMES.high),
        ("--max-steps", args.max_steps, 1, STEPS.high),
        ("--max-work", args.max_work, 0.01, 1e6),
        ("--max-jobs-per-visitor", args.max_jobs_per_visitor, 1, 1000),
        ("--queue-size", args.queue_size, 1, 10000),
    ):
        if not low <= value <= high:
            raise SystemExit(f"error: {flag} must be between {low:g} and {high:g} (got {value:g}).")
    return ServingLimits(
        max_frames=args.max_frames,
        max_steps=args.max_steps,
        max_work=args.max_work,
        jobs_per_visitor=args.max_jobs_per_visitor,
        queue_size=args.queue_size,
    )


if __name__ == "__main__":
    ARGS = argument_parser().parse_args()  # --help and bad arguments answer here, in a fraction of a second
    serving_limits(ARGS)
    from idanimator.console import quiet_libraries

    quiet_libraries()  # before torch, diffusers and transformers are imported (below)

import html
import logging
import shutil
import threading
import time
from pathlib import Path

import gradio as gr
import spaces
from gradio.data_classes import FileData

from idanimator import registry, settings
from idanimator.console import quiet_loading_bars
from idanimator.errors import IDAnimatorError, InvalidRequestError
from idanimator.prompts import DEFAULT_NEGATIVE_PROMPT
from idanimator.request import SPARSE_KINDS, VIDEO_KINDS, ControlSpec, GenerationRequest, KeyFrame, LoraSpec
from idanimator.studio import Failed, Finished, Job, Progress, Segment, Studio, StudioOptions, face_strip

log = logging.getLogger("idanimator.app")

MAX_UPLOAD = "20mb"  # per file; larger uploads are refused before they reach Python
STREAMING = bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))  # gradio's stream muxer needs both
# While denoising, `generate` yields at least this often (and at every preview): gradio closes it (Stop) only at a
# yield, and each yield is a round of gradio's output processing and messages, which costs the denoising thread
# time on a busy CPU (benchmarks/RESULTS.md, serving overhead).
YIELD_EVERY_S = 0.25
ZERO_GPU = bool(spaces.config.Config.zero_gpu)
ASSETS = Path(__file__).resolve().parent / "assets"
# The history table: the prompt, and the rest of a video's settings in words; two wrapped columns, in shares of
# the page's width, so that a phone shows all of it too (one column a setting scrolled sideways there).
HISTORY_HEADERS = ["prompt", "settings"]
HISTORY_WIDTHS = ["45%", "55%"]
# Keeps the results in view beside the options on a desktop; on a phone the columns stack as usual.
CSS = """
@media (min-width: 900px) { #results { position: sticky; top: 8px; align-self: flex-start; } }
#preview img { object-fit: contain; }
/* gradio's "n/N steps | 0.1s" line: its timer restarts at every yield, so the description carries the time */
#preview .progress-text { display: none; }
/* a long word (a Hub id, a LoRA's name) breaks rather than pushing the settings table wider than a phone */
#history-table td { overflow-wrap: anywhere; }
"""
UNEXPECTED = "Something went wrong while making the video ({}); the server is fine, please try again."
# Seconds a toast stays up. Gradio stacks the messages of one kind in one toast and closes the toast this long
# after its first message, so repeated errors never pile up for longer than this.
MESSAGE_SECONDS = 6
RESOLUTIONS = {"512x512": (512, 512), "512x768 (portrait)": (768, 512), "768x512 (landscape)": (512, 768)}
TINY_RESOLUTIONS = {"64x64 (tiny)": (64, 64), "64x96 (tiny)": (96, 64)}
CONTROL_CHOICES = [
    ("None", ""),
    ("Sketch keyframes (SparseCtrl)", "sparse-sketch"),
    ("Image keyframes (SparseCtrl)", "sparse-rgb"),
    ("Pose from a video (OpenPose ControlNet)", "openpose"),
    ("Depth from a video (depth ControlNet)", "depth"),
    ("Edges from a video (canny ControlNet)", "canny"),
]
TINY_BACKBONE_LABELS = {"tiny": "Tiny random model (folder)", "tiny-single-file": "Tiny random model (single file)"}

_studio: Studio | None = None


def studio() -> Studio:
    """The process's Studio (made on first use, so importing this module loads nothing)."""
    global _studio
    if _studio is None:
        _studio = Studio(StudioOptions())
    return _studio


class StudioVideo(gr.Video):
    """gr.Video for the studio's own MP4s. gradio's Video runs ffprobe on every video it shows, to see whether it
    must convert it for browsers (about 55 ms, a process, on each result); the studio writes H.264 MP4s only, so
    a file it made is shown as it is. Anything else goes through gr.Video unchanged. A template, as gradio's own
    gr.PlayableVideo is: the browser draws it with gr.Video's frontend."""

    is_template = True

    def postprocess(self, value):
        if isinstance(value, (str, Path)) and Path(value).suffix == ".mp4" and studio().outputs.made_here(value):
            # gradio's file handling (the allowed-paths check, the copy to its cache) still runs after this
            return FileData(path=str(value), orig_name=Path(value).name)
        return super().postprocess(value)


def _paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]


def _error(message: str) -> gr.Error:
    """A gr.Error for a user mistake: one sentence, shown as text (gradio renders HTML) for a few seconds,
    no traceback."""
    return gr.Error(html.escape(message), duration=MESSAGE_SECONDS, print_exception=False)


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


# -- wording and presets -------------------------------------------------------------------------


def banner_text(engine: Studio) -> str:
    """Markdown for the top of the page: the mode, and anything the user should know (may be empty)."""
    lines = []
    if engine.tiny:
        lines.append(
            "**Tiny mode: the weights are random, so videos are coloured noise.** "
            f"Reason: {_first_sentence(engine.tiny_reason)}. To use the real ID-Animator weights, run "
            "`python -m idanimator download` and restart the app; for a machine without internet, run it on one "
            "that has internet, copy its Hugging Face cache (the `HF_HOME` folder, `~/.cache/huggingface` by "
            "default) here, and start the app with `HF_HOME` set to that copy and `HF_HUB_OFFLINE=1`. "
            "Sizes start at 64x64 pixels, 8 frames and 4 steps so a CPU makes a video in seconds."
        )
    if engine.warm_error:
        lines.append(f"**The models could not be loaded:** {engine.warm_error}")
    elif engine.needs_download and not engine.ready.is_set():
        lines.append(
            "Downloading the ID-Animator weights (several GB) in the background; the first video starts "
            "when they are in. Reload the page to see whether they are."
        )
    if engine.device == "cpu" and not engine.tiny:
        lines.append(
            "Running on the CPU in float32: a full-size video takes a long time (many minutes). "
            "Use fewer frames, fewer steps and 512x512 to try it out."
        )
    return "\n\n".join(lines)


def startup_lines(engine: Studio) -> list[str]:
    """What `python app.py` prints before the page starts: the mode in one short line, and where outputs go."""
    lines = []
    if engine.tiny:
        lines.append(
            f"Tiny mode (random weights): {_first_sentence(engine.tiny_reason)}. "
            "Get the real weights with `python -m idanimator download`, then restart."
        )
    lines.append(f"Device: {engine.device}, offload: {engine.offload}, outputs in {engine.outputs.root}")
    return lines


def backbone_choices(engine: Studio) -> list[tuple[str, str]]:
    """(label, value) pairs for the backbone dropdown."""
    return [(TINY_BACKBONE_LABELS.get(name) or registry.BACKBONES[name].label, name) for name in engine.backbones()]


def resolutions(engine: Studio) -> dict[str, tuple[int, int]]:
    """Preset label -> (height, width)."""
    return TINY_RESOLUTIONS if engine.tiny else RESOLUTIONS


def starting_values(engine: Studio) -> dict:
    """The widgets' starting values: the release's defaults, or sizes a CPU renders in seconds in tiny mode."""
    tiny = settings.TINY_DEFAULTS if engine.tiny else {}
    return dict(
        num_frames=tiny.get("num_frames", settings.FRAMES.default),
        num_inference_steps=tiny.get("num_inference_steps", settings.STEPS.default),
        guidance_scale=settings.GUIDANCE.default,
        id_scale=settings.ID_SCALE.default,
        fps=settings.FPS.default,
        resolution=next(iter(resolutions(engine))),
        backbone=engine.backbones()[0],
    )


def slider(limit: settings.Limit, value, label: str | None = None, maximum=None, **kwargs) -> gr.Slider:
    """A slider whose range and step are the setting's own (the library validates with the same Limit), up to
    ``maximum`` when the operator caps it (gradio then refuses larger values from API callers too)."""
    high = limit.high if maximum is None else min(limit.high, maximum)
    return gr.Slider(limit.low, high, value=value, step=limit.step, label=label or limit.label, **kwargs)


# -- handlers (plain functions) ------------------------------------------------------------------


def page_banner():
    """On every page load: the current mode and state (tiny mode, downloading, CPU)."""
    text = banner_text(studio())
    return gr.update(value=text, visible=bool(text))


def show_faces(files):
    """After upload: the aligned crops the model will see, and what we noticed about the photos."""
    if not files:
        return None, ""
    crops, notes = studio().preview_faces(_paths(files))
    return face_strip(crops), "\n".join(f"- {html.escape(n)}" for n in notes)


@spaces.GPU(duration=Job.gpu_seconds)
def run_on_gpu(job: Job):
    """The GPU part of a request (on ZeroGPU, in a forked worker): studio events, ending in Failed(sentence)
    instead of an exception, since only plain picklable values cross the process.

    Stop is gradio's own cancellation: it closes `generate` at its next yield, whose `finally` closes this
    generator; on ZeroGPU, spaces forwards that close to the worker (checked in spaces/zero/wrappers.py), and
    either way the studio's worker thread stops at its next denoising step."""
    try:
        yield from studio().execute(job, stream=STREAMING)
    except IDAnimatorError as exc:
        yield Failed(str(exc))
    except Exception as exc:  # noqa: BLE001 - logged; the user gets a sentence
        log.exception("generation failed")
        yield Failed(UNEXPECTED.format(type(exc).__name__))


# What the page sends that is not a request field as it is: the photos, and the widgets it translates.
PAGE_ONLY = (
    "faces",
    "custom_backbone",
    "randomize_seed",
    "resolution",
    "lora_weight",
    "control_images",
    "control_frames",
    "control_video",
    "control_strength",
)
REQUEST_FIELDS = {f for f in GenerationRequest.__dataclass_fields__ if not f.startswith("_")}


def request_from_page(values: dict) -> tuple[list, GenerationRequest]:
    """The page's values (by widget name) as the photos and the request. Widgets named like a request field go
    in as they are; only the page's own translations are made here: "randomize" -> no seed, a resolution
    preset -> height and width, the custom backbone box, LoRA names with the weight slider, and the control
    widgets (the keyframe textbox) -> one ControlSpec."""
    page = dict(values)
    presets = resolutions(studio())
    if page.get("resolution") not in presets:
        raise _error(f"Resolution must be one of {', '.join(presets)}.")
    height, width = presets[page["resolution"]]
    control = None
    if page.get("control"):
        images = _paths(page.get("control_images"))
        frames = keyframe_indices(page.get("control_frames") or "", len(images), page.get("num_frames"))
        keys = tuple(KeyFrame(image, frame) for image, frame in zip(images, frames, strict=True))
        video = _paths([page["control_video"]])[0] if page.get("control_video") else None
        control = ControlSpec(
            page["control"], keys, video, page.get("control_strength", settings.CONTROL_STRENGTH.default)
        )
    weight = page.get("lora_weight", settings.LORA_WEIGHT.default)
    fields = {name: value for name, value in page.items() if name in REQUEST_FIELDS}
    fields.update(
        prompt=page.get("prompt") or "",
        seed=None if page.get("randomize_seed") else page.get("seed"),
        height=height,
        width=width,
        backbone=(page.get("custom_backbone") or "").strip() or page.get("backbone") or "",
        loras=tuple(LoraSpec(name, weight) for name in page.get("loras") or ()),
        control=control,
    )
    return _paths(page.get("faces")), GenerationRequest(**fields)


def keyframe_indices(text: str, count: int, num_frames) -> list[int]:
    """The frame of each of ``count`` control images: from "0, 15" (in upload order), or spread evenly over
    the video when the text is empty."""
    text = settings.check_text("The control frames", text, 1000).strip()
    if not text:
        last = settings.FRAMES.check(num_frames) - 1
        return [round(i * last / (count - 1)) for i in range(count)] if count > 1 else [0] * count
    try:
        frames = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InvalidRequestError(f"Control frames must be whole numbers separated by commas (got {text!r}).") from None
    if len(frames) != count:
        raise InvalidRequestError(f"Give one frame for each of the {count} control images (got {len(frames)}).")
    return frames


def show_control(**values):
    """The conditioning the control would feed the model, or a sentence saying what is wrong."""
    try:
        images = studio().preview_control(request_from_page(values)[1])
    except IDAnimatorError as exc:
        return [], f"- {html.escape(str(exc))}"
    return [(image, image.info.get("caption", "")) for image in images], ""


def show_estimate(**values):
    """Before a run: how long it will take, from the speed of this server's last video."""
    try:
        seconds = studio().estimate_seconds(request_from_page({**values, "prompt": "-"})[1])  # any prompt: same time
    except (IDAnimatorError, gr.Error):
        return ""
    if seconds is None:
        return "The time estimate appears after this server's first video."
    if seconds < 1:
        shown = "under a second"
    else:
        shown = f"about {seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.1f} min"
    return f"Estimated denoising time: {shown} (from the speed of the videos made here)."


def fast_defaults(fast, steps, guidance, saved):
    """Ticked: fast mode's own steps and guidance, keeping what the user had; unticked: what they had back."""
    if fast:
        return gr.update(value=settings.FAST_STEPS), gr.update(value=settings.FAST_GUIDANCE), (steps, guidance)
    if saved:
        return gr.update(value=saved[0]), gr.update(value=saved[1]), None
    return gr.update(), gr.update(), None


def control_visibility(kind):
    """Only the inputs of the chosen control: keyframes for SparseCtrl, a driving video for ControlNets."""
    sparse, video = kind in SPARSE_KINDS, kind in VIDEO_KINDS
    shown = [gr.update(visible=sparse), gr.update(visible=sparse), gr.update(visible=video)]
    return [*shown, gr.update(visible=bool(kind)), gr.update(visible=bool(kind)), gr.update(visible=bool(kind))]


def generate(history, request: gr.Request, progress=gr.Progress(), control_images=None, control_video=None, **values):
    """Stream progress, previews and video chunks; end with the full MP4, the seed used and the history.

    ``values``: the page's inputs by name (see build_demo's ``page_inputs``); the optional file inputs are named
    here with a default, which tells gradio's API that a client may leave them out. Outputs: live stream,
    preview, result, seed text, seed box, history.
    """
    skip = gr.update()
    history = list(history or [])
    try:
        faces, generation = request_from_page(
            {**values, "control_images": control_images, "control_video": control_video}
        )
    except IDAnimatorError as exc:
        raise _error(str(exc)) from None
    events = None
    try:
        started = time.monotonic()  # gradio's own timer restarts at every yield: ours
        progress(0, desc="Checking the photos and loading the model")
        try:
            prepared = studio().prepare(faces, generation)
        except IDAnimatorError as exc:
            raise _error(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - logged; the user gets a sentence
            log.exception("preparing the request failed")
            raise _error(UNEXPECTED.format(type(exc).__name__)) from None
        events = run_on_gpu(prepared)
        last_yield = time.monotonic()
        for event in events:
            if isinstance(event, Progress):
                desc = f"Denoising: step {event.step} of {event.total}, {time.monotonic() - started:.0f} s"
                progress((event.step, event.total), desc=desc, unit="steps")  # sent by gradio's own timer
                # Stop closes this generator, which it can only do while it waits at a yield (a running generator
                # cannot be closed): so a yield at least every YIELD_EVERY_S, and at each preview.
                if event.preview is not None or time.monotonic() - last_yield >= YIELD_EVERY_S:
                    last_yield = time.monotonic()
                    yield skip, event.preview or skip, skip, skip, skip, history
            elif isinstance(event, Segment):
                progress(1.0, desc="Decoding")
                yield str(event.path), skip, skip, skip, skip, history
            elif isinstance(event, Finished):
                for warning in event.warnings:
                    gr.Warning(html.escape(warning), duration=MESSAGE_SECONDS)
                history = [*history, {"video": str(event.video), **event.settings}]
                used = f"Seed used: **{event.seed}** ({event.seconds:.1f} s)"
                yield skip, skip, str(event.video), used, event.seed, history
            elif isinstance(event, Failed):
                raise _error(event.message)
    finally:  # Stop, or the browser going away: closing the GPU part stops it at its next step
        if events is not None:
            events.close()


def stopped():
    """After Stop has cancelled this session's generation."""
    gr.Info("Stopped.", duration=MESSAGE_SECONDS)
    return "Stopped."


def history_gallery(history):
    """Earlier videos of this session that are still on disk (old ones are pruned)."""
    return [
        (item["video"], f"seed {item['seed']}")  # short enough for a thumbnail; the table has the rest
        for item in reversed(history or [])
        if os.path.exists(item["video"])
    ]


def history_table(history):
    """The settings of this session's videos, newest first: the prompt, and the rest in words."""
    return [[item.get("prompt"), settings_text(item)] for item in reversed(history or [])]


def settings_text(item: dict) -> str:
    """A video's settings but the prompt, e.g. "seed 7, tiny, 16 frames, 30 steps, guidance 8, ID scale 1, 512x512"
    (size as height x width, like the presets), then the options beyond the release (`options_text`)."""
    words = [f"seed {item.get('seed')}"] + ([item["backbone"]] if item.get("backbone") else [])  # "": the default
    words += [
        f"{item.get('num_frames')} frames",
        f"{item.get('num_inference_steps')} steps",
        f"guidance {item.get('guidance_scale'):g}",
        f"ID scale {item.get('id_scale'):g}",
        f"{item.get('height')}x{item.get('width')}",
    ]
    options = options_text(item)
    return ", ".join(words) + (f"; {options}" if options else "")


def options_text(item: dict) -> str:
    """A video's options beyond the release, e.g. "fast, FreeInit, LoRA tiny-style 0.8, canny 1.0"."""
    words = ["fast"] if item.get("fast") else []
    words += ["FreeInit"] if item.get("free_init") else []
    words += [f"LoRA {Path(lora['source']).stem} {lora['weight']:g}" for lora in item.get("loras") or []]
    if item.get("control"):
        words.append(f"{item['control']} {item.get('control_strength', 1.0):g}")
    return ", ".join(words)


def restore_settings(history, event: gr.SelectData):
    """A row of the settings table clicked: that video's settings back into the form (the photos and control
    files stay as they are). Returns the updates of RESTORED's widgets, in that order."""
    rows = list(reversed(history or []))
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    if not isinstance(row, int) or not 0 <= row < len(rows):
        return [gr.update() for _ in RESTORED]
    return form_updates(rows[row])


def settings_from_video(video):
    """An MP4 made here dropped on the page: the settings it carries in its metadata fill the form."""
    from idanimator.video import read_settings

    if not video:
        return [gr.update() for _ in RESTORED]
    try:
        item = read_settings(_paths([video])[0], required=True)
    except IDAnimatorError as exc:
        raise _error(str(exc)) from None
    gr.Info("The form now holds that video's settings (the photos and control files are yours to add).")
    return form_updates(item)


def form_updates(item: dict) -> list:
    """A video's settings (GenerationRequest.settings()) as updates of RESTORED's widgets, in that order."""
    size = (item.get("height"), item.get("width"))
    label = next((name for name, hw in resolutions(studio()).items() if hw == size), None)
    values = {
        **{name: item.get(name) for name in RESTORED if name in item},
        "randomize_seed": False,
        "resolution": label,
        "loras": [Path(lora["source"]).stem for lora in item.get("loras") or []],
        "control": item.get("control") or "",
    }
    return [gr.update() if values.get(name) is None else gr.update(value=values[name]) for name in RESTORED]


# The form's widgets a past video's settings are restored into (by page_inputs' names).
RESTORED = (
    "prompt",
    "negative_prompt",
    "add_prompt_suffix",
    "backbone",
    "seed",
    "randomize_seed",
    "id_scale",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "fps",
    "resolution",
    "fast",
    "free_init",
    "loras",
    "control",
)


# -- the page ------------------------------------------------------------------------------------


class Page(gr.Blocks):
    """gr.Blocks, with one line in the log instead of a server traceback when gradio refuses an input that the
    page's widgets never send (a number outside a slider's range, a choice not offered: only an API call can
    send one). The caller still gets gradio's sentence."""

    async def preprocess_data(self, *args, **kwargs):  # gradio checks each input against its widget here
        try:
            return await super().preprocess_data(*args, **kwargs)
        except gr.Error as exc:
            if not exc.print_exception:
                raise
            log.info("refused a request: %s", exc.message)
            raise _error(str(exc.message)) from None  # escaped: gradio's sentence may quote what the sender sent


def build_demo(engine: Studio | None = None) -> gr.Blocks:
    global _studio
    if engine is not None:
        _studio = engine
    engine = studio()
    caps = engine.options.serving_limits or settings.ServingLimits(
        max_frames=settings.FRAMES.high, max_steps=settings.STEPS.high, max_work=float("inf"), jobs_per_visitor=0
    )  # an engine made without caps (tests, a library user's own page): the library's ranges, no visitor cap
    defaults = starting_values(engine)
    banner_markdown = banner_text(engine)
    # Gradio keeps its own copies of served files: drop them after an hour, checked hourly.
    with Page(title="idanimator", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# idanimator\nOne face photo and a prompt: a short video of that person (ID-Animator).")
        banner = gr.Markdown(banner_markdown, visible=bool(banner_markdown), elem_id="banner")
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(elem_id="inputs"):
                files = gr.File(
                    label="Face photo(s): drop one or more; several photos of one person are mixed",
                    file_count="multiple",
                    file_types=["image"],
                    height=110,
                    elem_id="faces",
                )
                crops = gr.Image(
                    label="What the model sees (aligned faces)",
                    height=120,
                    interactive=False,
                    buttons=[],
                    elem_id="crops",
                )
                face_notes = gr.Markdown(elem_id="face-notes")
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="a man playing guitar on a beach at sunset",
                    max_length=settings.MAX_TEXT_CHARS,
                    elem_id="prompt",
                )
                with gr.Row():  # where the prompt is: nothing to scroll past
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
                estimate = gr.Markdown(elem_id="estimate")
                with gr.Row():
                    backbone = gr.Dropdown(
                        backbone_choices(engine), value=defaults["backbone"], label="Backbone", elem_id="backbone"
                    )
                    seed = gr.Number(
                        label="Seed",
                        value=42,
                        precision=0,
                        minimum=settings.SEED.low,
                        maximum=settings.SEED.high,
                        elem_id="seed",
                    )
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                custom_backbone = gr.Textbox(
                    "",
                    label="Or a local backbone file/folder, or a Hub id (operator option)",
                    visible=engine.options.allow_custom_backbones,
                    elem_id="custom-backbone",
                )
                # The options in tabs: one is open at a time, so the result column stays beside them.
                with gr.Tabs(elem_id="options"):
                    with gr.Tab("Examples", elem_id="examples-tab"):
                        examples = [  # public-domain / CC0 photos, see assets/README.md
                            ("astronaut.jpg", "a woman smiling and waving, floating in a space station"),
                            ("astronaut.jpg", "a woman giving a speech on a stage, spotlight"),
                            ("cameraman.jpg", "a man filming with a camera in a park, autumn leaves falling"),
                        ]
                        examples = [[str(ASSETS / name), [str(ASSETS / name)], text] for name, text in examples]
                        examples = [example for example in examples if os.path.exists(example[0])]
                        recipe = gr.File(
                            label="Or drop an MP4 made here: the settings it carries fill the form",
                            file_types=[".mp4"],
                            height=120,
                            elem_id="recipe",
                        )
                        thumbnail = gr.Image(label="Photo", type="filepath", visible=False)  # the first column
                        if examples:
                            gr.Examples(
                                examples=examples,
                                inputs=[thumbnail, files, prompt],
                                visible_columns=[0, 2],  # the photo's thumbnail and the prompt (the files too)
                                label="Click one, then Generate",
                                elem_id="examples",
                                cache_examples=False,  # examples only fill the inputs; nothing runs at start-up
                            )
                    with gr.Tab("Advanced", elem_id="advanced"):
                        negative = gr.Textbox(
                            label="Negative prompt (the release's default)",
                            value=DEFAULT_NEGATIVE_PROMPT,
                            lines=3,
                            max_lines=8,
                            max_length=settings.MAX_TEXT_CHARS,
                            elem_id="negative-prompt",
                        )
                        add_suffix = gr.Checkbox(label="Add the release's quality words to the prompts", value=True)
                        id_scale = slider(
                            settings.ID_SCALE,
                            defaults["id_scale"],
                            "ID scale (higher: more like the photo; lower: follows the prompt)",
                            elem_id="id-scale",
                        )
                        with gr.Row():
                            frames = slider(
                                settings.FRAMES, defaults["num_frames"], elem_id="frames", maximum=caps.max_frames
                            )
                            steps = slider(
                                settings.STEPS, defaults["num_inference_steps"], elem_id="steps", maximum=caps.max_steps
                            )
                        with gr.Row():
                            guidance = slider(settings.GUIDANCE, defaults["guidance_scale"], elem_id="guidance")
                            fps = slider(settings.FPS, defaults["fps"], elem_id="fps")
                        resolution = gr.Radio(
                            list(resolutions(engine)),
                            value=defaults["resolution"],
                            label="Resolution (height x width)",
                            elem_id="resolution",
                        )
                    with gr.Tab("Beyond the release", elem_id="more"):
                        with gr.Row():
                            fast = gr.Checkbox(
                                label=f"Fast mode (AnimateLCM, {settings.FAST_STEPS} steps)", elem_id="fast"
                            )
                            free_init = gr.Checkbox(
                                label="FreeInit (steadier motion, 3x the time)", elem_id="free-init"
                            )
                        lora_names = list(engine.loras())
                        loras = gr.Dropdown(
                            lora_names,
                            value=[],
                            multiselect=True,
                            label="Style LoRAs",
                            visible=bool(lora_names),
                            elem_id="loras",
                        )
                        lora_weight = slider(
                            settings.LORA_WEIGHT, 1.0, "LoRA weight", visible=bool(lora_names), elem_id="lora-weight"
                        )
                    with gr.Tab("Control", elem_id="control"):
                        control = gr.Dropdown(
                            CONTROL_CHOICES,
                            value="",
                            label="Control: sketch or image keyframes, pose, depth, edges",
                            elem_id="control-kind",
                        )
                        # Only the chosen kind's inputs show (control_visibility).
                        control_images = gr.File(
                            label="Keyframe images (sketch or image keyframes)",
                            file_count="multiple",
                            file_types=["image"],
                            visible=False,
                            elem_id="control-images",
                        )
                        control_frames = gr.Textbox(
                            "",
                            label="Their frames, in upload order (e.g. 0, 15; empty: spread over the video)",
                            visible=False,
                            elem_id="control-frames",
                        )
                        control_video = gr.File(  # gradio's "video" type leaves GIF out
                            label="Driving video (pose, depth or edges): MP4, WebM, MOV or GIF",
                            file_types=["video", ".gif"],
                            visible=False,
                            elem_id="control-video",
                        )
                        control_strength = slider(
                            settings.CONTROL_STRENGTH,
                            1.0,
                            "Control strength",
                            visible=False,
                            elem_id="control-strength",
                        )
                        control_heading = gr.Markdown("**What the control feeds the model**", visible=False)
                        control_preview = gr.Gallery(
                            show_label=False, columns=4, height="auto", visible=False, elem_id="control-preview"
                        )
                        control_notes = gr.Markdown(elem_id="control-notes")
                # The page's inputs, listed once, by name: Generate, the control preview and the time estimate
                # receive them as keyword arguments, and API clients call /generate with these names.
                page_inputs = dict(
                    faces=files,
                    prompt=prompt,
                    negative_prompt=negative,
                    add_prompt_suffix=add_suffix,
                    backbone=backbone,
                    custom_backbone=custom_backbone,
                    seed=seed,
                    randomize_seed=randomize,
                    id_scale=id_scale,
                    num_frames=frames,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    fps=fps,
                    resolution=resolution,
                    fast=fast,
                    free_init=free_init,
                    loras=loras,
                    lora_weight=lora_weight,
                    control=control,
                    control_images=control_images,
                    control_frames=control_frames,
                    control_video=control_video,
                    control_strength=control_strength,
                )
            with gr.Column(elem_id="results"):  # sticky (CSS): in view while the options are scrolled
                preview = gr.Image(
                    label="Preview while denoising",
                    height=120,
                    interactive=False,
                    buttons=[],
                    format="jpeg",
                    elem_id="preview",
                )
                live = gr.Video(
                    label="Streaming (plays while the rest is decoded)",
                    streaming=True,
                    autoplay=True,
                    height=300,
                    visible=STREAMING,
                    elem_id="live",
                )
                result = StudioVideo(label="Result (MP4)", height=300, buttons=["download"], elem_id="result")
                seed_used = gr.Markdown(elem_id="seed-used")
                gallery = gr.Gallery(
                    label="This session's videos",
                    columns=2,  # wide enough for the captions, on a phone too
                    height="auto",
                    object_fit="contain",
                    fit_columns=False,
                    elem_id="history",
                )
        table = gr.Dataframe(  # the page's full width
            headers=HISTORY_HEADERS,
            label="Settings of this session's videos (click a row to bring its settings back into the form)",
            interactive=False,
            wrap=True,
            column_widths=HISTORY_WIDTHS,
            elem_id="history-table",
        )
        saved_speed = gr.State(None)  # steps and guidance before fast mode was ticked

        # -- events ----------------------------------------------------------------------------
        demo.load(page_banner, None, banner, queue=False)
        demo.load(show_estimate, None, estimate, inputs_kwargs=page_inputs, queue=False, show_progress="hidden")
        files.change(show_faces, files, [crops, face_notes], api_name="faces", concurrency_limit=2)
        # Progress shows on the preview only, so an error is just its message (a toast): the last video and the seed
        # stay as they were, and the "Error" badge gradio leaves on the preview is cleared at once.
        event = run.click(
            generate,
            [history],
            [live, preview, result, seed_used, seed, history],
            inputs_kwargs=page_inputs,
            api_name="generate",
            show_progress_on=preview,
        )
        event.failure(lambda: gr.update(), None, preview, queue=False, show_progress="hidden", api_visibility="private")
        event.then(history_gallery, history, gallery, queue=False, show_progress="hidden").then(
            history_table, history, table, queue=False, show_progress="hidden"
        )
        stop.click(stopped, None, seed_used, cancels=[event], api_name="stop", queue=False)
        fast.input(  # the user's tick only (not a restored setting): a restored fast video keeps its own steps
            fast_defaults,
            [fast, steps, guidance, saved_speed],
            [steps, guidance, saved_speed],
            queue=False,
            api_visibility="private",
        )
        control.change(
            control_visibility,
            control,
            [control_images, control_frames, control_video, control_strength, control_heading, control_preview],
            queue=False,
            api_visibility="private",
        )
        recipe.upload(
            settings_from_video,
            recipe,
            [page_inputs[name] for name in RESTORED],
            queue=False,
            api_visibility="private",
        )
        table.select(
            restore_settings,
            history,
            [page_inputs[name] for name in RESTORED],
            queue=False,
            api_visibility="private",
        )
        for widget in (control, control_images, control_frames, control_video, frames, resolution):
            widget.change(
                show_control,
                None,
                [control_preview, control_notes],
                inputs_kwargs=page_inputs,
                api_visibility="private",
            )
        for widget in (frames, steps, guidance, resolution, fast, free_init):
            widget.change(
                show_estimate, None, estimate, inputs_kwargs=page_inputs, queue=False, api_visibility="private"
            )
        event.then(show_estimate, None, estimate, inputs_kwargs=page_inputs, queue=False, show_progress="hidden")
    demo.queue(default_concurrency_limit=1, max_size=caps.queue_size)
    calm_queue(demo)
    if caps.jobs_per_visitor:
        limit_jobs_per_visitor(demo, "generate", caps.jobs_per_visitor)
    return demo


# How often gradio's queue looks for new events and for progress to send, in seconds (its own: 0.001 and 0.01).
QUEUE_POLL_S, PROGRESS_POLL_S = 0.02, 0.1


def calm_queue(demo: gr.Blocks) -> None:
    """Make gradio's queue poll less often. It wakes every millisecond to look for new events, and every 10 ms
    for progress to send (gradio 6.31, pinned: queueing.Queue, no setting for either); each wake-up takes the
    GIL from the denoising thread, which on a busy CPU slows the video (benchmarks/RESULTS.md, serving
    overhead). A request now starts at most 20 ms later; progress is sent 10 times a second."""
    queue = demo._queue
    for name, seconds in (("sleep_when_free", QUEUE_POLL_S), ("progress_update_sleep_when_free", PROGRESS_POLL_S)):
        if not isinstance(getattr(queue, name, None), float):  # a gradio that no longer has it: leave it be
            log.warning("gradio's queue has no %s; its polling is left as it is", name)
            continue
        setattr(queue, name, seconds)


def visitor(request) -> str:
    """Who sent a request: the connection's address, or behind a proxy on a private address (a Space's), the
    address that proxy saw (the last X-Forwarded-For entry; earlier entries are whatever the client wrote)."""
    import ipaddress

    peer = request.client.host if request.client else ""
    forwarded = [part.strip() for part in request.headers.get("x-forwarded-for", "").split(",") if part.strip()]
    try:
        behind_proxy = ipaddress.ip_address(peer).is_private  # loopback included
    except ValueError:
        behind_proxy = False
    return forwarded[-1] if forwarded and behind_proxy else peer


def limit_jobs_per_visitor(demo: gr.Blocks, api_name: str, most: int) -> None:
    """Refuse to queue an event ``api_name`` for a visitor who already has ``most`` of them waiting or running,
    so one visitor cannot fill the queue for everyone. Gradio has no such setting: this wraps its queue's
    ``push`` (gradio 6.31, pinned; the queue's event lists are read, not changed)."""
    queue = demo._queue
    push = queue.push

    def theirs(event, who) -> bool:
        return event.fn.api_name == api_name and visitor(event.request) == who

    async def push_limited(body, request, username):
        fn = demo.fns.get(body.fn_index)
        if fn is not None and fn.api_name == api_name:
            who = visitor(request)
            waiting = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
            running = [e for job in queue.active_jobs if job for e in job]
            if sum(theirs(e, who) for e in waiting + running) >= most:
                log.info("refused a request: %s already has %d videos queued or running", who, most)
                return (
                    False,
                    html.escape(f"You already have {most} videos waiting or being made here; wait for one to finish."),
                    "error",
                )
        return await push(body, request, username)

    queue.push = push_limited


def main(args: argparse.Namespace | None = None) -> None:
    args = args or argument_parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("idanimator").setLevel(logging.INFO)  # ours; other libraries' INFO lines stay out
    quiet_loading_bars()  # the libraries' per-file loading bars (our own progress stays)
    device, offload = args.device, args.offload
    if ZERO_GPU:  # the GPU is attached per request; models live "on cuda" from the start, whole
        device = device or "cuda"
        offload = "none" if offload == "auto" else offload
    options = StudioOptions(
        device=device,
        offload=offload,
        tiny=args.tiny,
        allow_custom_backbones=args.allow_custom_backbones,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        max_outputs=args.max_outputs,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None,
        load_in_prepare=not ZERO_GPU,
        serving_limits=serving_limits(args),
    )
    try:
        engine = Studio(options)
    except IDAnimatorError as exc:
        raise SystemExit(f"error: {exc}") from None
    for line in startup_lines(engine):
        print(line)
    demo = build_demo(engine)
    if ZERO_GPU:
        engine.warm_up()  # in the main process before serving: workers are forked from it
    else:
        threading.Thread(target=engine.warm_up, daemon=True, name="idanimator-warm-up").start()
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(engine.outputs.root)],
        css=CSS,
        quiet=True,  # gradio's hints (e.g. "set share=True", which --share does) are not for our users
        prevent_thread_lock=True,
    )
    print(f"* Running on local URL:  {demo.local_url}")  # the public URL, with --share, gradio prints itself
    demo.block_thread()


if __name__ == "__main__":
    main(ARGS)
