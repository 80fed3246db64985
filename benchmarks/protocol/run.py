"""The benchmark protocol end to end: every identity x every fixed prompt x every fixed seed, then `eval`.

    python benchmarks/protocol/run.py --out runs/protocol                    # the release's settings, on a GPU
    python benchmarks/protocol/run.py --out runs/protocol --faces DIR        # another identity set
    python benchmarks/protocol/run.py --out runs/smoke --tiny --quick         # a smoke run on tiny random weights

Identities come from identities.txt (licence-clean photos in this repository) unless --faces names a folder
(e.g. ConsisID's eval faces); prompts from prompts.txt; seeds 1, 2, 3. Videos go to OUT/videos in the
layout `eval` reads, the report to OUT/report. Arguments this script does not know are passed to
`idanimator generate` (e.g. --backbone, --steps, --offload). Run it again to resume: finished videos are kept,
only the missing ones are made.

On every GPU of a node, one process each (the videos are split between them; eval runs once, on the main
process, after all are written):

    torchrun --nproc_per_node 8 benchmarks/protocol/run.py --out runs/protocol
    accelerate launch --num_processes 8 benchmarks/protocol/run.py --out runs/protocol
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROMPTS = HERE / "prompts.txt"
IDENTITIES = HERE / "identities.txt"
SEEDS = "1,2,3"
QUICK = ["--frames", "4", "--steps", "1", "--height", "64", "--width", "64"]  # with --tiny: seconds on a CPU
TABLE_KEYS = ("FaceSim-Arc", "FaceSim-Cur", "FaceSim-dlib", "CLIPScore", "CLIPDist", "DynamicDegree")


def identity_photos() -> list[Path]:
    photos = []
    for line in IDENTITIES.read_text(encoding="utf-8").splitlines():
        path = line.split("#", 1)[0].strip()
        if path:
            photos.append(ROOT / path)
    return photos


def faces_folder(out: Path, faces: Path | None) -> Path:
    """The folder `generate` and `eval` read the identities from: --faces as given, else copies of the
    repository's photos in OUT/faces (named by their file names)."""
    if faces is not None:
        return faces
    folder = out / "faces"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in identity_photos():
        if not (folder / photo.name).is_file():
            shutil.copyfile(photo, folder / photo.name)
    return folder


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the run's folder (videos/, report/, faces/)")
    parser.add_argument(
        "--faces", type=Path, default=None, help="a folder of reference photos (default: identities.txt)"
    )
    parser.add_argument("--seeds", default=SEEDS, help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 prompts, 1 seed, 4 tiny frames: a smoke run")
    parser.add_argument("--detector", default="auto", choices=["auto", "insightface", "retinaface"])
    parser.add_argument("--device", default=None, help="for generate and eval (default: cuda when available)")
    parser.add_argument("--metrics", default="all", help="passed to eval")
    parser.add_argument("--clip", default=None, help="passed to eval (default: the Hugging Face cache)")
    parser.add_argument("--curricularface", default=None, help="passed to eval: CurricularFace IR-101 weights")
    parser.add_argument("--insightface-root", default=None, help="passed to eval: holds models/PACK")
    parser.add_argument("--arcface-pack", default=None, help="passed to eval (default: buffalo_l, as ConsisID)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from idanimator.batch import process_state
    from idanimator.cli import main as idanimator

    args, generate_extra = parse(argv)
    out = args.out.expanduser()
    state = process_state()  # None with one process; with several (torchrun), accelerate's PartialState
    main_process = state is None or state.is_main_process
    # Files every process reads are written once, by the main process, before the others read them.
    faces = faces_folder(out, args.faces) if main_process else (args.faces or out / "faces")
    prompts, seeds = PROMPTS, args.seeds
    if args.quick:
        lines = [line for line in PROMPTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
        prompts = out / "prompts-quick.txt"
        if main_process:
            prompts.write_text("\n".join(lines[:2]) + "\n")
        seeds = seeds.split(",")[0]
        generate_extra = QUICK + generate_extra
    if state is not None:
        state.wait_for_everyone()
    device = ["--device", args.device] if args.device else []
    generate = ["generate", "--faces-dir", str(faces), "--prompts", str(prompts), "--seeds", seeds]
    generate += ["--out-dir", str(out / "videos"), "--detector", args.detector, *device, *generate_extra]
    code = idanimator(generate)  # with several processes: each makes its share, then all wait for each other
    if code or not main_process:
        return code
    evaluate = ["eval", "--videos", str(out / "videos"), "--faces", str(faces), "--out", str(out / "report")]
    evaluate += ["--detector", args.detector, "--metrics", args.metrics, *device]
    for flag in ("clip", "curricularface", "insightface_root", "arcface_pack"):
        if getattr(args, flag):
            evaluate += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    code = idanimator(evaluate)
    if code:
        return code
    summary = json.loads((out / "report" / "summary.json").read_text())
    print("\nREADME row (" + " | ".join(TABLE_KEYS) + "):")
    print(readme_row(summary))
    return 0


def readme_row(summary: dict) -> str:
    """The row for README's results table: each number, and what measured it (the ArcFace pack and its
    recognition weights, the face detector), since packs and detectors give different numbers."""
    setup = summary["setup"]
    cells = ["n/a" if summary.get(k) is None else f"{summary[k]:.3g}" for k in TABLE_KEYS]
    if setup.get("arcface_pack") and "FaceSim-Arc" in TABLE_KEYS and summary.get("FaceSim-Arc") is not None:
        index = TABLE_KEYS.index("FaceSim-Arc")
        cells[index] += f" ({setup['arcface_pack']})"
    measured_by = []
    if setup.get("arcface_pack"):
        measured_by.append(f"ArcFace {setup['arcface_pack']} {setup.get('arcface_weights') or '(not loaded)'}")
    if setup.get("face_detector"):
        measured_by.append(f"faces: {setup['face_detector'].split(', from ')[0]}")
    what = "; ".join([f"{summary['counts']['measured']} videos", *measured_by])
    return f"| idanimator, this protocol ({what}) | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
