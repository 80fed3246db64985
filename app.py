"""idanimator's Gradio page: a face photo and a prompt in, an identity-preserving video out.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--device cuda] [--offload auto] [--tiny]

Only widgets and events live here; the work is in `idanimator.studio`. Runs unchanged as a Hugging
Face Space (the GPU function is wrapped with `spaces.GPU`, a pass-through elsewhere).
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading

import gradio as gr
import spaces

from idanimator.errors import IDAnimatorError
from idanimator.pipeline import GenerationCancelled
from idanimator.preview import tile_images
from idanimator.prompts import DEFAULT_NEGATIVE_PROMPT
from idanimator.studio import Finished, Progress, Request, Segment, Studio, StudioOptions

MAX_UPLOAD = "20mb"
QUEUE_MAX_SIZE = 16
STREAMING = bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))  # gradio's stream muxer needs both

_studio: Studio | None = None
_stops: dict[str, threading.Event] = {}


def studio() -> Studio:
    global _studio
    if _studio is None:
        _studio = Studio(StudioOptions(tiny=bool(os.environ.get("IDANIMATOR_TINY"))))
    return _studio


def _paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]


# -- handlers (plain functions) ------------------------------------------------------------------


def show_faces(files):
    """After upload: the aligned crops the model will see, and what we noticed about the photos."""
    if not files:
        return None, ""
    try:
        crops, notes = studio().prepare_faces(_paths(files))
    except IDAnimatorError as exc:
        raise gr.Error(str(exc)) from None
    return tile_images([crop.image for crop in crops], 150), "\n".join(f"- {n}" for n in notes)


@spaces.GPU(duration=180)
def generate(
    files,
    prompt,
    negative_prompt,
    add_suffix,
    backbone,
    custom_backbone,
    seed,
    randomize,
    id_scale,
    frames,
    steps,
    guidance,
    fps,
    resolution,
    history,
    request: gr.Request,
    progress=gr.Progress(),
):
    """Stream progress, previews and video chunks; end with the full MP4, the seed used and the history."""
    stop = threading.Event()
    session = getattr(request, "session_hash", None) or "local"
    _stops[session] = stop
    job = Request(
        faces=_paths(files),
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        add_prompt_suffix=add_suffix,
        backbone=backbone,
        custom_backbone=custom_backbone or "",
        seed=seed,
        randomize_seed=randomize,
        id_scale=id_scale,
        num_frames=frames,
        steps=steps,
        guidance_scale=guidance,
        fps=fps,
        resolution=resolution,
    )
    history = list(history or [])
    try:
        for event in studio().run(job, stop=stop, stream=STREAMING):
            if isinstance(event, Progress):
                progress((event.step, event.total), desc="denoising", unit="steps")
                yield gr.update(), event.preview or gr.update(), gr.update(), gr.update(), gr.update(), history
            elif isinstance(event, Segment):
                progress(1.0, desc="decoding")
                yield str(event.path), gr.update(), gr.update(), gr.update(), gr.update(), history
            elif isinstance(event, Finished):
                for warning in event.warnings:
                    gr.Warning(warning)
                history = [*history, {"video": str(event.video), **event.settings}]
                used = f"Seed used: **{event.seed}** ({event.seconds:.1f} s)"
                yield gr.update(), gr.update(), str(event.video), used, event.seed, history
    except GenerationCancelled:
        gr.Info("Stopped.")
        yield gr.update(), gr.update(), gr.update(), "Stopped.", gr.update(), history
    except IDAnimatorError as exc:
        raise gr.Error(str(exc)) from None
    finally:
        _stops.pop(session, None)


def stop_generation(request: gr.Request):
    event = _stops.get(getattr(request, "session_hash", None) or "local")
    if event is not None:
        event.set()


def history_gallery(history):
    return [(item["video"], f"seed {item['seed']} · {item['prompt'][:60]}") for item in (history or [])]


def history_table(history):
    keys = ["seed", "prompt", "backbone", "num_frames", "steps", "guidance_scale", "id_scale", "height", "width"]
    return [[item.get(k) for k in keys] for item in reversed(history or [])]


# -- the page ------------------------------------------------------------------------------------


def build_demo(engine: Studio | None = None) -> gr.Blocks:
    global _studio
    if engine is not None:
        _studio = engine
    engine = studio()
    defaults = engine.defaults()
    # Gradio keeps its own copies of served files: drop them after an hour, checked hourly.
    with gr.Blocks(title="idanimator", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# idanimator\nOne face photo and a prompt: a short video of that person (ID-Animator).")
        if engine.banner():
            gr.Markdown(engine.banner(), elem_id="banner")
        with gr.Row():
            with gr.Column():
                files = gr.File(
                    label="Face photo(s) — several photos are mixed into one identity",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="faces",
                )
                crops = gr.Image(
                    label="What the model sees (aligned faces)", height=150, interactive=False, elem_id="crops"
                )
                face_notes = gr.Markdown()
                prompt = gr.Textbox(
                    label="Prompt", placeholder="a man playing guitar on a beach at sunset", elem_id="prompt"
                )
                negative = gr.Textbox(label="Negative prompt", value=DEFAULT_NEGATIVE_PROMPT, lines=2)
                add_suffix = gr.Checkbox(label="Add the release's quality words to the prompts", value=True)
                backbone = gr.Dropdown(
                    engine.backbone_choices(), value=defaults["backbone"], label="Backbone", elem_id="backbone"
                )
                custom_backbone = gr.Textbox(
                    label="Local backbone file/folder or Hub id (operator option)",
                    visible=engine.options.allow_custom_backbones,
                )
                with gr.Row():
                    seed = gr.Number(label="Seed", value=985, precision=0, minimum=0, maximum=2**32 - 1, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=False, elem_id="randomize")
                with gr.Accordion("Advanced", open=False):
                    id_scale = gr.Slider(
                        0,
                        1.5,
                        value=defaults["id_scale"],
                        step=0.05,
                        label="ID scale (higher: more like the photo; lower: follows the prompt)",
                    )
                    frames = gr.Slider(8, 32, value=defaults["num_frames"], step=1, label="Frames")
                    steps = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Steps")
                    guidance = gr.Slider(1, 15, value=defaults["guidance_scale"], step=0.5, label="Guidance scale")
                    fps = gr.Slider(1, 30, value=defaults["fps"], step=1, label="Frames per second")
                    resolution = gr.Radio(
                        list(engine.resolutions()), value=defaults["resolution"], label="Resolution (height x width)"
                    )
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column():
                preview = gr.Image(label="Preview while denoising", height=140, interactive=False)
                live = gr.Video(label="Streaming", streaming=True, autoplay=True, visible=STREAMING, elem_id="live")
                result = gr.Video(label="Result", elem_id="result", buttons=["download"])
                seed_used = gr.Markdown(elem_id="seed-used")
                gallery = gr.Gallery(label="This session's videos", columns=3, height=200)
                table = gr.Dataframe(
                    headers=[
                        "seed",
                        "prompt",
                        "backbone",
                        "frames",
                        "steps",
                        "guidance",
                        "ID scale",
                        "height",
                        "width",
                    ],
                    label="Settings of earlier videos",
                    interactive=False,
                )
        history = gr.State([])
        last_seed = gr.Number(visible=False)

        examples_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
        astronaut = os.path.join(examples_dir, "astronaut.jpg")
        if os.path.exists(astronaut):
            gr.Examples(
                examples=[
                    [[astronaut], "an astronaut smiling and waving, floating in a space station"],
                    [[astronaut], "a man in a suit giving a speech on a stage"],
                ],
                inputs=[files, prompt],
                cache_examples=False,  # examples only fill the inputs; nothing runs at start-up
            )

        files.change(show_faces, files, [crops, face_notes], api_name="faces")
        event = run.click(
            generate,
            [
                files,
                prompt,
                negative,
                add_suffix,
                backbone,
                custom_backbone,
                seed,
                randomize,
                id_scale,
                frames,
                steps,
                guidance,
                fps,
                resolution,
                history,
            ],
            [live, preview, result, seed_used, last_seed, history],
            api_name="generate",
        )
        event.then(history_gallery, history, gallery).then(history_table, history, table)
        stop.click(stop_generation, None, None, api_name="stop", queue=False)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="idanimator web app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--offload", choices=["auto", "none", "model", "sequential"], default="auto")
    parser.add_argument("--tiny", action="store_true", help="random tiny weights (no download)")
    parser.add_argument(
        "--allow-custom-backbones",
        action="store_true",
        help="let users load local files/folders and any Hub id (operators only)",
    )
    parser.add_argument("--output-dir", default=None, help="where videos are written (default: a temp folder)")
    parser.add_argument("--max-outputs", type=int, default=200, help="files kept in the output folder")
    args = parser.parse_args(argv)
    options = StudioOptions(
        device=args.device,
        offload=args.offload,
        tiny=args.tiny,
        allow_custom_backbones=args.allow_custom_backbones,
        output_dir=args.output_dir,
        max_outputs=args.max_outputs,
    )
    try:
        engine = Studio(options)
    except IDAnimatorError as exc:
        raise SystemExit(f"error: {exc}") from None
    if engine.tiny:
        print(f"Starting in tiny mode (random weights): {engine.tiny_reason}")
    demo = build_demo(engine)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(engine.outputs.root)],
    )


if __name__ == "__main__":
    main()
