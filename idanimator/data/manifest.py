"""The data set's manifest: the contract between ``build-dataset`` and the trainer.

``OUT/manifest.jsonl`` holds one JSON object per clip, sorted by ``clip_id``, with exactly these keys:

``clip_id`` (str, unique), ``video`` (the source video, relative to OUT: ``raw/a.mp4``, ``../videos/a.mp4``;
absolute only where no relative path exists, e.g. another drive; manifests written before kept absolute
paths, which still read),
``start_frame`` and ``end_frame`` (end exclusive; indices of decoded frames, see :mod:`.decode`), ``fps``
(float), ``width``, ``height``, ``identity`` (str or null), ``caption_attribute``, ``caption_action``,
``caption`` (the merged one), ``faces`` (PNG paths relative to OUT: 224x224 face crops aligned exactly as
at inference, i.e. ``face.crop_face(...).image``, the CLIP image encoder's input) and ``face_frames`` (the
frame each face was taken from, same order).

While building, each finished clip is also kept as ``OUT/clips/<clip_id>.json`` (the same object plus the
settings it was built with), and the manifest is rebuilt from those records; see :mod:`.build`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import IDAnimatorError
from ..files import atomic_path

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class ClipRecord:
    clip_id: str
    video: str
    start_frame: int
    end_frame: int
    fps: float
    width: int
    height: int
    identity: str | None
    caption_attribute: str
    caption_action: str
    caption: str
    faces: list[str]
    face_frames: list[int]
    root: Path | None = field(default=None, repr=False, compare=False)  # the data set's folder (not saved)

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    def resolve(self, path: str) -> Path:
        """A path from the manifest as a usable one: relative paths are relative to the data set's folder."""
        candidate = Path(path)
        if candidate.is_absolute() or self.root is None:
            return candidate
        return Path(os.path.normpath(self.root / candidate))  # '../videos/a.mp4' without the '..'

    @property
    def video_path(self) -> Path:
        return self.resolve(self.video)

    @property
    def face_paths(self) -> list[Path]:
        return [self.resolve(face) for face in self.faces]

    def as_dict(self) -> dict:
        """The manifest's object: every field but ``root``, in the documented order."""
        values = asdict(self)
        return {f.name: values[f.name] for f in fields(self) if f.name != "root"}

    @classmethod
    def from_dict(cls, data: dict, root: Path | None = None) -> ClipRecord:
        names = [f.name for f in fields(cls) if f.name != "root"]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        record = cls(**{name: data[name] for name in names}, root=root)
        record.start_frame, record.end_frame = int(record.start_frame), int(record.end_frame)
        record.width, record.height, record.fps = int(record.width), int(record.height), float(record.fps)
        record.faces = [str(face) for face in record.faces]
        record.face_frames = [int(frame) for frame in record.face_frames]
        if len(record.faces) != len(record.face_frames):
            raise ValueError("faces and face_frames differ in length")
        return record


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The manifest file of ``path`` (the file itself or the data set's folder); a missing one is one sentence."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise IDAnimatorError(f"There is no data set manifest at {path}; build one with `idanimator build-dataset`.")
    return path


def read_manifest(path: str | os.PathLike[str]) -> list[ClipRecord]:
    """The clips of a data set: give ``OUT/manifest.jsonl`` or the folder OUT itself.

    Each record's relative paths resolve against the manifest's folder (``record.video_path``,
    ``record.face_paths``). A missing or damaged manifest is an IDAnimatorError naming the line.
    """
    path = manifest_path(path)
    root = path.parent.resolve()
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(ClipRecord.from_dict(json.loads(line), root=root))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise IDAnimatorError(f"Line {number} of {path} is not a valid clip record ({exc}).") from exc
    return records


def manifest_text(records: list[ClipRecord]) -> str:
    lines = [json.dumps(record.as_dict(), ensure_ascii=False) for record in sorted(records, key=lambda r: r.clip_id)]
    return "".join(line + "\n" for line in lines)


def write_manifest(out: Path, records: list[ClipRecord]) -> Path:
    """Write ``out/manifest.jsonl`` atomically; an unchanged manifest is left untouched (same bytes, same time)."""
    path = out / MANIFEST_NAME
    text = manifest_text(records)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, data: dict) -> None:
    """A small JSON record, written atomically (a crash never leaves half of one)."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict | None:
    """A record written by :func:`write_json`, or None when it is missing or unreadable (then it is redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
