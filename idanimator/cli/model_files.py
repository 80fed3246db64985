"""`download`, `convert-checkpoint`, `make-tiny`, `backbones`: the weights and the tiny kit."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .. import registry
from ..errors import IDAnimatorError
from ..request import CONTROL_KINDS


def _download(args: argparse.Namespace) -> int:
    from ..weights import describe, parse_source, resolve

    names = list(registry.BACKBONES) if args.all_backbones else args.backbone or [registry.DEFAULT_BACKBONE]
    # Every name is checked (a registry name, a Hub id owner/name or a local path) before anything is fetched.
    backbones = [(f"backbone {name}", parse_source(name)) for name in names]
    wanted = [
        ("face adapter", registry.FACE_ADAPTER),
        ("motion adapter", registry.MOTION_ADAPTER),
        ("image encoder", registry.IMAGE_ENCODER),
        ("SD1.5 base model", registry.BASE_MODEL),
        *backbones,
    ]
    if args.fast:
        wanted.append(("fast mode (AnimateLCM)", registry.ANIMATELCM))
    if args.control:
        wanted += [(f"{kind} control model", registry.CONTROL_MODELS[kind]) for kind in args.control]
    for what, source in wanted:
        print(f"{what}: {describe(source)}")
        print(f"  -> {resolve(source, what=what, command='download')}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..adapter import load_face_adapter_weights, save_face_adapter_weights

    # Cheap checks first: the output must be a new .safetensors name, not the input itself.
    if args.output.suffix.lower() != ".safetensors":
        raise IDAnimatorError(
            f"convert-checkpoint writes a .safetensors file, so the output {args.output} must end in .safetensors."
        )
    if args.output.expanduser().resolve() == args.input.expanduser().resolve():
        raise IDAnimatorError(f"The output {args.output} is the input file itself; give another output name.")
    if args.output.is_dir():
        raise IDAnimatorError(f"The output {args.output} is a folder; give a file name ending in .safetensors.")
    replacing = args.output.exists()
    if replacing and not args.force:
        raise IDAnimatorError(f"The output {args.output} already exists; add --force to replace it.")
    weights = load_face_adapter_weights(args.input)
    out = save_face_adapter_weights(weights, args.output)
    print(
        f"{'replaced' if replacing else 'wrote'} {out} ({len(weights.image_proj)} image_proj + "
        f"{len(weights.face_adapter)} face_adapter tensors, {weights.num_parameters():,} parameters)"
    )
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from ..tiny import build_tiny_kit

    if (args.dir / "kit.json").is_file() and not args.force:
        print(f"A tiny kit is already in {args.dir}; nothing was rebuilt (--force rebuilds it).")
    for name, path in build_tiny_kit(args.dir, force=args.force).items():
        print(f"{name}: {path}")
    print(f"use it (without --tiny, which uses its own kit): python -m idanimator generate {tiny_kit_flags(args.dir)}")
    return 0


def tiny_kit_flags(kit: Path) -> str:
    """The generate flags that load the tiny kit in ``kit`` (the sizes the tiny models make in seconds)."""
    parts = {"backbone": "base", "adapter": "animator.ckpt", "motion-adapter": "motion-adapter"}
    parts["image-encoder"] = "image-encoder"
    flags = " ".join(f"--{flag} {shlex.quote(str(kit / name))}" for flag, name in parts.items())
    return f"{flags} --height 64 --width 64 --frames 8 --steps 4 --face PHOTO --prompt TEXT --out OUT.mp4"


def _backbones(args: argparse.Namespace) -> int:
    from ..weights import describe

    for name, backbone in registry.BACKBONES.items():
        default = " (default)" if name == registry.DEFAULT_BACKBONE else ""
        print(f"{name}{default}: {backbone.label} - {describe(backbone.source)}, {backbone.size}, {backbone.licence}")
    return 0


def add_parser(sub) -> None:
    dl = sub.add_parser("download", help="prefetch the weights into the Hugging Face cache")
    dl.add_argument("--backbone", action="append", help="a backbone to fetch (default: the release's)")
    dl.add_argument("--all-backbones", action="store_true")
    dl.add_argument("--fast", action="store_true", help="also the fast mode's AnimateLCM (about 1.9 GB)")
    dl.add_argument("--control", action="append", choices=CONTROL_KINDS, help="also a control's model (repeatable)")
    dl.set_defaults(run=_download)

    conv = sub.add_parser("convert-checkpoint", help="write animator.ckpt as a .safetensors file")
    conv.add_argument("input", type=Path)
    conv.add_argument("output", type=Path)
    conv.add_argument("--force", action="store_true", help="replace the output if it exists")
    conv.set_defaults(run=_convert)

    tiny = sub.add_parser(
        "make-tiny",
        help="build the tiny random model kit in a new or empty folder",
        description="Build the tiny random model kit in DIR: a new folder, an empty one, or an existing kit (a "
        "folder holding its kit.json). A folder holding anything else is refused and left untouched.",
    )
    tiny.add_argument("dir", type=Path, metavar="DIR", help="a new or empty folder, or an existing kit")
    tiny.add_argument("--force", action="store_true", help="rebuild the kit already in DIR (only a kit is replaced)")
    tiny.set_defaults(run=_make_tiny)

    bb = sub.add_parser("backbones", help="list the registry's community backbones")
    bb.set_defaults(run=_backbones)
