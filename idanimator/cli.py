"""`python -m idanimator <command>`: generate, eval, build-dataset, download, convert-checkpoint, make-tiny, backbones.

The CLI only parses arguments and translates library errors into one line on stderr and a non-zero
exit status; all the work is in the library.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from . import registry
from . import settings as limits
from .console import quiet_libraries, quiet_loading_bars
from .errors import IDAnimatorError
from .prompts import DEFAULT_NEGATIVE_PROMPT
from .settings import OFFLOAD_MODES

_BATCH_FLAGS = ("faces_dir", "prompts", "out_dir")


def _generate(args: argparse.Namespace) -> int:
    if any(getattr(args, flag) is not None for flag in _BATCH_FLAGS):
        return _generate_batch(args)
    if args.face is None or args.prompt is None or args.out is None:
        raise IDAnimatorError(
            "generate needs --face, --prompt and --out (or --faces-dir, --prompts and --out-dir for a batch)."
        )
    from .settings import GenerationSettings
    from .video import check_output_path, save_video

    # Cheap checks first: a bad setting, output path or photo is reported before any model loads.
    settings = GenerationSettings.taken_from(args).validate()
    fps = limits.FPS.check(args.fps)
    check_output_path(args.out)

    from .face import crop_face, get_detector
    from .service import out_of_memory_guard

    quiet_loading_bars()
    detector = get_detector(args.detector)
    crops = [crop_face(face, detector) for face in args.face]
    pipe = _load_pipeline(args, detector)
    with out_of_memory_guard():
        result = pipe(crops, **settings.as_dict())
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = save_video(result.frames, args.out, fps=fps)
    print(f"seed: {result.seed}")
    print(f"wrote {out}")
    return 0


def _generate_batch(args: argparse.Namespace) -> int:
    from .eval.batch import face_photos, parse_seeds, plan, read_prompts, run_batch, still_to_make, write_manifest
    from .settings import GenerationSettings

    if any(getattr(args, flag) is not None for flag in ("face", "prompt", "out", "seed")):
        raise IDAnimatorError("A batch (--faces-dir, --prompts, --out-dir) takes no --face, --prompt, --out or --seed.")
    missing = [f"--{flag.replace('_', '-')}" for flag in _BATCH_FLAGS if getattr(args, flag) is None]
    if missing:
        raise IDAnimatorError(f"A batch also needs {' and '.join(missing)}.")
    # Cheap checks first: every prompt, setting and photo is checked before the model loads.
    prompts = read_prompts(args.prompts)
    base = GenerationSettings.taken_from(args)
    settings = [replace(base, prompt=prompt, seed=None).validate() for prompt in prompts][0]
    fps = limits.FPS.check(args.fps)
    jobs = plan(face_photos(args.faces_dir), prompts, parse_seeds(args.seeds))
    todo = still_to_make(jobs, args.out_dir, args.overwrite)
    write_manifest(jobs, settings, args.out_dir, fps)
    if todo:
        from .face import crop_face, get_detector

        quiet_loading_bars()
        detector = get_detector(args.detector)
        crops = {photo: crop_face(photo, detector) for photo in dict.fromkeys(job.face for job in todo)}
        run_batch(_load_pipeline(args, detector), todo, crops, settings, args.out_dir, fps=fps)
    kept = len(jobs) - len(todo)
    kept_note = f", kept {kept} already there (--overwrite makes them anew)" if kept else ""
    print(f"wrote {len(todo)} videos to {args.out_dir}{kept_note}")
    return 0


def _load_pipeline(args: argparse.Namespace, detector):
    import torch

    from .pipeline import IDAnimatorPipeline

    dtype = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = IDAnimatorPipeline.from_pretrained(
        args.backbone,
        face_adapter=args.adapter,
        motion_adapter=args.motion_adapter,
        image_encoder=args.image_encoder,
        base=args.base,
        device=args.device,
        dtype=dtype,
        offload=args.offload,
        tiny=args.tiny,
        detector=detector,
    )
    if pipe.pipe._execution_device.type == "cpu" and not args.tiny:
        print("note: running on the CPU; a full-size video takes a long time.", file=sys.stderr)
    return pipe


CLIP_DEFAULT = f"{registry.EVAL_CLIP.repo_id} from the Hugging Face cache"


def _eval(args: argparse.Namespace) -> int:
    from .eval.clipmetrics import check_clip_folder
    from .eval.runner import EvalOptions, evaluate
    from .eval.spec import parse_metrics

    # Cheap checks first: a misspelt metric or path is reported before any model loads.
    metrics = parse_metrics(args.metrics)
    if args.clip is not None:
        check_clip_folder(args.clip)
    for flag, path in (("--curricularface", args.curricularface), ("--insightface-root", args.insightface_root)):
        if path is not None and not path.expanduser().exists():
            raise IDAnimatorError(f"The path given to {flag}, {path}, does not exist.")
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
    for key in summary["columns"]:
        value = summary[key]
        print(f"{key:<18} {'n/a' if value is None else format(value, '.4g')}")
    counts = summary["counts"]
    print(f"measured {counts['measured']} of {counts['videos']} videos; wrote {args.out / 'summary.json'}")
    if counts["measured"] == 0:
        raise IDAnimatorError(f"None of the {counts['videos']} videos could be read; see the warnings above.")
    return 0


def _download(args: argparse.Namespace) -> int:
    from .weights import describe, resolve

    wanted = [
        ("face adapter", registry.FACE_ADAPTER),
        ("motion adapter", registry.MOTION_ADAPTER),
        ("image encoder", registry.IMAGE_ENCODER),
        ("SD1.5 base model", registry.BASE_MODEL),
    ]
    names = list(registry.BACKBONES) if args.all_backbones else args.backbone or [registry.DEFAULT_BACKBONE]
    wanted += [(f"backbone {name}", name) for name in names]
    for what, source in wanted:
        shown = describe(source if not isinstance(source, str) else registry.BACKBONES[source].source)
        print(f"{what}: {shown}")
        print(f"  -> {resolve(source, what=what)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .adapter import load_face_adapter_weights, save_face_adapter_weights

    weights = load_face_adapter_weights(args.input)
    out = save_face_adapter_weights(weights, args.output)
    print(
        f"wrote {out} ({len(weights.image_proj)} image_proj + {len(weights.face_adapter)} face_adapter tensors, "
        f"{weights.num_parameters():,} parameters)"
    )
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .testing import build_tiny_kit

    if (args.dir / "kit.json").is_file() and not args.force:
        print(f"A tiny kit is already in {args.dir}; nothing was rebuilt (--force rebuilds it).")
    for name, path in build_tiny_kit(args.dir, force=args.force).items():
        print(f"{name}: {path}")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from .weights import describe

    for name, backbone in registry.BACKBONES.items():
        default = " (default)" if name == registry.DEFAULT_BACKBONE else ""
        print(f"{name}{default}: {backbone.label} - {describe(backbone.source)}, {backbone.size}, {backbone.licence}")
    return 0


def _build_dataset(args: argparse.Namespace) -> int:
    from .data.build import BuildOptions, build_dataset

    fields = ("labels", "captioner", "rewriter", "workers", "faces_per_clip", "detector")
    options = BuildOptions(**{name: getattr(args, name) for name in fields}, progress=not args.no_progress)
    print(build_dataset(args.videos, args.out, options).summary())
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.config import TrainConfig
    from .training.loop import train

    train(TrainConfig.from_namespace(args))
    return 0


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the empty ones (a required flag's None, an off switch's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or not action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idanimator",
        description="One face photo and a prompt: a short video of that person (ID-Animator). "
        "Run 'idanimator COMMAND --help' (or 'python -m idanimator COMMAND --help') for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="make a video of the person in the photo(s)",
        formatter_class=_HelpWithDefaults,
    )
    gen.add_argument(
        "--face",
        action="append",
        metavar="PHOTO",
        help="a photo of the face; repeat to mix several photos into one identity",
    )
    gen.add_argument("--prompt")
    gen.add_argument(
        "--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help="the release's by default: %(default).48s..."
    )
    gen.add_argument("--out", type=Path, help=".mp4, .gif, or a folder for PNG frames")
    gen.add_argument(
        "--backbone",
        default=None,
        help=f"a registry name ({', '.join(registry.BACKBONES)}; default {registry.DEFAULT_BACKBONE}), "
        "a Hub id, or a local folder/file",
    )
    gen.add_argument("--adapter", default=None, help="face adapter: animator.ckpt or .safetensors path")
    gen.add_argument("--motion-adapter", default=None, help="diffusers MotionAdapter folder or Hub id")
    gen.add_argument("--image-encoder", default=None, help="CLIP vision folder or Hub id")
    gen.add_argument("--base", default=None, help="SD1.5 diffusers folder (configs for single-file backbones)")
    gen.add_argument("--seed", type=int, default=None, help="default: a random seed, printed")
    for flag, dest, limit in (  # dest: the GenerationSettings field each flag sets
        ("--frames", "num_frames", limits.FRAMES),
        ("--steps", "steps", limits.STEPS),
        ("--guidance", "guidance_scale", limits.GUIDANCE),
        ("--id-scale", "id_scale", limits.ID_SCALE),
        ("--height", "height", limits.HEIGHT),
        ("--width", "width", limits.WIDTH),
        ("--fps", "fps", limits.FPS),
    ):
        kind = int if limit.whole else float
        gen.add_argument(
            flag,
            dest=dest,
            type=kind,
            default=limit.default,
            metavar="N" if limit.whole else "X",
            help=f"{limit.low:g}-{limit.high:g}",
        )
    gen.add_argument(
        "--no-prompt-suffix",
        dest="add_prompt_suffix",
        action="store_false",
        help="do not append the release's quality words to the prompts",
    )
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    gen.add_argument("--offload", choices=OFFLOAD_MODES, default="none")
    gen.add_argument("--detector", choices=["auto", "insightface", "retinaface"], default="auto")
    gen.add_argument("--tiny", action="store_true", help="use tiny random weights (offline smoke test)")
    batch = gen.add_argument_group(
        "batch mode", "every photo x every prompt x every seed, written as OUT_DIR/FACE--pNN--sSEED.mp4 + .txt"
    )
    batch.add_argument("--faces-dir", type=Path, metavar="DIR", help="a folder of face photos (one identity each)")
    batch.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt a line (# comments), or a JSON list")
    batch.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds")
    batch.add_argument("--out-dir", type=Path, metavar="DIR", help="the videos folder (what eval --videos reads)")
    batch.add_argument("--overwrite", action="store_true", help="make videos already in --out-dir anew")
    gen.set_defaults(run=_generate)

    ev = sub.add_parser(
        "eval",
        help="measure videos: identity, prompt and motion metrics (ConsisID's protocol)",
        formatter_class=_HelpWithDefaults,
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
        choices=["auto", "insightface", "retinaface"],
        default="auto",
        help="finds the faces for every face metric (auto: insightface's buffalo_l when installed)",
    )
    ev.add_argument(
        "--clip", type=Path, default=None, metavar="DIR", help="a CLIP folder (default: " + CLIP_DEFAULT + ")"
    )
    ev.add_argument("--curricularface", type=Path, default=None, metavar="FILE", help="CurricularFace IR-101 weights")
    ev.add_argument(
        "--insightface-root", type=Path, default=None, metavar="DIR", help="holds models/antelopev2 or models/buffalo_l"
    )
    ev.add_argument(
        "--arcface-pack", choices=["antelopev2", "buffalo_l"], default=None, help="default: antelopev2, else buffalo_l"
    )
    ev.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="a JSON {name: prompt} file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(run=_eval)

    ds = sub.add_parser(
        "build-dataset",
        help="cut videos into clips with face pools and captions, listed in OUT/manifest.jsonl (for training)",
        formatter_class=_HelpWithDefaults,
        description="Resumable: a re-run skips finished videos and clips. --labels: CelebV-HQ's celebvhq_info.json, "
        "JSON {NAME: {appearance, action, emotion, identity}} or CSV with a name column (NAME: file name without "
        "suffix). A URL back end is OpenAI-compatible (URL#MODEL; key in OPENAI_API_KEY).",
    )
    ds.add_argument("--videos", required=True, type=Path, metavar="DIR", help="a folder of videos (searched deeply)")
    ds.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the data set is written")
    ds.add_argument("--labels", type=Path, metavar="FILE", help="per-video appearance/action/emotion labels")
    ds.add_argument("--captioner", default="template", help="template, an image-text-to-text model, or a URL")
    ds.add_argument("--rewriter", default="template", help="template, or a URL")
    ds.add_argument("--workers", type=int, default=2, metavar="N", help="videos processed at once (threads)")
    ds.add_argument("--faces-per-clip", type=int, default=8, metavar="K", help="size of each clip's face pool")
    ds.add_argument("--detector", choices=["auto", "insightface", "retinaface"], default="auto")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(run=_build_dataset)

    from .training import config as training

    tr = sub.add_parser("train", help="train the face adapter on a dataset folder", formatter_class=_HelpWithDefaults)
    tr.add_argument("--data", required=True, type=Path, metavar="DIR", help="a dataset folder (manifest.jsonl)")
    tr.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoints, logs, validation videos")
    for name, kind, text in training.OPTIONS:  # types, defaults and help are defined with TrainConfig
        default, metavar = getattr(training.TrainConfig, name), {int: "N", float: "X"}.get(kind, "NAME")
        how = {"action": "store_true"} if kind is bool else {"type": kind, "default": default, "metavar": metavar}
        tr.add_argument("--" + name.replace("_", "-"), help=text, **how)
    tr.add_argument("--resume", nargs="?", const="latest", metavar="DIR", help="from --out's newest checkpoint, or DIR")
    tr.set_defaults(run=_train)

    dl = sub.add_parser("download", help="prefetch the weights into the Hugging Face cache")
    dl.add_argument("--backbone", action="append", help="a backbone to fetch (default: the release's)")
    dl.add_argument("--all-backbones", action="store_true")
    dl.set_defaults(run=_download)

    conv = sub.add_parser("convert-checkpoint", help="write animator.ckpt as a .safetensors file")
    conv.add_argument("input", type=Path)
    conv.add_argument("output", type=Path)
    conv.set_defaults(run=_convert)

    tiny = sub.add_parser("make-tiny", help="build the tiny random model kit in a folder")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--force", action="store_true")
    tiny.set_defaults(run=_make_tiny)

    bb = sub.add_parser("backbones", help="list the registry's community backbones")
    bb.set_defaults(run=_backbones)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        if args.command in {"make-tiny", "convert-checkpoint", "train"}:
            quiet_loading_bars()
        return args.run(args)
    except IDAnimatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
