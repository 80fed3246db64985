"""`python -m idanimator <command>`: generate, download, convert-checkpoint, make-tiny, backbones.

The CLI only parses arguments and translates library errors into one line on stderr and a non-zero
exit status; all the work is in the library.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import registry
from . import settings as limits
from .console import quiet_libraries, quiet_loading_bars
from .errors import IDAnimatorError
from .prompts import DEFAULT_NEGATIVE_PROMPT
from .settings import OFFLOAD_MODES


def _generate(args: argparse.Namespace) -> int:
    from .settings import GenerationSettings
    from .video import check_output_path, save_video

    # Cheap checks first: a bad setting, output path or photo is reported before any model loads.
    settings = GenerationSettings.taken_from(args).validate()
    fps = limits.FPS.check(args.fps)
    check_output_path(args.out)

    import torch

    from .face import crop_face, get_detector
    from .pipeline import IDAnimatorPipeline
    from .service import out_of_memory_guard

    quiet_loading_bars()
    detector = get_detector(args.detector)
    crops = [crop_face(face, detector) for face in args.face]

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
    with out_of_memory_guard():
        result = pipe(crops, **settings.as_dict())
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = save_video(result.frames, args.out, fps=fps)
    print(f"seed: {result.seed}")
    print(f"wrote {out}")
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
        required=True,
        metavar="PHOTO",
        help="a photo of the face; repeat to mix several photos into one identity",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT, help="the release's by default: %(default).48s..."
    )
    gen.add_argument("--out", required=True, type=Path, help=".mp4, .gif, or a folder for PNG frames")
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
    gen.set_defaults(run=_generate)

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
        if args.command in {"make-tiny", "convert-checkpoint"}:
            quiet_loading_bars()
        return args.run(args)
    except IDAnimatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
