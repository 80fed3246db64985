"""Shared fixtures: the tiny kit is built once per test session, in the real on-disk layouts."""

from __future__ import annotations

import os
import tempfile
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
# One CPU thread for torch here and in the app servers the tests start: the tiny models are bound by Python,
# not arithmetic, and on a shared 2-core machine two OpenMP threads stall each other (a tiny generation took
# 0.5 s on one thread and 3-14 s on two under load).
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_kit() -> dict[str, Path]:
    from idanimator.tiny import build_tiny_kit, default_tiny_dir

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
