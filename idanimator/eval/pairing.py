"""Which reference photo and prompt belong to each video of an evaluation folder.

``videos/NAME.mp4`` pairs with ``faces/NAME.png|.jpg|.jpeg|.webp``; when there is no such photo and NAME has
``--`` in it (``generate``'s batch mode writes ``FACE--pNN--sSEED``, ConsisID's script ``FACE--INDEX``), the
longest prefix before a ``--`` that names a photo is used. The prompt is ``videos/NAME.txt``, else the entry
for NAME in ``videos/prompts.json`` (or the JSON file given), else none (the CLIPScore is then null).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import IDAnimatorError
from ..video import VIDEO_SUFFIXES

FACE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROMPTS_FILE = "prompts.json"
SEPARATOR = "--"


@dataclass
class EvalItem:
    name: str
    video: Path
    face: Path | None  # None: no reference photo was found (reported for this video)
    prompt: str | None


def _folder(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise IDAnimatorError(f"The {what} folder {path} does not exist.")
    if not path.is_dir():
        raise IDAnimatorError(f"The {what} folder {path} is a file, not a folder.")
    return path


def _hidden(path: Path) -> bool:
    """A dot file: a killed writer's ``.NAME.HEX.partial.mp4`` (files.atomic_path), macOS's ``._NAME.mp4``."""
    return path.name.startswith(".")


def _faces_by_stem(faces: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(faces.iterdir()):
        if path.is_file() and not _hidden(path) and path.suffix.lower() in FACE_SUFFIXES:
            found.setdefault(path.stem, path)  # NAME.png wins over NAME.jpg (sorted order), deterministically
    return found


def reference_for(name: str, faces: dict[str, Path]) -> Path | None:
    if name in faces:
        return faces[name]
    parts = name.split(SEPARATOR)
    for end in range(len(parts) - 1, 0, -1):
        stem = SEPARATOR.join(parts[:end])
        if stem in faces:
            return faces[stem]
    return None


def load_prompt_map(path: Path) -> dict[str, str]:
    """A JSON object mapping a video's name (with or without its suffix) to its prompt."""
    if Path(path).is_dir():
        raise IDAnimatorError(f"The prompts file {path} is a folder, not a file.")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IDAnimatorError(f"The prompts file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IDAnimatorError(f"The prompts file {path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise IDAnimatorError(f'The prompts file {path} must be a JSON object such as {{"NAME": "a prompt"}}.')
    return {Path(key).stem if Path(key).suffix.lower() in VIDEO_SUFFIXES else key: v for key, v in data.items()}


def _prompt_for(video: Path, prompts: dict[str, str]) -> str | None:
    text_file = video.with_suffix(".txt")
    if text_file.is_file():
        try:
            text = text_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if text:
            return text
    return prompts.get(video.stem)


def find_items(videos: Path, faces: Path, prompts_file: Path | None = None) -> list[EvalItem]:
    """Every video of ``videos`` (sorted by name) with its reference photo and prompt."""
    videos, faces = _folder(videos, "videos"), _folder(faces, "faces")
    if prompts_file is None and (videos / PROMPTS_FILE).is_file():
        prompts_file = videos / PROMPTS_FILE
    prompts = load_prompt_map(prompts_file) if prompts_file is not None else {}
    # Hidden files are skipped: a killed writer's .NAME.HEX.partial.mp4, macOS's ._NAME.mp4.
    files = sorted(p for p in videos.iterdir() if p.is_file() and not _hidden(p) and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        kinds = ", ".join(VIDEO_SUFFIXES)
        raise IDAnimatorError(f"The videos folder {videos} holds no video files ({kinds}).")
    photos = _faces_by_stem(faces)
    return [EvalItem(p.stem, p, reference_for(p.stem, photos), _prompt_for(p, prompts)) for p in files]
