"""The app: its wording and widgets in-process, then over HTTP as a client sees it (`python app.py --tiny`
driven by gradio_client)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from gradio_client import Client, handle_file

from idanimator import settings
from idanimator.studio import Studio, StudioOptions
from tests.helpers import ROOT, generate_over_http, read_video, running_app


@pytest.fixture(scope="module")
def tiny_studio(tiny_kit, detector, tmp_path_factory):
    return Studio(StudioOptions(tiny=True, device="cpu", output_dir=tmp_path_factory.mktemp("out")), detector=detector)


def test_tiny_mode_banner_says_why_and_how_to_get_real_weights(tiny_studio):
    import app as page

    text = page.banner_text(tiny_studio)
    assert "random" in text and "python -m idanimator download" in text
    assert page.backbone_choices(tiny_studio)[0] == ("Tiny random model (folder)", "tiny")
    assert page.starting_values(tiny_studio)["num_frames"] == settings.TINY_DEFAULTS["num_frames"]


def test_help_answers_at_once_without_loading_gradio_or_torch():
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "app.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0 and "--tiny" in run.stdout and "--share" in run.stdout
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert not {"gradio", "spaces", "torch", "diffusers", "transformers"} & imported
    light = {"idanimator.settings", "idanimator.errors", "idanimator.prompts"}  # the limits (numpy only)
    assert light >= {m for m in imported if m.startswith("idanimator.")}
    said = run.stdout + "".join(line for line in run.stderr.splitlines() if not line.startswith("import time:"))
    assert "warn" not in said.lower()
    assert elapsed < 10


def test_tiny_mode_start_up_line_is_short_and_says_how_to_get_the_weights(tiny_studio, monkeypatch):
    """Started in tiny mode because the weights cannot be had: one line, no "use --tiny" (it is in tiny mode)."""
    import app as page
    import idanimator.weights

    monkeypatch.setattr(idanimator.weights, "hub_reachable", lambda: False)  # and HF_HUB_OFFLINE, empty cache
    reason, _ = idanimator.weights.real_weights_status()
    assert reason and "--tiny" in reason  # the library's sentence says what a CLI user can do
    monkeypatch.setattr(tiny_studio, "tiny_reason", reason)
    first = page.startup_lines(tiny_studio)[0]
    assert first.startswith("Tiny mode") and "not in the local Hugging Face cache" in first
    assert "--tiny" not in first and "python -m idanimator download" in first and len(first) < 250
    monkeypatch.setattr(tiny_studio, "tiny_reason", "forced with --tiny.")
    assert "forced with --tiny" in page.startup_lines(tiny_studio)[0]


def test_messages_close_on_their_own_within_seconds():
    """Gradio stacks the toasts of one kind and closes them this long after the first: repeats cannot pile up."""
    import app as page

    assert page._error("No face was found.").duration == page.MESSAGE_SECONDS <= 8


def test_real_mode_offers_the_registry_and_the_release_defaults(monkeypatch, tmp_path):
    import app as page
    import idanimator.weights

    monkeypatch.setattr(idanimator.weights, "hub_reachable", lambda: True)  # nothing is fetched here
    engine = Studio(StudioOptions(device="cpu", output_dir=tmp_path))
    text = page.banner_text(engine)
    assert "Downloading" in text and "CPU" in text
    assert ("Realistic Vision V6.0 B1 (release default)", "realistic-vision-v6") in page.backbone_choices(engine)
    values = page.starting_values(engine)
    assert (values["num_frames"], values["num_inference_steps"], values["resolution"]) == (16, 30, "512x512")


def test_the_pages_sliders_are_the_settings_limits(tiny_studio):
    import app as page

    demo = page.build_demo(tiny_studio)
    sliders = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id, limit in [
        ("frames", settings.FRAMES),
        ("steps", settings.STEPS),
        ("guidance", settings.GUIDANCE),
        ("id-scale", settings.ID_SCALE),
        ("fps", settings.FPS),
    ]:
        widget = sliders[elem_id]
        assert (widget.minimum, widget.maximum, widget.step) == (limit.low, limit.high, limit.step), elem_id
    assert (sliders["seed"].minimum, sliders["seed"].maximum) == (0, settings.MAX_SEED)


def test_the_page_layout_generate_under_the_prompt_options_in_tabs(tiny_studio):
    import gradio as gr

    import app as page
    from idanimator.prompts import DEFAULT_NEGATIVE_PROMPT

    demo = page.build_demo(tiny_studio)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    negative = by_id["negative-prompt"]
    assert negative.value == DEFAULT_NEGATIVE_PROMPT
    assert by_id["advanced"] in ancestors(negative) and isinstance(by_id["advanced"], gr.Tab)
    examples = by_id["examples"]  # the examples' table: a thumbnail of the photo, and the prompt
    assert [c["name"] for c in examples.get_config()["components"]] == ["image", "textbox"]
    assert by_id["examples-tab"] in ancestors(examples)
    # In the inputs' column, Generate's row comes right after the prompt; the results are the other column.
    column = by_id["inputs"]

    def place(block) -> int:  # where, among the column's children, the block sits
        return next(i for i, child in enumerate(column.children) if child in {block, *ancestors(block)})

    assert place(by_id["generate"]) == place(by_id["prompt"]) + 1
    assert by_id["results"] in ancestors(by_id["result"]) and by_id["results"] not in ancestors(by_id["prompt"])


def ancestors(block) -> list:
    found = []
    while block.parent is not None:
        block = block.parent
        found.append(block)
    return found


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app(app_dir, tiny_kit):
    with running_app(app_dir, "--max-frames", "128", "--max-steps", "100") as (url, proc):  # the library's ranges
        yield Client(url, verbose=False), proc


def generate(client, face, seed=3, frames=8):
    return generate_over_http(client, face, seed=seed, num_frames=frames)


def test_upload_and_generate_gives_an_mp4_with_the_requested_frames(app, astronaut_path):
    client, _ = app
    outputs = generate(client, astronaut_path, frames=10)
    video, seed_text, seed = outputs[2], outputs[3], outputs[4]
    assert read_video(video).shape == (10, 64, 64, 3)
    assert "Seed used: **3**" in seed_text and seed == 3


def test_same_seed_twice_gives_the_same_frames(app, astronaut_path):
    client, _ = app
    first = read_video(generate(client, astronaut_path, seed=21)[2])
    second = read_video(generate(client, astronaut_path, seed=21)[2])
    assert np.array_equal(first, second)


def test_no_face_gives_the_message_and_the_server_answers_the_next_request(app, no_face_path, astronaut_path):
    client, proc = app
    with pytest.raises(Exception, match="No face was found"):
        generate(client, no_face_path)
    assert proc.poll() is None
    assert read_video(generate(client, astronaut_path)[2]).shape[0] == 8


def test_faces_endpoint_shows_the_aligned_crop(app, astronaut_path):
    client, _ = app
    from PIL import Image

    strip, notes = client.predict([handle_file(str(astronaut_path))], api_name="/faces")
    assert Image.open(strip).size == (150, 150)  # one aligned face, square


@pytest.mark.parametrize(
    "frames, seed, message",
    [(999, 3, "greater than maximum value 128"), (8, 2**40, "greater than maximum"), (-4, 3, "less than minimum")],
)
def test_out_of_range_values_sent_to_the_api_get_a_sentence(app, astronaut_path, frames, seed, message):
    """Gradio checks the components' ranges first; the library checks again for direct callers."""
    client, proc = app
    with pytest.raises(Exception, match=message):
        generate(client, astronaut_path, seed=seed, frames=frames)
    assert proc.poll() is None


def test_the_console_shows_our_lines_not_tracebacks_or_gradio_hints(app, app_dir, astronaut_path):
    """Values the page's widgets refuse, sent over the API, are one log line each; gradio's share hint is not
    shown (--share exists), nor its HTTP client's INFO lines."""
    client, _ = app
    generate(client, astronaut_path)  # a run first: gradio then holds this session's own copies of the widgets
    with pytest.raises(Exception, match="greater than maximum value 128"):
        generate(client, astronaut_path, frames=999)
    with pytest.raises(Exception, match="greater than maximum value 4294967295"):
        generate(client, astronaut_path, seed=2**40)
    with pytest.raises(Exception, match="no-such-backbone"):
        generate_over_http(client, astronaut_path, backbone="no-such-backbone")
    log = (app_dir / "app.log").read_text()
    assert "Traceback" not in log
    assert "INFO idanimator.app: refused a request: Value 999 is greater than maximum value 128.\n" in log
    assert log.count("refused a request: ") >= 3
    assert "share=True" not in log and "httpx" not in log
    assert "Tiny mode (random weights): forced with --tiny." in log
    assert "* Running on local URL:  http://127.0.0.1:" in log


def test_stop_ends_a_running_generation_and_the_server_answers_the_next_request(app, astronaut_path):
    import time

    client, proc = app
    # 32 frames x 100 steps: about a minute of work left to do if Stop did not end it.
    job = generate_over_http(
        client, astronaut_path, seed=5, num_frames=32, num_inference_steps=100, resolution="64x96 (tiny)", submit=True
    )
    deadline = time.monotonic() + 60
    while not job.status().progress_data and not job.done() and time.monotonic() < deadline:  # denoising
        time.sleep(0.1)
    assert not job.done()
    started = time.monotonic()
    job.cancel()  # what the page's Stop button does (gradio's cancellation of the running event)
    while not job.done() and time.monotonic() - started < 30:
        time.sleep(0.1)
    assert job.done() and job.status().code.name == "CANCELLED"
    assert time.monotonic() - started < 10  # closed at a yield (at least one every YIELD_EVERY_S while denoising)
    assert proc.poll() is None
    # The queue is free again at once (the 100-step run was not left going): the next request is quick.
    assert read_video(generate(client, astronaut_path)[2]).shape[0] == 8
    assert time.monotonic() - started < 30


def test_generate_is_called_by_parameter_name_over_the_api(app):
    """The API's /generate takes the page's inputs by name (README "The app"), the session's history not."""
    client, _ = app
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    assert names[:4] == ["faces", "prompt", "negative_prompt", "add_prompt_suffix"]
    assert {"num_frames", "num_inference_steps", "seed", "randomize_seed", "resolution", "control_video"} <= set(names)
    assert "history" not in names


def test_unticking_fast_mode_gives_back_the_users_steps_and_guidance():
    import app as page

    steps, guidance, saved = page.fast_defaults(True, 4, 7.5, None)
    assert (steps["value"], guidance["value"], saved) == (6, 1.5, (4, 7.5))
    steps, guidance, saved = page.fast_defaults(False, 6, 1.5, saved)
    assert (steps["value"], guidance["value"], saved) == (4, 7.5, None)


@pytest.mark.parametrize(
    "kind, shown",
    [
        ("", []),
        ("sparse-sketch", ["images", "frames", "strength", "heading", "preview"]),
        ("canny", ["video", "strength", "heading", "preview"]),
    ],
)
def test_the_control_panel_shows_only_the_chosen_kinds_inputs(kind, shown):
    import app as page

    names = ["images", "frames", "video", "strength", "heading", "preview"]
    updates = page.control_visibility(kind)
    assert [name for name, update in zip(names, updates, strict=True) if update["visible"]] == shown


def test_a_history_row_brings_every_setting_back_into_the_form(tiny_studio):
    import gradio as gr

    import app as page
    from idanimator.request import ControlSpec, GenerationRequest, LoraSpec

    page.build_demo(tiny_studio)
    made = GenerationRequest(
        prompt="a man surfing",
        seed=9,
        num_frames=12,
        num_inference_steps=5,
        height=96,
        width=64,
        fast=True,
        free_init=True,
        loras=(LoraSpec("/kit/loras/tiny-style.safetensors", 0.7),),
        control=ControlSpec("canny", video="drive.mp4", strength=0.5),
    ).settings()
    history = [{"video": "a.mp4", **made}, {"video": "b.mp4", **GenerationRequest(prompt="other").settings()}]
    prompt, words = page.history_table(history)[1]  # newest first; two columns, so that a phone shows it all
    assert prompt == "a man surfing"
    assert words == (
        "seed 9, 12 frames, 5 steps, guidance 8, ID scale 0.8, 96x64; fast, FreeInit, LoRA tiny-style 0.7, canny 0.5"
    )
    assert page.history_table(history)[0][1].endswith(", 512x512")  # no options beyond the release: nothing more
    event = gr.SelectData(None, {"index": [1, 0], "value": 9, "selected": True})
    restored = dict(zip(page.RESTORED, page.restore_settings(history, event), strict=True))
    assert restored["prompt"]["value"] == "a man surfing" and restored["seed"]["value"] == 9
    assert restored["randomize_seed"]["value"] is False and restored["resolution"]["value"] == "64x96 (tiny)"
    assert restored["fast"]["value"] is True and restored["free_init"]["value"] is True
    assert restored["loras"]["value"] == ["tiny-style"] and restored["control"]["value"] == "canny"


def test_an_mp4_made_here_dropped_on_the_page_fills_the_form(tiny_studio, tmp_path):
    import numpy as np

    import app as page
    from idanimator.request import GenerationRequest
    from idanimator.video import write_mp4

    page.build_demo(tiny_studio)
    made = GenerationRequest(prompt="a chef cooking", seed=21, num_frames=8, height=64, width=64, free_init=True)
    frames = np.zeros((8, 64, 64, 3), dtype=np.float32)
    video = write_mp4(frames, tmp_path / "made.mp4", fps=8, settings=made.settings())
    restored = dict(zip(page.RESTORED, page.settings_from_video(str(video)), strict=True))
    assert restored["prompt"]["value"] == "a chef cooking" and restored["seed"]["value"] == 21
    assert restored["free_init"]["value"] is True and restored["resolution"]["value"] == "64x64 (tiny)"
    plain = write_mp4(frames, tmp_path / "plain.mp4", fps=8)
    with pytest.raises(page.gr.Error, match="carries no generation settings"):
        page.settings_from_video(str(plain))


def test_generate_yields_at_every_preview_and_at_least_every_quarter_second_not_every_step(tiny_studio, astronaut_path):
    """Each yield is a round of gradio's output processing (serving overhead), but Stop closes `generate` only at
    a yield: so a yield at each preview and at least every YIELD_EVERY_S, with the progress line at every step."""
    import app as page
    from idanimator.studio import PREVIEWS

    page.build_demo(tiny_studio)
    steps, marks = 24, []
    values = dict(faces=[str(astronaut_path)], prompt="a person", backbone="tiny", seed=1, randomize_seed=False)
    values.update(num_frames=8, num_inference_steps=steps, resolution="64x64 (tiny)")

    def progress(value, desc=None, unit=None):  # gradio's progress line: every step
        marks.append(("step", time.monotonic(), value))

    for outputs in page.generate([], None, progress=progress, **values):
        marks.append(("yield", time.monotonic(), outputs))
    stepped = [m for m in marks if m[0] == "step" and isinstance(m[2], tuple)]
    assert [m[2] for m in stepped] == [(i, steps) for i in range(1, steps + 1)]
    denoising = [m for m in marks[: marks.index(stepped[-1]) + 2] if m[0] == "yield"]
    previews = [m for m in denoising if m[2][1] != page.gr.update()]
    assert len(previews) == PREVIEWS  # every preview reaches the page (the last step's included)
    spent = stepped[-1][1] - stepped[0][1]  # not one yield a step (steps here are quicker than YIELD_EVERY_S)
    assert len(denoising) <= PREVIEWS + 1 + spent / page.YIELD_EVERY_S
    longest_step = max(b[1] - a[1] for a, b in zip(stepped, stepped[1:], strict=False))
    times = [stepped[0][1]] + [m[1] for m in denoising]
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= page.YIELD_EVERY_S + 2 * longest_step
    assert marks[-1][2][2].endswith(".mp4")  # and the video at the end


def test_the_result_video_made_here_is_shown_without_probing_it(tiny_studio, monkeypatch):
    """gradio's Video runs ffprobe on each video it shows; the studio's own MP4s (H.264) skip it, others do not."""
    import numpy as np
    from gradio import processing_utils

    import app as page
    from idanimator.video import write_mp4

    page.build_demo(tiny_studio)
    probed = []
    monkeypatch.setattr(processing_utils, "video_is_playable", lambda path: probed.append(path) or True)
    frames = np.zeros((8, 64, 64, 3), dtype=np.float32)
    made = write_mp4(frames, tiny_studio.outputs.new_path(".mp4"), fps=8)
    video = page.StudioVideo()
    assert video.get_block_name() == "video"  # drawn by gr.Video's frontend
    shown = video.postprocess(str(made))
    assert (shown.path, probed) == (str(made), [])
    other = write_mp4(frames, tiny_studio.outputs.root / "not-named-here.mp4", fps=8)  # not a name the studio made
    assert video.postprocess(str(other)).path == str(other) and probed == [str(other)]
    assert video.postprocess(None) is None


def test_the_queue_polls_calmly(tiny_studio):
    """gradio's queue wakes every 1 ms (new events) and 10 ms (progress) by default; the page makes it 20 and 100."""
    import app as page

    demo = page.build_demo(tiny_studio)
    assert demo._queue.sleep_when_free == page.QUEUE_POLL_S == 0.02
    assert demo._queue.progress_update_sleep_when_free == page.PROGRESS_POLL_S == 0.1
