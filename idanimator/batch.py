"""``generate``'s batch mode: every face photo of a folder x every prompt of a file x every seed.

It writes exactly the layout ``eval`` reads: ``OUT/NAME.mp4`` with its prompt in ``OUT/NAME.txt``, where
NAME is ``FACE--pNN--sSEED`` (FACE the photo's file name without suffix, NN the prompt's position from 00)
so that ``eval --faces`` pairs each video with the photo it was made from. The model loads once; each photo
is checked (a face is found) before it loads, and each video is written atomically, so an interrupted run
can simply be started again: videos already there are kept (``overwrite`` makes them anew), the hidden
partial files a killed run left are removed, and when all are there the model is not loaded at all.
``OUT/generation.json`` records the settings, and each MP4 carries its own (``idanimator.video.read_settings``).
Progress is a bar on a terminal and plain lines in a log (``console.progress``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .console import progress
from .errors import IDAnimatorError
from .eval.pairing import FACE_SUFFIXES, SEPARATOR
from .files import atomic_path, ensure_folder, is_hidden, kind_problem, remove_stale_partials
from .request import GenerationRequest
from .settings import parse_seed

MANIFEST = "generation.json"


@dataclass(frozen=True)
class BatchVideo:
    face: Path
    prompt_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.face.stem}{SEPARATOR}p{self.prompt_index:02d}{SEPARATOR}s{self.seed}"


def read_prompts(path: Path) -> list[str]:
    """A text file with one prompt a line (blank lines and lines starting with # are skipped), or a JSON
    list of strings."""
    path = Path(path).expanduser()
    problem = kind_problem(path, folder=False)
    if problem:
        raise IDAnimatorError(f"The prompts file {path} {problem}.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise IDAnimatorError(f"The prompts file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IDAnimatorError(f"The prompts file {path} cannot be read as UTF-8 text.") from exc
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IDAnimatorError(f"The prompts file {path} is not valid JSON ({exc}).") from exc
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise IDAnimatorError(f"The prompts file {path} must hold a JSON list of strings.")
    else:
        prompts = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise IDAnimatorError(f"The prompts file {path} holds no prompt.")
    return prompts


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; each one a valid seed, none repeated."""
    seeds = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            seed = parse_seed(int(part))
        except ValueError as exc:
            raise IDAnimatorError(f"The seed '{part}' is not a whole number; give seeds like 1,2,3.") from exc
        if seed is None:
            raise IDAnimatorError("A batch needs fixed seeds (-1 draws a random one); give seeds like 1,2,3.")
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise IDAnimatorError("No seed was given; give seeds like 1,2,3.")
    return seeds


def face_photos(folder: Path) -> list[Path]:
    folder = Path(folder).expanduser()
    problem = kind_problem(folder, folder=True)
    if problem:
        raise IDAnimatorError(f"The faces folder {folder} {problem}.")
    photos = sorted(
        p for p in folder.iterdir() if p.is_file() and not is_hidden(p) and p.suffix.lower() in FACE_SUFFIXES
    )
    if not photos:
        raise IDAnimatorError(f"The faces folder {folder} holds no photos ({', '.join(FACE_SUFFIXES)}).")
    return photos


def plan(faces: list[Path], prompts: list[str], seeds: list[int]) -> list[BatchVideo]:
    stems = [p.stem for p in faces]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise IDAnimatorError(f"Two photos share the name '{repeated[0]}' (e.g. .png and .jpg); rename one.")
    return [BatchVideo(face, i, prompt, seed) for face in faces for i, prompt in enumerate(prompts) for seed in seeds]


def write_manifest(jobs: list[BatchVideo], request: GenerationRequest, out: Path) -> Path:
    """``OUT/generation.json``: the settings and each video's photo, prompt and seed."""
    out = ensure_folder(Path(out).expanduser())
    record = {
        "settings": request.settings() | {"prompt": None, "seed": None},
        "videos": {job.name: {"face": job.face.name, "prompt": job.prompt, "seed": job.seed} for job in jobs},
    }
    with atomic_path(out / MANIFEST) as temp:
        temp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out / MANIFEST


def still_to_make(jobs: list[BatchVideo], out: Path, overwrite: bool = False) -> list[BatchVideo]:
    """The jobs whose video is not in ``out`` yet (all of them with ``overwrite``)."""
    out = Path(out).expanduser()
    return list(jobs) if overwrite else [job for job in jobs if not (out / f"{job.name}.mp4").is_file()]


def remove_partials(jobs: list[BatchVideo], out: Path) -> list[Path]:
    """Remove the hidden half-written files (``.NAME.HEX.partial.mp4``) a killed run left for this batch's own
    videos, prompt files and manifest; files of other names are left alone."""
    names = [MANIFEST, *(f"{job.name}{suffix}" for job in jobs for suffix in (".mp4", ".txt"))]
    return remove_stale_partials(Path(out).expanduser(), names)


def run_batch(
    pipe,
    jobs: list[BatchVideo],
    crops: dict[Path, object],
    request: GenerationRequest,
    out: Path,
    *,
    say: Callable[[str], None] | None = None,
) -> int:
    """Make each job's video and prompt file with one loaded pipeline; returns how many were written.
    ``request``: the settings every video shares (its prompt and seed are each job's); each MP4 carries its own."""
    from tqdm import tqdm

    from .service import out_of_memory_guard
    from .video import write_mp4

    say = say or (lambda line: tqdm.write(line, file=sys.stderr))
    out = ensure_folder(Path(out).expanduser())
    for job in progress(jobs, desc="generating", unit="video"):
        with out_of_memory_guard():
            result = pipe(crops[job.face], request=request.replace(prompt=job.prompt, seed=job.seed), output_type="np")
        for warning in result.warnings:
            say(f"warning: {job.name}: {warning}")
        with atomic_path(out / f"{job.name}.txt") as temp:
            temp.write_text(job.prompt + "\n", encoding="utf-8")
        write_mp4(result.frames[0], out / f"{job.name}.mp4", fps=request.fps, settings=result.request.settings())
    return len(jobs)


def process_state():
    """accelerate's ``PartialState`` when this run is one of several processes (``torchrun`` or ``accelerate
    launch`` set WORLD_SIZE above 1: e.g. one per GPU of a node), else None. Without a GPU the processes talk
    over gloo on the CPU."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def share_of(state, todo: list[BatchVideo]) -> list[BatchVideo]:
    """This process's part of ``todo`` (accelerate's ``split_between_processes``: every process gets the same
    list in the same order, so each video is made by exactly one of them); all of it with one process."""
    if state is None:
        return list(todo)
    with state.split_between_processes(list(todo)) as mine:
        return list(mine)
