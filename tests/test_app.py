"""The app over HTTP, as a client sees it: started with `python app.py --tiny`, driven by gradio_client."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client import Client, handle_file

from idanimator.video import read_video
from tests.conftest import generate_over_http, running_app


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_kit):
    with running_app(tmp_path_factory.mktemp("app")) as (url, proc):
        yield Client(url, verbose=False), proc


def generate(client, face, seed=3, frames=8):
    return generate_over_http(client, face, seed, frames)


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
    [(999, 3, "greater than maximum value 32"), (8, 2**40, "greater than maximum"), (-4, 3, "less than minimum")],
)
def test_out_of_range_values_sent_to_the_api_get_a_sentence(app, astronaut_path, frames, seed, message):
    """Gradio checks the components' ranges first; the library checks again for direct callers."""
    client, proc = app
    with pytest.raises(Exception, match=message):
        generate(client, astronaut_path, seed=seed, frames=frames)
    assert proc.poll() is None


def test_stop_ends_a_running_generation_and_the_server_answers_the_next_request(app, astronaut_path):
    import time

    client, proc = app
    args = [handle_file(str(astronaut_path)), "a person smiling", "", True, "tiny", "", 5, False, 0.8, 8, 100]
    job = client.submit([args[0]], *args[1:], 8.0, 8, "64x64 (tiny)", api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.status().progress_data and not job.done() and time.monotonic() < deadline:  # denoising
        time.sleep(0.1)
    client.predict(api_name="/stop")
    started = time.monotonic()
    outputs = job.result(timeout=60)
    assert outputs[3] == "Stopped." and time.monotonic() - started < 20
    assert proc.poll() is None
    assert read_video(generate(client, astronaut_path)[2]).shape[0] == 8
