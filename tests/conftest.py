"""Shared fixtures: the tiny kit is built once per test session, in the real on-disk layouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Everything the tests (and the subprocesses they start) cache goes into one throwaway folder, and the
# Hugging Face Hub is never contacted.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="idanimator-tests-"))
os.environ["IDANIMATOR_CACHE"] = str(_SESSION_DIR / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_SESSION_DIR / "hf-cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_kit() -> dict[str, Path]:
    from idanimator.testing import build_tiny_kit, default_tiny_dir

    return build_tiny_kit(default_tiny_dir())


@pytest.fixture(scope="session")
def detector():
    from idanimator.face import RetinaFaceDetector

    return RetinaFaceDetector()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_kit, detector):
    from idanimator.pipeline import IDAnimatorPipeline

    return IDAnimatorPipeline.from_pretrained(tiny=True, device="cpu", detector=detector)


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def astronaut_path(tmp_path_factory, astronaut) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    astronaut.save(path)
    return path


@pytest.fixture(scope="session")
def second_face(tmp_path_factory) -> Path:
    """Another real face: the astronaut photo mirrored and recoloured (a different CLIP input)."""
    from skimage import data

    image = np.ascontiguousarray(data.astronaut()[:, ::-1, ::-1])
    path = tmp_path_factory.mktemp("photos") / "second.png"
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="session")
def no_face_path(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return path


# -- the app as a real server (for the HTTP and browser tests) ----------------------------------

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(tmp_path: Path, *extra: str, timeout: float = 120):
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
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


def generate_over_http(client, face, seed: int = 3, frames: int = 8):
    """Call the app's /generate endpoint the way a client would, with tiny-mode settings."""
    from gradio_client import handle_file

    return client.predict(
        [handle_file(str(face))],
        "a person smiling",
        "",
        True,
        "tiny",
        "",
        seed,
        False,
        0.8,
        frames,
        2,
        8.0,
        8,
        "64x64 (tiny)",
        api_name="/generate",
    )
