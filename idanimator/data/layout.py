"""Where build-dataset runs meet in OUT: every video's key, the shards, and the locks.

Keys. Every video gets a key, unique and stable, from its path relative to the videos folder alone (see
:func:`video_key`): records, clip ids (``<key>--NNN``) and face folders are named by it, so a video keeps its
key when others are added, and two videos never share one.

Shards. ``--shard I/N`` (I from 0 to N-1) builds only every N-th video of the sorted list, starting at the
I-th, and writes no manifest: N processes on N machines (a SLURM array) build their shares into one shared OUT,
each video's records written on its own, atomically, depending on nothing another video writes. A final run
without ``--shard`` then finds every record done, builds only what is missing and writes the manifest.

Locks (OS-level, ``fcntl.flock``; the kernel drops them when the process ends, killed or not, so there is
never a stale lock to remove by hand). A whole run holds ``OUT/.build-dataset.lock`` exclusively from start
to end; a shard holds it shared, plus ``OUT/.build-dataset.shard-I-of-N.lock`` exclusively. So shards run side
by side, while the same shard twice, a whole run beside a shard, or two whole runs are refused at once, in one
sentence. Writing the manifest takes ``OUT/.manifest.lock`` (waited for, not refused).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..errors import IDAnimatorError
from ..files import write_error

RUN_LOCK = ".build-dataset.lock"  # held by a run from start to end: exclusively, or shared by shards
SHARD_LOCK = ".build-dataset.shard-{index}-of-{count}.lock"  # held by a shard from start to end
MANIFEST_LOCK = ".manifest.lock"  # held while the manifest is assembled from the clip records
Say = Callable[[str], None]


def video_key(relative: str | PurePosixPath) -> str:
    """A video's key, from its path under the videos folder alone: file-name safe, unique and stable.

    Readable first: the path without its ``.mp4`` suffix, folders joined by ``__`` and any other character
    than ``A-Z a-z 0-9 . _ -`` replaced by ``_`` (``talks/ann.mp4`` -> ``talks__ann``). Where that readable
    form does not lead back to exactly this path (another suffix than ``.mp4``, a character replaced, a
    ``__`` in a name), ten hex digits of the SHA-256 of the exact path are added: ``a b.mp4`` ->
    ``a_b-1c3e...``, ``a_b.mp4`` -> ``a_b``. So two videos never share a key, and a video's key never
    depends on which other videos there are.
    """
    text = PurePosixPath(relative).as_posix()
    stem = PurePosixPath(text).with_suffix("").as_posix()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")).strip("._") or "video"
    if readable.replace("__", "/") + ".mp4" == text:  # clip ids (<key>--NNN) cannot collide either: the
        return readable  # last "--" of one is always the one before its number
    return f"{readable}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:10]}"


def shown_path(path: Path, out: Path) -> str:
    """How the manifest names a source video: relative to OUT (``raw/a.mp4``, ``../videos/a.mp4``), so a data
    set moved together with its videos still finds them; absolute only where no relative path exists."""
    try:
        return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``, I from 0 to N-1; anything else is one sentence."""
    index, _, count = str(text).strip().partition("/")
    if index.isdigit() and count.isdigit() and int(count) >= 1 and int(index) < int(count):
        return int(index), int(count)
    return _bad_shard(text)


def _bad_shard(text) -> tuple[int, int]:
    raise IDAnimatorError(
        f"--shard must be I/N with N at least 1 and I from 0 to N-1 (e.g. 0/4 ... 3/4), not {text!r}."
    )


@contextmanager
def run_locks(out: Path, shard: tuple[int, int] | None, say: Say) -> Iterator[None]:
    """A whole run: the run lock, exclusively. A shard: the run lock shared, and its own shard lock."""
    if shard is None:
        with locked(out / RUN_LOCK, busy=lambda: _whole_run_busy(out), say=say):
            yield
        return
    index, count = shard
    whole = f"A build-dataset run without --shard is writing into {out}; wait for it to finish."
    again = f"Shard {index}/{count} is already being built into {out}; wait for it to finish."
    with (
        locked(out / RUN_LOCK, busy=lambda: whole, shared=True, say=say),
        locked(out / SHARD_LOCK.format(index=index, count=count), busy=lambda: again, say=say),
    ):
        yield


def _whole_run_busy(out: Path) -> str:
    """Why a whole run cannot have the run lock: shards at work (named), or another whole run."""
    import fcntl

    working = []
    for path in sorted(out.glob(SHARD_LOCK.format(index="*", count="*"))):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            found = re.search(r"shard-(\d+)-of-(\d+)", path.name)
            working.append(f"{found[1]}/{found[2]}" if found else path.name)
        finally:
            os.close(fd)
    if working:
        return (
            f"Shard {', '.join(working)} of build-dataset {'is' if len(working) == 1 else 'are'} still writing "
            f"into {out}; run it without --shard once every shard has finished."
        )
    return f"Another build-dataset run is writing into {out}; wait for it to finish or choose another --out."


@contextmanager
def locked(
    path: Path, busy: Callable[[], str] | None = None, shared: bool = False, say: Say | None = None
) -> Iterator[None]:
    """Hold an ``fcntl.flock`` on ``path`` (exclusive, or ``shared``) for the block: with ``busy``, a lock held
    by another process is the sentence it gives, at once; without it the lock is waited for. The file is
    never written (its time stays put), and the lock goes with the process, however it ends. A file system
    without locks (some network mounts) is one note, and the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_error(path.parent, exc) from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise IDAnimatorError(busy() if busy else f"{path} is locked.") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise write_error(path.parent, exc) from exc
            if say:
                say(f"note: {path.parent} does not support file locks; make sure no two runs share a shard.")
        yield
    finally:
        os.close(fd)  # releases the lock
