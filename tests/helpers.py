"""Helpers the tests import: the app as a real server, and reading videos back (test-only readers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

from idanimator.errors import IDAnimatorError

# -- the app as a real server (for the HTTP and browser tests) ----------------------------------

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the app's process: end it when the test run ends, however it ends (Linux's PR_SET_PDEATHSIG), so a
    killed pytest never leaves a server holding a port and memory."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the context manager's cleanup still ends it


@contextmanager
def running_app(tmp_path: Path, *extra: str, timeout: float = 120):
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}  # app.log as it happens
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "app.py"),
            "--tiny",
            "--port",
            str(port),
            "--output-dir",
            str(tmp_path / "outputs"),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        preexec_fn=_die_with_parent,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited: {(tmp_path / 'app.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the app did not start") from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def generate_over_http(client, face, *, submit: bool = False, **values):
    """Call the app's /generate endpoint by parameter name, as an API client would, with tiny-mode settings
    unless ``values`` say otherwise (``submit``: return the job at once instead of its outputs)."""
    from gradio_client import handle_file

    values = {
        "faces": [handle_file(str(face))],
        "prompt": "a person smiling",
        "backbone": "tiny",
        "seed": 3,
        "randomize_seed": False,
        "num_frames": 8,
        "num_inference_steps": 2,
        "resolution": "64x64 (tiny)",
        **values,
    }
    if submit:
        return client.submit(**values, api_name="/generate")
    return client.predict(**values, api_name="/generate")


def moving_face_video(folder: Path, frames: int) -> Path:
    """A short MP4 of a moving real face (scikit-image's astronaut, public domain), e.g. to drive a ControlNet."""
    from skimage import data

    from idanimator.video import write_mp4

    image = data.astronaut()
    return write_mp4([image[8 * i : 8 * i + 320, 6 * i : 6 * i + 320] for i in range(frames)], folder / "drive.mp4")


# -- reading videos back (test-only readers) ----------------------------------------------------


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a video (MP4 or GIF) to a (frames, height, width, 3) uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise IDAnimatorError(f"The video file {path} does not exist.")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    except (OSError, RuntimeError, StopIteration, ValueError, IndexError) as exc:
        raise IDAnimatorError(f"The file {path} could not be read as a video.") from exc
    if not frames:
        raise IDAnimatorError(f"The video {path} has no frames.")
    return np.stack(frames)


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a video's first video stream as ffmpeg sees it.

    Returns ``codec``, ``pix_fmt`` (bare, e.g. "yuv420p"), ``color`` (what ffmpeg adds in parentheses, e.g.
    ("tv", "bt709", "progressive")), ``width``, ``height``, ``fps``, and ``frame_count`` and ``duration``
    (seconds) from decoding the whole stream.
    """
    path = Path(path)
    if not path.is_file():
        raise IDAnimatorError(f"The video file {path} does not exist.")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)  # imageio-ffmpeg's parse of the ``ffmpeg -i`` header
        frame_count, duration = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (OSError, RuntimeError, StopIteration, ValueError, IndexError) as exc:
        raise IDAnimatorError(f"The file {path} could not be read as a video.") from exc
    finally:
        reader.close()  # stops the decoding ffmpeg
    pix_fmt, _, color = meta["pix_fmt"].partition("(")
    width, height = meta["size"]
    return {
        "codec": meta["codec"].rstrip(","),  # imageio-ffmpeg reads "gif," from "Video: gif, bgra, ..."
        "pix_fmt": pix_fmt.strip(),
        "color": tuple(part.strip() for part in color.rstrip(")").split(",") if part.strip()),
        "width": width,
        "height": height,
        "fps": meta["fps"],
        "frame_count": frame_count,
        "duration": duration,
    }
