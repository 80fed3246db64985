"""Per-video labels (appearance, action, emotion, identity) read from a JSON or CSV file.

Three layouts are understood, so CelebV-HQ's own file works as downloaded:

* CelebV-HQ's ``celebvhq_info.json``, as its README documents it: ``{"meta_info": {"appearance_mapping":
  ["Blurry", "Male", "Young", ...], "action_mapping": ["blow", "chew", "close_eyes", ...]}, "clips": {NAME:
  {"ytb_id": ..., "duration": {...}, "bbox": {...}, "attributes": {"appearance": [0, 1, ...], "action":
  [0, 0, ...], "emotion": {"sep_flag": false, "labels": "neutral"}}, "version": "v0.1"}}}``, the 0/1 vectors
  in the mappings' order, and with ``"sep_flag": true`` ``"labels"`` a list of ``{"emotion", "start_sec",
  "end_sec"}`` (every emotion of the clip is kept). Names are matched whatever their case (``Male``), and
  ``Male`` being 0 makes the person a woman (the label is binary). The early README's ``mete_info`` spelling
  is read too;
* plain JSON: ``{NAME: {"appearance": [...], "action": [...], "emotion": [...] | "...", "identity": "..."}}``;
* CSV with a header: a ``name`` (or ``video``) column and any of ``appearance``, ``action``, ``emotion``,
  ``identity``; lists are separated by ``;`` or ``|``.

NAME is a video's file name without its suffix (CelebV-HQ names its clips ``<youtube id>_<n>.mp4``); a
relative path without suffix (``sub/clip``) or with it also matches.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import IDAnimatorError


@dataclass(frozen=True)
class VideoLabels:
    appearance: tuple[str, ...] = ()
    action: tuple[str, ...] = ()
    emotion: tuple[str, ...] = ()
    identity: str | None = None

    def as_dict(self) -> dict:
        return {"appearance": list(self.appearance), "action": list(self.action), "emotion": list(self.emotion)} | (
            {"identity": self.identity} if self.identity else {}
        )


def read_labels(path: str | os.PathLike[str] | None) -> dict[str, VideoLabels]:
    """The labels in a JSON or CSV file, by video name; ``None`` gives no labels. A bad file is one sentence."""
    if path is None:
        return {}
    path = Path(path).expanduser()
    if not path.is_file():
        raise IDAnimatorError(f"The labels file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
        labels = _from_csv(text) if path.suffix.lower() == ".csv" else _from_json(json.loads(text))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError, TypeError, AttributeError) as exc:
        raise IDAnimatorError(
            f"The labels file {path.name} cannot be read ({exc}); give a JSON or CSV file as described in "
            "`python -m idanimator build-dataset --help`."
        ) from exc
    return labels


def labels_for(labels: dict[str, VideoLabels], relative: Path) -> VideoLabels | None:
    """The labels of the video at ``relative`` (its path under the videos folder), or None."""
    for key in (relative.stem, relative.with_suffix("").as_posix(), relative.as_posix(), relative.name):
        if key in labels:
            return labels[key]
    return None


def _words(value) -> tuple[str, ...]:
    """A list, or a string split at ; , or |, as clean lower-case words (underscores become spaces)."""
    if value is None:
        return ()
    items = re.split(r"[;|,]", value) if isinstance(value, str) else list(value)
    cleaned = (str(item).strip().replace("_", " ").lower() for item in items)
    return tuple(dict.fromkeys(word for word in cleaned if word))


def _from_json(data) -> dict[str, VideoLabels]:
    if not isinstance(data, dict):
        raise ValueError("the top level must be an object mapping video names to labels")
    if "clips" in data and ("meta_info" in data or "mete_info" in data):
        return _from_celebvhq(data)
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"the labels of {name!r} must be an object")
        identity = entry.get("identity")
        out[str(name)] = VideoLabels(
            appearance=_words(entry.get("appearance")),
            action=_words(entry.get("action")),
            emotion=_words(entry.get("emotion")),
            identity=str(identity) if identity not in (None, "") else None,
        )
    return out


def _from_celebvhq(data: dict) -> dict[str, VideoLabels]:
    meta = data.get("meta_info", data.get("mete_info"))
    appearance_names = _words_in_order(meta["appearance_mapping"])
    action_names = _words_in_order(meta["action_mapping"])
    out = {}
    for name, clip in data["clips"].items():
        attributes = clip.get("attributes") or {}
        flags = attributes.get("appearance") or []
        appearance = [n for n, on in zip(appearance_names, flags, strict=False) if _on(on)]
        if "male" in appearance_names and len(flags) > appearance_names.index("male") and "male" not in appearance:
            appearance.insert(0, "female")  # the binary labels are exhaustive: not male means female
        action = [n for n, on in zip(action_names, attributes.get("action") or [], strict=False) if _on(on)]
        out[str(name)] = VideoLabels(
            appearance=_words(appearance),
            action=_words(action),
            emotion=_words(_celebvhq_emotions(attributes.get("emotion"))),
        )
    return out


def _words_in_order(names) -> list[str]:
    """A mapping's names as the words :func:`_words` makes of them, one per name, in order (positions matter)."""
    if not isinstance(names, list):
        raise ValueError("appearance_mapping and action_mapping must be lists of names")
    return [str(name).strip().replace("_", " ").lower() for name in names]


def _on(flag) -> bool:
    return flag in (1, True, "1") or (isinstance(flag, float) and flag >= 0.5)


def _celebvhq_emotions(emotion) -> list[str]:
    """CelebV-HQ stores one label (``"labels": "happy"``) or, when it changes, a list of labelled spans."""
    labels = emotion.get("labels") if isinstance(emotion, dict) else emotion
    if labels is None or isinstance(labels, str):
        return [labels] if labels else []
    found = []
    for item in labels:
        if isinstance(item, dict):
            item = item.get("emotion") or item.get("label") or item.get("labels")
        if isinstance(item, str):
            found.append(item)
    return found


def _from_csv(text: str) -> dict[str, VideoLabels]:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        return {}
    columns = {c.strip().lower(): c for c in rows[0] if c}
    key = columns.get("name") or columns.get("video")
    if key is None:
        raise ValueError("a CSV labels file needs a 'name' or 'video' column")

    def cell(row: dict, column: str) -> str | None:
        return row.get(columns[column]) if column in columns else None

    out = {}
    for row in rows:
        name = Path((row.get(key) or "").strip())
        if not name.name:
            continue
        identity = (cell(row, "identity") or "").strip() or None
        labels = VideoLabels(
            appearance=_words(cell(row, "appearance")),
            action=_words(cell(row, "action")),
            emotion=_words(cell(row, "emotion")),
            identity=identity,
        )
        out[name.as_posix()] = labels
        out.setdefault(name.with_suffix("").as_posix() if name.suffix else name.as_posix(), labels)
    return out
