"""`build-dataset` and `train`: the ID-oriented data set and random-reference training of the face adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DETECTORS, HelpWithDefaults


def _build_dataset(args: argparse.Namespace) -> int:
    from ..data.build import BuildOptions, build_dataset

    fields = ("labels", "captioner", "rewriter", "workers", "faces_per_clip", "detector", "shard")
    options = BuildOptions(**{name: getattr(args, name) for name in fields}, progress=not args.no_progress)
    print(build_dataset(args.videos, args.out, options).summary())
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..data.manifest import manifest_path
    from ..training.config import config_from_flags

    # Flags and paths (--data's manifest, a run already in --out, a resumed checkpoint's settings) are checked
    # first, so a mistake is reported at once instead of after the seconds torch, diffusers and accelerate take
    # to import. Options left out are None: a resumed run takes them from its checkpoint.
    config = config_from_flags(args)
    manifest_path(config.data)
    from ..console import quiet_loading_bars
    from ..training.train import train

    quiet_loading_bars()
    train(config)
    return 0


def add_parser(sub) -> None:
    ds = sub.add_parser(
        "build-dataset",
        help="cut videos into clips with face pools and captions, listed in OUT/manifest.jsonl (for training)",
        formatter_class=HelpWithDefaults,
        description="Resumable: a re-run skips finished videos and clips. --labels: CelebV-HQ's celebvhq_info.json, "
        "JSON {NAME: {appearance, action, emotion, identity}} or CSV with a name column (NAME: file name without "
        "suffix). A URL back end is OpenAI-compatible (URL#MODEL; key in OPENAI_API_KEY). Several machines: "
        "--shard I/N on each (I = 0..N-1, one shared --out), then one run without --shard writes the manifest.",
    )
    ds.add_argument("--videos", required=True, type=Path, metavar="DIR", help="a folder of videos (searched deeply)")
    ds.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the data set is written")
    ds.add_argument("--labels", type=Path, metavar="FILE", help="per-video appearance/action/emotion labels")
    ds.add_argument("--captioner", default="template", help="template, an image-text-to-text model, or a URL")
    ds.add_argument("--rewriter", default="template", help="template, or a URL")
    ds.add_argument("--workers", type=int, default=2, metavar="N", help="videos processed at once (threads)")
    ds.add_argument("--faces-per-clip", type=int, default=8, metavar="K", help="size of each clip's face pool")
    ds.add_argument("--detector", choices=DETECTORS, default="auto")
    ds.add_argument(
        "--shard", metavar="I/N", help="build only the I-th of N shares of the videos (I from 0), no manifest"
    )
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(run=_build_dataset)

    from ..training import config as training

    tr = sub.add_parser("train", help="train the face adapter on a dataset folder", formatter_class=HelpWithDefaults)
    tr.add_argument("--data", type=Path, metavar="DIR", help="a dataset folder (manifest.jsonl); --resume: the run's")
    tr.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoints, logs, validation videos")
    for name, kind, text in training.OPTIONS:  # types, defaults and help are defined with TrainConfig
        # No argparse default: a flag left out is None, so a resumed run can take its checkpoint's value.
        default, metavar = getattr(training.TrainConfig, name), {int: "N", float: "X"}.get(kind, "NAME")
        text += f" (default: {default})" if default not in (None, False) else ""
        how = {"action": "store_true", "default": None} if kind is bool else {"type": kind, "metavar": metavar}
        tr.add_argument("--" + name.replace("_", "-"), help=text, **how)
    tr.add_argument("--resume", nargs="?", const="latest", metavar="DIR", help="from --out's newest checkpoint, or DIR")
    tr.set_defaults(run=_train)
