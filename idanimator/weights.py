"""Resolving a weight's name to files on disk: local paths, registry names, Hub folders and files.

Downloads go through huggingface_hub (its cache, `HF_HUB_OFFLINE`, `HF_TOKEN`, revisions and
progress bars). The cache is always tried first, so nothing touches the network once a weight is
there; when a weight is missing and the Hub cannot be reached, the error says what to do instead of
waiting through retries and ending in a traceback.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from . import registry
from .errors import WeightsUnavailableError
from .registry import BACKBONES, SINGLE_FILE_SUFFIXES, HubFile, HubFolder, Source

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def describe(source: str | Source) -> str:
    if isinstance(source, HubFile):
        return f"{source.repo_id}/{source.filename}"
    if isinstance(source, HubFolder):
        return source.repo_id + (f"/{source.subfolder}" if source.subfolder else "")
    return str(source)


def parse_hub_id(text: str, *, file_suffixes: tuple[str, ...] = SINGLE_FILE_SUFFIXES) -> HubFolder | HubFile | None:
    """The Hub source a text names, or None when it names none: "owner/name" is a repository,
    "owner/name/path/file" (ending in one of ``file_suffixes``, any letter case) one file in it, either with an
    optional "@revision" (branch, tag or commit). Nothing on disk or on the network is looked at; a text
    starting with ".", "/" or "~" is a local path, never a Hub id. The one Hub-id parser of the project."""
    name, _, revision = text.partition("@")
    parts = name.split("/")
    if len(parts) < 2 or not _HUB_ID.match("/".join(parts[:2])) or name.startswith((".", "/", "~")):
        return None
    if len(parts) == 2:
        return HubFolder(name, revision=revision or None)
    if name.lower().endswith(file_suffixes):
        return HubFile("/".join(parts[:2]), "/".join(parts[2:]), revision=revision or None)
    return None


def parse_source(value: str | Source, *, allow_hub_ids: bool = True) -> Source | Path:
    """A registry name, an existing local path, or a Hub id (see :func:`parse_hub_id`): "owner/name" or
    "owner/name/file.safetensors", either with an optional "@revision" (branch, tag or commit)."""
    if isinstance(value, (HubFolder, HubFile)):
        return value
    if value in BACKBONES:
        return BACKBONES[value].source
    path = Path(value).expanduser()
    if path.exists():
        return path
    if allow_hub_ids and (source := parse_hub_id(value)) is not None:
        return source
    value = value.partition("@")[0]
    if not allow_hub_ids and _HUB_ID.match(value):
        raise WeightsUnavailableError(f"{value!r} is not one of the offered models ({', '.join(BACKBONES)}).")
    names = ", ".join(BACKBONES)
    raise WeightsUnavailableError(
        f"{value!r} is neither an existing file or folder, a Hub id (owner/name), nor a known model ({names})."
    )


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds rather than after retries."""
    if offline_mode():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


# What a command can do besides getting the weights (None: the library, and the app, which also has --tiny).
_MORE_ADVICE = {
    None: " Or use --tiny to try it with random weights.",
    "generate": " Or give local copies (--adapter, --motion-adapter, --image-encoder, --backbone, --base PATH), "
    "or add --tiny to try the whole path with random weights.",
    "download": "",
}


def _advice(command: str | None) -> str:
    """How to get weights onto a machine that cannot download them: the cache travels as a folder."""
    from huggingface_hub.constants import HF_HUB_CACHE

    first = "Unset HF_HUB_OFFLINE if this machine is online; otherwise run" if offline_mode() else "Run"
    return (
        f"{first} `python -m idanimator download` on a machine that reaches the Hub, copy its Hugging Face cache "
        "(the HF_HOME folder, ~/.cache/huggingface by default) here, and run with HF_HOME set to that copy and "
        f"HF_HUB_OFFLINE=1 (this run looked in {HF_HUB_CACHE})." + _MORE_ADVICE.get(command, "")
    )


def _unavailable(
    source: Source, what: str, exc: Exception | None = None, command: str | None = None
) -> WeightsUnavailableError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    name = describe(source)
    if isinstance(exc, GatedRepoError):
        return WeightsUnavailableError(
            f"The {what} {name} needs you to accept its licence on huggingface.co and set HF_TOKEN."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsUnavailableError(f"The {what} {name} does not exist on the Hugging Face Hub (or is private).")
    how = "HF_HUB_OFFLINE is set" if offline_mode() else "the Hugging Face Hub cannot be reached"
    return WeightsUnavailableError(
        f"The {what} {name} is not in the local Hugging Face cache and {how}. {_advice(command)}"
    )


def _fetch(source: Source, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if isinstance(source, HubFile):
        return Path(
            hf_hub_download(
                source.repo_id,
                source.filename,
                revision=source.revision,
                repo_type=source.repo_type,
                local_files_only=local_only,
            )
        )
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    folder = snapshot_download(
        source.repo_id,
        revision=source.revision,
        repo_type=source.repo_type,
        allow_patterns=[prefix + p for p in source.allow_patterns] or None,
        ignore_patterns=[prefix + p for p in source.ignore_patterns] or None,
        local_files_only=local_only,
    )
    path = Path(folder) / source.subfolder if source.subfolder else Path(folder)
    if not path.is_dir() or not any(path.rglob("*.json")):
        raise FileNotFoundError(path)  # an empty or partial snapshot is not a hit
    return path


def is_cached(value: str | Source | Path) -> bool:
    """Whether a weight is on disk already (a local path, or complete in the Hugging Face cache); no network."""
    source = value if isinstance(value, Path) else parse_source(value)
    if isinstance(source, Path):
        return source.exists()
    try:
        _fetch(source, local_only=True)
        return True
    except (OSError, ValueError):
        return False


def check_available(parts: list[tuple[str | Source | Path, str]], *, command: str | None = None) -> None:
    """Before anything heavy is imported: every ``(name, what)`` is a local path that exists, complete in the
    Hugging Face cache, or the Hub can be reached; otherwise the sentence for the first that is none of these
    (with ``command``'s own advice). Nothing is downloaded here."""
    for value, what in parts:
        text = str(value) if isinstance(value, (str, Path)) else ""
        looks_like_a_path = any(c in text for c in "/\\") or text.startswith((".", "~"))
        if looks_like_a_path and parse_hub_id(text) is None and not Path(text).expanduser().exists():
            raise WeightsUnavailableError(f"The {what} {text} does not exist.")
        source = value if isinstance(value, Path) else parse_source(value)
        if isinstance(source, Path):
            if not source.exists():
                raise WeightsUnavailableError(f"The {what} {source} does not exist.")
        elif not is_cached(source) and not hub_reachable():
            raise _unavailable(source, what, command=command)


def resolve(
    value: str | Source | Path, *, what: str = "model", allow_hub_ids: bool = True, command: str | None = None
) -> Path:
    """Return a local path for a weight: the cache first, then a download with progress bars. ``command``:
    the CLI command asking, whose own advice the error adds (see :func:`check_available`)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    source = value if isinstance(value, Path) else parse_source(value, allow_hub_ids=allow_hub_ids)
    if isinstance(source, Path):
        if not source.exists():
            raise WeightsUnavailableError(f"The {what} {source} does not exist.")
        return source
    try:
        return _fetch(source, local_only=True)
    except (OSError, ValueError):
        pass  # not cached (LocalEntryNotFoundError is an OSError)
    if not hub_reachable():
        raise _unavailable(source, what, command=command)
    try:
        return _fetch(source, local_only=False)
    except (GatedRepoError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise _unavailable(source, what, exc, command=command) from exc


def real_weights_status() -> tuple[str | None, bool]:
    """Can the release's weights be had? ``(problem, needs_download)``: problem is None when every part is on
    disk or can be downloaded (then needs_download says whether some still must be); otherwise it is the
    sentence saying why not (the app then starts in tiny mode). Nothing is downloaded here."""
    wanted = [
        (registry.FACE_ADAPTER, "face adapter"),
        (registry.MOTION_ADAPTER, "motion adapter"),
        (registry.IMAGE_ENCODER, "image encoder"),
        (registry.DEFAULT_BACKBONE, "backbone"),
        (registry.BASE_MODEL, "SD1.5 base model"),
    ]
    missing = [(source, what) for source, what in wanted if not is_cached(source)]
    if not missing:
        return None, False
    if hub_reachable():
        return None, True
    try:
        resolve(*missing[0][:1], what=missing[0][1])  # raises the sentence that says what to do
    except WeightsUnavailableError as exc:
        return str(exc), False
    return None, False


def read_state_dict(path: Path):
    """A weights file's tensors (.safetensors, or a PyTorch file read with ``weights_only=True``: a pickle that
    would run code is refused), a bare state dict or one under "state_dict", DDP's "module." prefix dropped.
    Raises ValueError when the file holds something else (the callers word the sentence)."""
    import torch  # here: the CLI reads this module before torch is imported

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
