"""A served page as an anonymous visitor meets it: nothing of the operator's is deleted or exposed, and no
visitor can take the server for themselves (huge texts, the queue, oversized requests, crafted inputs)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import httpx
import pytest
from gradio_client import Client

from idanimator.errors import InvalidRequestError
from idanimator.outputs import FOLDER_NAME, OutputFolder
from idanimator.request import GenerationRequest
from idanimator.settings import MAX_TEXT_CHARS, ServingLimits

from .helpers import generate_over_http, moving_face_video, read_video, running_app
from .test_load import rss_mb

DAY = 24 * 3600


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture(scope="module")
def operator_dir(tmp_path_factory):
    """An operator's existing folder, named as --output-dir: their own old files must survive."""
    folder = tmp_path_factory.mktemp("operator")
    (folder / "notes.txt").write_text("mine")
    (folder / "renders").mkdir()
    (folder / "renders" / "take1.mp4").write_bytes(b"not ours")
    for entry in (folder / "notes.txt", folder / "renders"):
        age(entry, 3 * DAY)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, operator_dir, tiny_kit):
    """The app with tight caps: 2 jobs per visitor, 16 frames, 40 steps, and little work per request."""
    folder = tmp_path_factory.mktemp("served")
    caps = ["--max-jobs-per-visitor", "2", "--max-frames", "16", "--max-steps", "40", "--max-work", "0.03"]
    with running_app(folder, "--output-dir", str(operator_dir), *caps) as (url, proc):
        yield url, proc, folder


def test_pruning_keeps_the_operators_files_and_only_the_apps_folder_is_served(served, operator_dir, astronaut_path):
    url, proc, _ = served
    video = generate_over_http(Client(url, verbose=False), astronaut_path)[2]
    assert read_video(video).shape[0] == 8
    ours = operator_dir / FOLDER_NAME
    assert ours.is_dir() and any(ours.iterdir())  # the app writes into its own folder
    assert (operator_dir / "notes.txt").read_text() == "mine"  # 3 days old, next to the app's folder: kept
    assert (operator_dir / "renders" / "take1.mp4").is_file()
    for route in ("gradio_api/file=", "file="):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}{route}{operator_dir / 'notes.txt'}", timeout=10)
    assert proc.poll() is None


def test_pruning_removes_only_names_the_app_made(tmp_path):
    folder = OutputFolder(tmp_path, max_files=1, max_age_s=3600)
    made = folder.new_path(".mp4")
    made.write_bytes(b"x")
    kept = [tmp_path / "operator.mp4", tmp_path / "README"]
    for path in [made, *kept]:
        path.write_bytes(b"x")
        age(path, 2 * DAY)
    (tmp_path / "link").symlink_to(kept[0])
    folder.prune()
    assert not made.exists()
    assert all(path.exists() for path in kept) and (tmp_path / "link").is_symlink()


def test_a_huge_prompt_is_refused_at_once_without_growing_the_server(served, astronaut_path):
    url, proc, _ = served
    client = Client(url, verbose=False)
    before = rss_mb(proc.pid)
    started = time.monotonic()
    with pytest.raises(Exception, match="characters long; at most 4,000"):
        generate_over_http(client, astronaut_path, prompt="a person dancing " * 600_000)  # 10 MB
    assert time.monotonic() - started < 30  # tokenising it took 55 s before
    assert rss_mb(proc.pid) - before < 300
    assert proc.poll() is None


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_texts_over_the_limit_are_one_sentence_before_they_are_read(field):
    values = {"prompt": "a person", field: "x" * (MAX_TEXT_CHARS + 1)}
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_TEXT_CHARS:,}"):
        GenerationRequest(**values).validate()
    values[field] = "x" * MAX_TEXT_CHARS
    assert GenerationRequest(**values).validate()


def test_one_visitor_cannot_fill_the_queue_but_another_still_gets_in(served, astronaut_path):
    url, proc, _ = served
    client = Client(url, verbose=False)
    jobs = [
        generate_over_http(client, astronaut_path, num_frames=16, num_inference_steps=40, submit=True) for _ in range(2)
    ]
    time.sleep(1.0)  # both are in the queue (or running)
    with pytest.raises(httpx.HTTPStatusError) as refused:  # the page shows the detail as its message
        generate_over_http(client, astronaut_path)
    assert refused.value.response.status_code == 400
    assert refused.value.response.json()["detail"].startswith("You already have 2 videos waiting or being made")
    # Another visitor (as a Space's proxy names them) is served while the first one's jobs are still there.
    other = Client(url, verbose=False, headers={"X-Forwarded-For": "203.0.113.7"})
    assert read_video(generate_over_http(other, astronaut_path)[2]).shape[0] == 8
    for job in jobs:
        job.cancel()
    assert proc.poll() is None


def test_the_operators_caps_are_sentences_for_api_callers(served, astronaut_path):
    url, proc, _ = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="greater than maximum value 16"):  # the slider's range is the cap
        generate_over_http(client, astronaut_path, num_frames=17)
    with pytest.raises(Exception, match="greater than maximum value 40"):
        generate_over_http(client, astronaut_path, num_inference_steps=41)
    with pytest.raises(Exception, match="times the work of a default video"):
        generate_over_http(client, astronaut_path, num_frames=16, num_inference_steps=40, resolution="64x96 (tiny)")
    assert proc.poll() is None


def test_gradios_own_refusals_are_escaped_like_every_other_message(served, astronaut_path):
    url, _, folder = served
    with pytest.raises(Exception) as refused:
        generate_over_http(Client(url, verbose=False), astronaut_path, resolution="<img src=x onerror=alert(1)>")
    assert "<img" not in str(refused.value) and "&lt;img" in str(refused.value)
    assert "Traceback" not in (folder / "app.log").read_text()


def test_serving_limits_name_the_first_cap_exceeded():
    caps = ServingLimits(max_frames=16, max_steps=30, max_work=2)
    caps.check(16, 30, 2.0)
    for args, words in (((17, 30, 1), "at most 16 frames"), ((16, 31, 1), "at most 30 steps"), ((8, 8, 2.5), "2.5")):
        with pytest.raises(InvalidRequestError, match=words):
            caps.check(*args)


def test_bad_operator_limits_are_one_line(tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--max-frames", "500"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: --max-frames must be between 1 and 128 (got 500)."


@pytest.fixture(scope="module")
def crafted_videos(tmp_path_factory) -> dict:
    """What a hostile visitor sends as a driving video: a 50 KB file of 4096x4096 frames, one of 8192x8192,
    and a text file in ffmpeg's concat format that names itself."""
    import subprocess

    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("crafted")
    made = {name: folder / name for name in ("bomb.mp4", "huge.mp4", "loop.mp4")}
    for size, frames, name in (("4096x4096", 32, "bomb.mp4"), ("8192x8192", 1, "huge.mp4")):
        subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"color=black:s={size}"]
            + ["-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "51", str(made[name])],
            check=True,
        )
    made["loop.mp4"].write_text(f"ffconcat version 1.0\nfile '{made['loop.mp4']}'\n")
    return made


def driven_by(video) -> dict:
    """The page's control inputs: canny edges from ``video``."""
    from gradio_client import handle_file

    return {"control": "canny", "control_video": handle_file(str(video))}


def test_a_frame_size_bomb_as_driving_video_is_decoded_small_or_refused(
    served, crafted_videos, astronaut_path, tmp_path
):
    url, proc, _ = served
    client = Client(url, verbose=False)
    generate_over_http(client, astronaut_path, **driven_by(moving_face_video(tmp_path, 8)))
    before = rss_mb(proc.pid)  # after one run: the control model is loaded
    video = generate_over_http(client, astronaut_path, **driven_by(crafted_videos["bomb.mp4"]))[2]
    assert read_video(video).shape[0] == 8  # downscaled in the decoder to the video's 64x64
    assert rss_mb(proc.pid) - before < 200  # at full size, 32 frames of 4096x4096 took 2.3 GB
    with pytest.raises(Exception, match="8192x8192, more than the"):
        generate_over_http(client, astronaut_path, **driven_by(crafted_videos["huge.mp4"]))
    assert proc.poll() is None


def test_a_self_referencing_concat_file_is_not_followed(served, crafted_videos, astronaut_path):
    url, proc, folder = served
    client = Client(url, verbose=False)
    started = time.monotonic()
    with pytest.raises(Exception, match="is not a video file that can be read here"):
        generate_over_http(client, astronaut_path, **driven_by(crafted_videos["loop.mp4"]))
    assert time.monotonic() - started < 30
    assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 200  # it once ran out of file handles
    assert proc.poll() is None
