"""Writing files so that a reader never sees half of one: the one atomic-write routine of the project.

Videos, checkpoints and exported models are written under a temporary name in the target's own folder
(same file system, so the final rename is atomic), flushed to disk, then renamed into place. A crash, a
full disk or a failing encoder leaves the old file (or nothing), never a partial file under the name the
user asked for. Failures a user can cause become one sentence.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IDAnimatorError

_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large")
_PARTIAL = re.compile(r"\.(?P<stem>.*)\.[0-9a-f]{8}\.partial(?P<suffix>.*)")  # _reserve_temp's names


def ensure_folder(folder: Path) -> Path:
    """Create ``folder`` (and its parents); a file in the way or a read-only place becomes one sentence."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise IDAnimatorError(f"Cannot write into the folder {folder} because {blocker} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IDAnimatorError(
            f"The folder {folder} cannot be created ({exc.strerror or exc}); choose another output location."
        ) from exc
    return folder


def kind_problem(path: str | os.PathLike[str], *, folder: bool) -> str | None:
    """None if ``path`` is a folder (``folder``) or a file (else); otherwise what it is instead, to end a
    sentence such as f"The prompts file {path} {problem}.": "does not exist", "is a folder, not a file", ..."""
    path = Path(path)
    if path.is_dir() if folder else path.is_file():
        return None
    if path.is_dir():
        return "is a folder, not a file"
    if path.exists():
        return "is a file, not a folder" if folder else "is not a regular file"
    return "does not exist"


def write_error(folder: Path, exc: OSError | str) -> IDAnimatorError:
    """The sentence for a folder that cannot take a file (full disk, no permission, read-only)."""
    text = exc if isinstance(exc, str) else (exc.strerror or str(exc))
    if any(hint in text for hint in _DISK_FULL):
        return IDAnimatorError(
            f"The disk holding {folder} is full (or a file size limit was reached); free some space and try again."
        )
    return IDAnimatorError(
        f"Cannot write into the folder {folder} ({text}); check that it is writable and the disk has free space."
    )


def _reserve_temp(path: Path) -> Path:
    """An empty, uniquely named file beside ``path``; creating it proves the folder is writable.

    The real suffix stays last so tools that look at it still recognise the format, and ``open`` (not
    ``mkstemp``) gives it the user's umask permissions, not 0600.
    """
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        with open(temp, "xb"):
            pass
    except OSError as exc:
        raise write_error(path.parent, exc) from exc
    return temp


def is_hidden(path: Path) -> bool:
    """A dot file: what :func:`atomic_path` writes before the rename (``.NAME.HEX.partial.SUFFIX``), which a
    killed process leaves behind; readers listing a folder skip these."""
    return Path(path).name.startswith(".")


def remove_stale_partials(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_path` left in ``folder`` for the file names
    ``names`` (only those: a partial file of any other name is not the caller's); returns what was removed."""
    folder = Path(folder)
    wanted = {(Path(name).stem, Path(name).suffix) for name in names}
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _PARTIAL.fullmatch(path.name)
        if match and (match["stem"], match["suffix"]) in wanted and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any failure it is removed."""
    path = Path(path)
    ensure_folder(path.parent)
    temp = _reserve_temp(path)
    mode = temp.stat().st_mode & 0o777  # the user's umask; some writers (safetensors) recreate the file 0600
    try:
        yield temp
        os.chmod(temp, mode)
        _fsync(temp)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if path.is_dir():
            raise IDAnimatorError(f"{path} is a folder; choose a file name.") from exc
        raise write_error(path.parent, exc) from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _replaceable(path: Path, marker: str) -> bool:
    """Whether ``path`` may be replaced by a rebuilt folder: absent, a folder holding ``marker``, or a folder that
    holds no file at all (empty, or only empty folders: what an interrupted older build could leave)."""
    if not path.exists():
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / marker).is_file() or all(p.is_dir() and not p.is_symlink() for p in path.rglob("*"))


def check_folder_target(path: str | os.PathLike[str], *, marker: str, what: str) -> Path:
    """The absolute ``path`` if :func:`atomic_folder` may build ``what`` there, else one sentence saying why not.

    Only a missing folder, an empty folder, or a folder holding ``marker`` (one this project built) is accepted,
    so a user's own folder is never replaced."""
    path = Path(path).resolve()
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise IDAnimatorError(f"Cannot build {what} in {path} because {blocker} is a file, not a folder.")
    if path.exists() and not path.is_dir():
        raise IDAnimatorError(f"{path} is a file, not a folder; choose a new or empty folder for {what}.")
    if not _replaceable(path, marker):
        raise IDAnimatorError(
            f"The folder {path} already holds files and is not {what} (it has no {marker}), so it was left "
            f"untouched; choose a new or empty folder."
        )
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike[str], *, marker: str, what: str = "a kit") -> Iterator[Path]:
    """Yield a new folder beside ``path`` to fill; on success it replaces ``path``, on any failure it is removed,
    so an interrupted build never leaves a half-made folder under the name (the tiny kits use it).

    ``path`` is replaced only if it is missing, empty, or holds the file ``marker`` (what the caller builds
    writes it); any other folder is refused with one sentence, before and again after the build, so no caller
    can delete a user's files."""
    path = check_folder_target(path, marker=marker, what=what)
    ensure_folder(path.parent)
    work = path.parent / f".{path.name}.building-{secrets.token_hex(4)}"
    try:
        work.mkdir()  # not mkdtemp: the folder gets the user's umask, not 0700
    except OSError as exc:
        raise write_error(path.parent, exc) from exc
    try:
        yield work
        check_folder_target(path, marker=marker, what=what)  # nothing moved in while it was being built
        if path.is_dir():
            shutil.rmtree(path)  # a kit this project built, or folders without a single file
        os.replace(work, path)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
