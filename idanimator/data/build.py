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

Keys, shards (``--shard I/N``: a share of the videos, no manifest; a final run without it writes the manifest)
and the locks that keep runs into one OUT apart: :mod:`.layout`.
"""

from __future__ import annotations

import itertools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import IDAnimatorError, UnreadableVideoError
from ..files import ensure_folder
from ..video import VIDEO_SUFFIXES
from .captions import ACTION_FRAMES, Captioner, Rewriter, get_captioner, get_rewriter
from .decode import read_frames, read_thumbnails
from .facepool import FACES_PER_CLIP, FaceFilter, FacePool, candidate_frames, save_faces
from .labels import VideoLabels, labels_for, read_labels
from .layout import MANIFEST_LOCK, Say, locked, parse_shard, run_locks, shown_path, video_key
from .manifest import ClipRecord, read_json, write_json, write_manifest
from .shots import CUT_THRESHOLD, MIN_CLIP_FRAMES, THUMB_SIZE, Clip, find_cuts, frame_distances, split_into_clips


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
    shard: str | tuple[int, int] | None = None  # "I/N" or (I, N): build only every N-th video from the I-th

    def validate(self) -> BuildOptions:
        if isinstance(self.shard, str):
            self.shard = parse_shard(self.shard)
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
    shard: tuple[int, int] | None = None
    all_videos: int = 0  # in the videos folder, when this was a shard of them

    def summary(self) -> str:
        line = f"{self.new_clips} new clips, {self.done_clips} already done, from "
        if self.shard:
            line += f"{self.videos} of {_count(self.all_videos, 'video')} (shard {self.shard[0]}/{self.shard[1]})"
        else:
            line += _count(self.videos, "video")
        if self.skipped:
            line += f" ({len(self.skipped)} skipped)"
        if self.manifest is None:
            return f"{line}; the manifest is written by a run without --shard once every shard has finished"
        return f"{line}; wrote {self.manifest}"


@dataclass
class _PendingVideo:
    path: Path
    key: str  # unique, stable, file-name safe: clip ids and record names start with it (see video_key)
    relative: str  # its path under the videos folder (posix): what its records are stamped with
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

    def settings(self, job: _PendingVideo) -> dict:
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

    def run(self, job: _PendingVideo) -> _Outcome:
        stat = job.path.stat()
        stamp = {"video": job.relative, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **self.settings(job)}
        record_path = self.out / "videos" / f"{job.key}.json"
        record = read_json(record_path)
        if record and self._same(record.get("stamp"), stamp, job) and self._clips_present(record.get("clips", [])):
            self._refresh(job, stamp, record, record_path)
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

    @staticmethod
    def _same(old: dict | None, stamp: dict, job: _PendingVideo) -> bool:
        """Whether a record was built from this file with these settings. Older records (from before stamps
        named the video by its path under the videos folder) named it as the manifest did then (absolute, or
        relative to OUT): those still count, so an older data set is not rebuilt."""
        if not isinstance(old, dict):
            return False
        if old == stamp:
            return True
        legacy = {str(job.path.resolve()), job.shown}
        return old.get("video") in legacy and {**old, "video": stamp["video"]} == stamp

    def _refresh(self, job: _PendingVideo, stamp: dict, record: dict, record_path: Path) -> None:
        """Finished records of a video that has moved (with OUT or alone), or of an older stamp: only the
        video's path and the stamp change (the clips, faces and captions do not depend on where the file is)."""
        for clip_id in record.get("clips", []):
            path = self.out / "clips" / f"{clip_id}.json"
            data = read_json(path)
            if data is not None and (data.get("video") != job.shown or data.get("stamp") != stamp):
                write_json(path, data | {"video": job.shown, "stamp": stamp})
        if record.get("stamp") != stamp:
            write_json(record_path, record | {"stamp": stamp})

    def _build(self, job: _PendingVideo, stamp: dict, outcome: _Outcome) -> None:
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
            if done and self._same(done.get("stamp"), stamp, job):
                if done.get("video") != job.shown or done.get("stamp") != stamp:
                    write_json(self.out / "clips" / f"{clip_id}.json", done | {"video": job.shown, "stamp": stamp})
                outcome.clips.append(clip_id)
                continue
            wanted = self.options.faces_per_clip
            candidates = candidate_frames(clip, wanted, f"{self.options.seed}:{clip_id}")
            action = _spread(clip, ACTION_FRAMES) if self.captioner.needs_frames else []
            pending[clip_id] = _Pending(clip, FacePool(clip, candidates, wanted, self.options.faces), action)
        if pending:
            self._read_and_finish(job, stamp, fps, pending, outcome)

    def _read_and_finish(self, job: _PendingVideo, stamp: dict, fps: float, pending: dict, outcome: _Outcome) -> None:
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

    def _finish(
        self, job: _PendingVideo, stamp: dict, fps: float, clip_id: str, part: _Pending, outcome: _Outcome
    ) -> bool:
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
    with run_locks(out, options.shard, say):
        return _build_all(videos, out, options, labels, paths, captioner, rewriter, say)


def _build_all(videos, out, options, labels, paths, captioner, rewriter, say: Say) -> BuildReport:
    from tqdm import tqdm

    from ..face import get_detector

    builder = _Builder(out, options, get_detector(options.detector), captioner, rewriter)
    relatives = sorted((path.relative_to(videos).as_posix(), path) for path in paths)  # one order on every machine
    jobs = [
        _PendingVideo(
            path,
            video_key(rel),
            rel,
            shown_path(path, out),
            PurePosixPath(rel).with_suffix("").as_posix(),
            labels_for(labels, Path(rel)),
        )
        for rel, path in relatives
    ]
    report = BuildReport(videos=len(jobs), shard=options.shard, all_videos=len(jobs))
    if options.shard:
        index, count = options.shard
        jobs = jobs[index::count]
        report.videos = len(jobs)
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
    if options.shard:  # the manifest is assembled by the final run, from every shard's records
        return report
    finished = [read_json(out / "clips" / f"{clip_id}.json") for clip_id in clip_ids]
    records = [ClipRecord.from_dict(data) for data in finished if data is not None]
    with locked(out / MANIFEST_LOCK, say=say):
        report.manifest = write_manifest(out, records)
    return report


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
