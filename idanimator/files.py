"""Writing files so that a reader never sees half of one: the one atomic-write routine of the project.

Videos, checkpoints and exported models are written under a temporary name in the target's own folder
(same file system, so the final rename is atomic), flushed to disk, then renamed into place. A crash, a
full disk or a failing encoder leaves the old file (or nothing), never a partial file under the name the
user asked for. Failures a user can cause become one sentence.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IDAnimatorError

_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large")


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


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new folder beside ``path`` to fill; on success it replaces ``path``, on any failure it is removed,
    so an interrupted build never leaves a half-made folder under the name (the tiny kits use it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.parent / f"{path.name}.building-{secrets.token_hex(4)}"
    work.mkdir()  # not mkdtemp: the folder gets the user's umask, not 0700
    try:
        yield work
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
