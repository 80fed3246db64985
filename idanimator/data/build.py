"""``build-dataset``: every video in a folder -> clips, face pools, captions and ``OUT/manifest.jsonl``.

Per video: thumbnails of every frame find the shot cuts (:mod:`.shots`); each shot of at least ``min_frames``
frames is a clip; one more decoding pass reads, at full size, only the frames the face pools (and a
captioner that looks at frames) need; each clip is finished as soon as its last frame has passed.

Resumable and idempotent. A finished clip is written at once as ``OUT/clips/<clip_id>.json``, a finished
video as ``OUT/videos/<key>.json`` (its clips, or why it was skipped), both atomically and together with the
settings and the source file's size and time; the manifest is rebuilt from the records at the end (and left
untouched when nothing changed). A re-run skips every video and clip whose record matches, so an interrupted
run goes on where it stopped and a finished one does no work. A corrupt video, or one without a usable shot
or face, is one warning line and a record (it is tried again only once the file changes).

Videos are processed by a pool of threads, not processes: the heavy steps (ffmpeg in its own process,
onnxruntime, OpenCV, PNG encoding, HTTP) release the GIL, and threads share one loaded detector and
captioner instead of loading a copy per process.

Two runs into one OUT would undo each other's clips, so a run holds an OS-level lock (``fcntl.flock``) on
``OUT/.build-dataset.lock`` from start to end; a second run says so and stops. The kernel drops the lock
when its process ends, killed or not, so there is never a stale lock to remove by hand. Writing the manifest
takes a second lock, ``OUT/.manifest.lock`` (waited for, not refused). The two are kept apart on purpose:
every per-video and per-clip record is written on its own, atomically, and depends on nothing another video
writes, so a later ``--shard I/N`` (several machines each building their share of the videos into one shared
OUT, then one assembly of the manifest from all records) needs only a lock per shard instead of the run lock,
and the manifest lock as it is.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IDAnimatorError, UnreadableVideoError
from ..files import ensure_folder, write_error
from ..video import VIDEO_SUFFIXES
from .captions import ACTION_FRAMES, Captioner, Rewriter, get_captioner, get_rewriter
from .decode import read_frames, read_thumbnails
from .facepool import FACES_PER_CLIP, FaceFilter, FacePool, candidate_frames, save_faces
from .labels import VideoLabels, labels_for, read_labels
from .manifest import ClipRecord, read_json, write_json, write_manifest
from .shots import CUT_THRESHOLD, MIN_CLIP_FRAMES, THUMB_SIZE, Clip, find_cuts, frame_distances, split_into_clips

RUN_LOCK = ".build-dataset.lock"  # held by a run from start to end (see the module's notes)
MANIFEST_LOCK = ".manifest.lock"  # held while the manifest is assembled from the clip records
Say = Callable[[str], None]


@dataclass
class BuildOptions:
    labels: Path | None = None
    captioner: str = "template"
    rewriter: str = "template"
    workers: int = 2
    faces_per_clip: int = FACES_PER_CLIP
    detector: str = "auto"
    min_frames: int = MIN_CLIP_FRAMES
    cut_threshold: float = CUT_THRESHOLD
    faces: FaceFilter = field(default_factory=FaceFilter)
    seed: int = 0
    progress: bool = True

    def validate(self) -> BuildOptions:
        for name, value, low in (("--workers", self.workers, 1), ("--faces-per-clip", self.faces_per_clip, 1)):
            if not isinstance(value, int) or value < low:
                raise IDAnimatorError(f"{name} must be a whole number of at least {low}, not {value}.")
        if self.min_frames < 1:
            raise IDAnimatorError(f"The shortest clip must be at least 1 frame long, not {self.min_frames}.")
        return self


@dataclass
class BuildReport:
    new_clips: int = 0
    done_clips: int = 0
    videos: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # video -> why
    manifest: Path | None = None

    def summary(self) -> str:
        line = f"{self.new_clips} new clips, {self.done_clips} already done, from {_count(self.videos, 'video')}"
        if self.skipped:
            line += f" ({len(self.skipped)} skipped)"
        return f"{line}; wrote {self.manifest}"


@dataclass
class _Job:
    path: Path
    key: str  # unique, file-name safe: clip ids and record names start with it
    shown: str  # the path as the manifest records it
    name: str  # its path under the videos folder, without suffix: the identity when the labels name none
    labels: VideoLabels | None


class _Stopped(Exception):
    """The run was interrupted; the video's finished clips are kept, the rest is redone next time."""


@dataclass
class _Pending:
    """A clip still to build: its face pool fills, and its action frames are kept, as the frames pass."""

    clip: Clip
    pool: FacePool
    action_frames: list[int]
    action: dict[int, np.ndarray | None] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)  # the video's (width, height), known once a frame is read

    @property
    def frames(self) -> list[int]:
        return [*self.pool.candidates, *self.action_frames]

    @property
    def last(self) -> int:
        return max(self.frames)

    def __post_init__(self) -> None:
        self.action = dict.fromkeys(self.action_frames)


@dataclass
class _Outcome:
    clips: list[str]
    new: int = 0
    error: str | None = None  # why the video was skipped
    notes: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self, out: Path, options: BuildOptions, detector, captioner: Captioner, rewriter: Rewriter):
        self.out, self.options = out, options
        self.detector, self.captioner, self.rewriter = detector, captioner, rewriter
        self.stop = threading.Event()  # set on Ctrl-C: videos in progress end at their next frame

    def settings(self, job: _Job) -> dict:
        """Everything a clip's result depends on: a record built with other settings is built again."""
        o = self.options
        return {
            "faces_per_clip": o.faces_per_clip,
            "min_frames": o.min_frames,
            "cut_threshold": o.cut_threshold,
            "faces": asdict(o.faces),
            "seed": o.seed,
            "detector": self.detector.name,
            "captioner": self.captioner.name,
            "rewriter": self.rewriter.name,
            "labels": job.labels.as_dict() if job.labels else None,
        }

    def run(self, job: _Job) -> _Outcome:
        stat = job.path.stat()
        stamp = {"video": job.shown, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **self.settings(job)}
        record_path = self.out / "videos" / f"{job.key}.json"
        record = read_json(record_path)
        if record and record.get("stamp") == stamp and self._clips_present(record.get("clips", [])):
            return _Outcome(clips=record["clips"], error=record.get("error"))
        outcome = _Outcome(clips=[])
        try:
            self._build(job, stamp, outcome)
        except UnreadableVideoError as exc:  # other errors (a captioner, a full disk) are not the video's
            outcome.error = str(exc)  # fault: they propagate, nothing is recorded, and a re-run retries
        if not outcome.clips and outcome.error is None:
            outcome.error = "no clip has a usable face" + (f" ({'; '.join(outcome.notes)})" if outcome.notes else "")
        write_json(
            record_path, {"stamp": stamp, "clips": outcome.clips, "error": outcome.error, "notes": outcome.notes}
        )
        return outcome

    def _clips_present(self, clip_ids: list[str]) -> bool:
        return all((self.out / "clips" / f"{clip_id}.json").is_file() for clip_id in clip_ids)

    def _build(self, job: _Job, stamp: dict, outcome: _Outcome) -> None:
        fps, thumbnails = read_thumbnails(job.path, THUMB_SIZE)
        counter = itertools.count()
        distances = frame_distances(thumbnail for thumbnail, _ in zip(thumbnails, counter, strict=False))
        total = next(counter)
        if total == 0:
            raise UnreadableVideoError(f"The video {job.path.name} has no frames.")
        clips = split_into_clips(total, find_cuts(distances, self.options.cut_threshold), self.options.min_frames)
        if not clips:
            outcome.error = f"no shot is {self.options.min_frames} frames or longer ({total} frames in all)"
            return
        pending: dict[str, _Pending] = {}
        for number, clip in enumerate(clips):
            clip_id = f"{job.key}--{number:03d}"
            done = read_json(self.out / "clips" / f"{clip_id}.json")
            if done and done.get("stamp") == stamp:
                outcome.clips.append(clip_id)
                continue
            wanted = self.options.faces_per_clip
            candidates = candidate_frames(clip, wanted, f"{self.options.seed}:{clip_id}")
            action = _spread(clip, ACTION_FRAMES) if self.captioner.needs_frames else []
            pending[clip_id] = _Pending(clip, FacePool(clip, candidates, wanted, self.options.faces), action)
        if pending:
            self._read_and_finish(job, stamp, fps, pending, outcome)

    def _read_and_finish(self, job: _Job, stamp: dict, fps: float, pending: dict, outcome: _Outcome) -> None:
        """One pass over the frames the pending clips need; each clip is finished once its last one is read."""
        wanted = sorted({index for part in pending.values() for index in part.frames})
        for index, frame in read_frames(job.path, wanted):
            if self.stop.is_set():
                raise _Stopped
            for clip_id, part in list(pending.items()):
                if index in part.pool.candidates:
                    part.pool.offer(index, frame, self.detector, keep_frame=self.captioner.needs_frames)
                if index in part.action:
                    part.action[index] = frame
                if index == part.last:
                    del pending[clip_id]
                    part.size = (frame.shape[1], frame.shape[0])
                    if self._finish(job, stamp, fps, clip_id, part, outcome):
                        outcome.clips.append(clip_id)
                        outcome.new += 1

    def _finish(self, job: _Job, stamp: dict, fps: float, clip_id: str, part: _Pending, outcome: _Outcome) -> bool:
        """Save the clip's face pool, caption it and write its record; False when it has no usable face."""
        faces = part.pool.chosen()
        if not faces:
            outcome.notes.append(f"clip {clip_id}: {part.pool.why_empty()}")
            return False
        frames = [part.action[index] for index in sorted(part.action)]
        attribute, action = self.captioner.describe(part.pool.best_frame, frames, job.labels)
        paths = save_faces(faces, self.out / "faces" / clip_id)
        record = ClipRecord(
            clip_id=clip_id,
            video=job.shown,
            start_frame=part.clip.start,
            end_frame=part.clip.end,
            fps=fps,
            width=part.size[0],
            height=part.size[1],
            identity=(job.labels.identity if job.labels and job.labels.identity else job.name),
            caption_attribute=attribute,
            caption_action=action,
            caption=self.rewriter.merge(attribute, action),
            faces=[path.relative_to(self.out).as_posix() for path in paths],
            face_frames=[index for index, _ in faces],
        )
        write_json(self.out / "clips" / f"{clip_id}.json", record.as_dict() | {"stamp": stamp})
        return True


def _spread(clip: Clip, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(clip.start, clip.end - 1, min(count, len(clip)))})


def find_videos(folder: Path, out: Path) -> list[Path]:
    """Every video file under ``folder``, recursively and sorted; hidden files, and the output folder when it
    lies inside ``folder``, are left out."""
    if not folder.is_dir():
        raise IDAnimatorError(f"The videos folder {folder} does not exist.")
    out, root = out.resolve(), folder.resolve()
    inner_out = out != root and out.is_relative_to(root)  # OUT inside the videos folder: not searched
    found = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in VIDEO_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and not (inner_out and path.resolve().is_relative_to(out))
    ]
    if not found:
        raise IDAnimatorError(f"No videos were found in {folder} (looked for {', '.join(VIDEO_SUFFIXES)}).")
    return sorted(found)


def _keys(relatives: list[Path]) -> list[str]:
    """File-name-safe, unique keys: the relative path without suffix (folders joined by '__'), and with the
    suffix where two videos differ only in it."""

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "video"

    stems = [clean(rel.with_suffix("").as_posix().replace("/", "__")) for rel in relatives]
    return [
        stem if stems.count(stem) == 1 else clean(f"{stem}_{rel.suffix.lstrip('.')}")
        for stem, rel in zip(stems, relatives, strict=True)
    ]


def _shown(path: Path, out: Path) -> str:
    """How the manifest names a source video: relative to OUT when inside it, else absolute."""
    absolute = path.resolve()
    return absolute.relative_to(out.resolve()).as_posix() if absolute.is_relative_to(out.resolve()) else str(absolute)


def build_dataset(videos: Path, out: Path, options: BuildOptions | None = None, say: Say | None = None) -> BuildReport:
    """Build (or finish building) the data set of every video in ``videos`` into ``out``; see the module's notes."""
    from tqdm import tqdm

    options = (options or BuildOptions()).validate()
    say = say or (lambda line: tqdm.write(line, file=sys.stderr))
    videos, out = Path(videos).expanduser(), Path(out).expanduser()
    # Cheap checks first: the labels, the back ends and the folders, before any video is decoded.
    labels = read_labels(options.labels)
    paths = find_videos(videos, out)
    captioner, rewriter = get_captioner(options.captioner), get_rewriter(options.rewriter)
    ensure_folder(out)
    busy = f"Another build-dataset run is writing into {out}; wait for it to finish or choose another --out."
    with _locked(out / RUN_LOCK, busy=busy):
        return _build_all(videos, out, options, labels, paths, captioner, rewriter, say)


def _build_all(videos, out, options, labels, paths, captioner, rewriter, say: Say) -> BuildReport:
    from tqdm import tqdm

    from ..face import get_detector

    builder = _Builder(out, options, get_detector(options.detector), captioner, rewriter)
    relatives = [path.relative_to(videos) for path in paths]
    jobs = [
        _Job(path, key, _shown(path, out), rel.with_suffix("").as_posix(), labels_for(labels, rel))
        for path, key, rel in zip(paths, _keys(relatives), relatives, strict=True)
    ]
    report = BuildReport(videos=len(jobs))
    clip_ids: list[str] = []
    pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="build-dataset")
    try:
        futures = {pool.submit(builder.run, job): job for job in jobs}
        bar = tqdm(as_completed(futures), total=len(jobs), desc="videos", unit="video", disable=not options.progress)
        for future in bar:
            job = futures[future]
            try:
                outcome = future.result()
            except IDAnimatorError as exc:
                outcome = _Outcome(clips=[], error=str(exc))
            except Exception as exc:  # a bug must not cost the other videos; the video is retried next run
                outcome = _Outcome(clips=[], error=f"unexpected {type(exc).__name__}: {exc}")
            if outcome.error:
                report.skipped[job.shown] = outcome.error
                say(f"warning: skipped {job.path.name}: {outcome.error.rstrip('.')}.")
            else:
                for note in outcome.notes:
                    say(f"note: {job.path.name}: {note}.")
            clip_ids += outcome.clips
            report.new_clips += outcome.new
            report.done_clips += len(outcome.clips) - outcome.new
    except BaseException:  # Ctrl-C: queued videos are dropped, running ones stop at their next frame
        builder.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    finished = [read_json(out / "clips" / f"{clip_id}.json") for clip_id in clip_ids]
    records = [ClipRecord.from_dict(data) for data in finished if data is not None]
    with _locked(out / MANIFEST_LOCK):
        report.manifest = write_manifest(out, records)
    return report


@contextmanager
def _locked(path: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` for the block: with ``busy``, a lock held by another
    process is that sentence at once, without it the lock is waited for. The file is never written (its
    time stays put), and the lock goes with the process, however it ends."""
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
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise IDAnimatorError(busy) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
