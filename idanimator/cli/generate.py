"""`generate`: one video, or a batch (photos x prompts x seeds) in the layout `eval` reads.

Every MP4 carries the settings that made it; ``--settings-from VIDEO`` makes a request from them, where the
flags typed on the command line win (the parser remembers which were typed: ``args.given``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import registry, settings
from ..console import interactive, quiet_loading_bars, step_lines
from ..errors import IDAnimatorError, InvalidRequestError
from ..prompts import DEFAULT_NEGATIVE_PROMPT
from ..request import CONTROL_KINDS
from .common import DETECTORS, HelpWithDefaults

_BATCH_FLAGS = ("faces_dir", "prompts", "out_dir")


def _generate(args: argparse.Namespace) -> int:
    if any(getattr(args, flag) is not None for flag in _BATCH_FLAGS):
        return _generate_batch(args)
    if args.face is None or (args.prompt is None and args.settings_from is None) or args.out is None:
        raise IDAnimatorError(
            "generate needs --face, --prompt and --out (or --faces-dir, --prompts and --out-dir for a batch)."
        )
    from ..video import check_output_path

    # Cheap checks first: a bad setting, output path or photo, or weights that cannot be had, are reported before
    # torch, diffusers or any model loads.
    request = _check_loras(request_from_args(args).validate())
    check_output_path(args.out)
    _check_weights(args)

    from ..face import crop_face, get_detector
    from ..service import out_of_memory_guard

    quiet_loading_bars()
    detector = get_detector(args.detector)
    crops = [crop_face(face, detector) for face in args.face]
    pipe = _load_pipeline(args, detector)
    with out_of_memory_guard():
        result = pipe.denoise(crops, request, callback=None if interactive() else step_lines("denoising"))
        out = _write_video(pipe, result.latents, args.out, result.request)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"seed: {result.seed}")
    print(f"wrote {out}")
    return 0


def _write_video(pipe, latents, out: Path, request) -> Path:
    """Decode and write the video; an MP4 a few frames at a time, so a long video never sits in memory whole,
    carrying ``request``'s settings (the request as run: with its seed)."""
    from ..extras.longvideo import decode_in_chunks
    from ..video import Mp4Writer, save_video

    if out.suffix.lower() != ".mp4":
        return save_video(pipe.decode(latents), out, fps=request.fps)
    with Mp4Writer(out, fps=request.fps, settings=request.settings()) as writer:
        for chunk in decode_in_chunks(pipe, latents):
            writer.write(chunk)
    return writer.path


def request_from_args(args: argparse.Namespace, **changes):
    """The request the flags ask for, by field name (not validated yet): each flag's ``dest`` is the field it
    sets. With --settings-from, a setting whose flag was not typed is the video's. Steps and guidance given
    nowhere are the release's, or the fast mode's own with --fast (a video's are kept unless --fast changed)."""
    from ..request import ControlSpec, GenerationRequest, KeyFrame, LoraSpec

    saved = _saved_settings(getattr(args, "settings_from", None))
    given = getattr(args, "given", frozenset())

    def value(dest: str, key: str | None = None):
        key = key or dest
        return saved[key] if key in saved and dest not in given else getattr(args, dest)

    names = [n for n in GenerationRequest.__dataclass_fields__ if hasattr(args, n) and n not in ("control", "loras")]
    fields = {name: value(name) for name in names}
    fast = bool(fields.get("fast"))
    if saved and bool(saved.get("fast")) != fast:  # --fast typed: its own steps and guidance, not the video's
        own = ("num_inference_steps", "guidance_scale")
        fields.update({name: getattr(args, name) for name in own if name not in given})
    if fields.get("num_inference_steps") is None:
        fields["num_inference_steps"] = settings.FAST_STEPS if fast else settings.STEPS.default
    if fields.get("guidance_scale") is None:
        fields["guidance_scale"] = settings.FAST_GUIDANCE if fast else settings.GUIDANCE.default
    kind = value("control")
    if kind is not None:
        if "control" not in given and not (args.control_image or args.control_video):
            what = "keyframes (--control-image)" if kind.startswith("sparse") else "driving video (--control-video)"
            raise InvalidRequestError(
                f"The video {args.settings_from.name} was made with the {kind} control; give its {what} again, "
                "which a video does not carry."
            )
        keyframes = tuple(KeyFrame.parse(text) for text in args.control_image or ())
        strength = value("control_strength")
        strength = args.control_strength if strength is None else strength
        fields["control"] = ControlSpec(kind, keyframes, args.control_video, strength)
    elif args.control_image or args.control_video:
        raise IDAnimatorError("--control-image and --control-video need --control KIND.")
    if "loras" in saved and "lora" not in given:
        fields["loras"] = _saved_loras(saved["loras"], args.settings_from)
    else:
        fields["loras"] = tuple(LoraSpec.parse(text) for text in args.lora or ())
    fields["backbone"] = fields.get("backbone") or ""
    return GenerationRequest(**{**fields, **changes})


def _saved_settings(video: Path | None) -> dict:
    """The settings ``video`` carries ({} without --settings-from); a sentence for a video without them."""
    if video is None:
        return {}
    from ..video import read_settings

    return read_settings(video, required=True)


def _saved_loras(saved, video: Path) -> tuple:
    from ..request import LoraSpec

    try:
        return tuple(LoraSpec(str(lora["source"]), float(lora["weight"])) for lora in saved or ())
    except (TypeError, KeyError, ValueError):
        raise InvalidRequestError(f"The LoRAs recorded in the video {video.name} cannot be read.") from None


def _check_weights(args: argparse.Namespace) -> None:
    """Every weight this run will load is on disk, cached, or downloadable: checked in a second, before torch
    and diffusers are imported (the tiny kit is built locally, so --tiny needs no check)."""
    if args.tiny:
        return
    from ..registry import HubFolder
    from ..weights import check_available, parse_source

    backbone = args.backbone or registry.DEFAULT_BACKBONE
    parts = [
        (args.adapter or registry.FACE_ADAPTER, "face adapter"),
        (args.motion_adapter or registry.MOTION_ADAPTER, "motion adapter"),
        (args.image_encoder or registry.IMAGE_ENCODER, "image encoder"),
        (backbone, "backbone"),
    ]
    source = parse_source(backbone)
    complete = isinstance(source, Path) and all((source / s).is_dir() for s in ("vae", "text_encoder", "tokenizer"))
    if not complete and not isinstance(source, HubFolder):  # a Hub folder's parts are known only once fetched
        parts.append((args.base or registry.BASE_MODEL, "SD1.5 base model"))
    if args.fast:
        parts.append((args.fast_weights or registry.ANIMATELCM, "fast mode's AnimateLCM"))
    if args.control and not args.control_model:
        parts.append((registry.CONTROL_MODELS[args.control], f"{args.control} control model"))
    elif args.control:
        parts.append((args.control_model, f"{args.control} control model"))
    check_available(parts, command="generate")


def _check_loras(request):
    """A LoRA file that is missing (or a pickle) is refused before anything loads; Hub ids are checked later."""
    from ..extras.lorafiles import check_source

    for lora in request.loras:
        check_source(lora.source)
    return request


def _generate_batch(args: argparse.Namespace) -> int:
    from ..batch import (
        face_photos,
        parse_seeds,
        plan,
        process_state,
        read_prompts,
        remove_partials,
        run_batch,
        share_of,
        still_to_make,
        write_manifest,
    )

    if any(getattr(args, flag) is not None for flag in ("face", "prompt", "out", "seed")):
        raise IDAnimatorError("A batch (--faces-dir, --prompts, --out-dir) takes no --face, --prompt, --out or --seed.")
    missing = [f"--{flag.replace('_', '-')}" for flag in _BATCH_FLAGS if getattr(args, flag) is None]
    if missing:
        raise IDAnimatorError(f"A batch also needs {' and '.join(missing)}.")
    # Cheap checks first: every prompt, setting and photo is checked before the model loads.
    prompts = read_prompts(args.prompts)
    requests = [request_from_args(args, prompt=prompt, seed=None).validate() for prompt in prompts]
    request = _check_loras(requests[0])
    jobs = plan(face_photos(args.faces_dir), prompts, parse_seeds(args.seeds))
    todo = still_to_make(jobs, args.out_dir, args.overwrite)
    # Several processes (torchrun / accelerate launch, e.g. one per GPU): each makes its own share of the videos;
    # the partial files and the manifest are handled once, by the main process, before any video is written.
    state = process_state()
    main = state is None or state.is_main_process
    if main:
        remove_partials(jobs, args.out_dir)
        write_manifest(jobs, request, args.out_dir)
    mine = share_of(state, todo)
    if state is not None:
        state.wait_for_everyone()
        if state.device.type == "cuda" and args.device in (None, "cuda"):
            args.device = str(state.device)  # this process's own GPU
        names = f": {', '.join(job.name for job in mine)}" if mine else ""
        print(f"process {state.process_index} of {state.num_processes}: {len(mine)} of {len(todo)} videos{names}")
    if mine:
        _check_weights(args)
        from ..face import crop_face, get_detector

        quiet_loading_bars()
        detector = get_detector(args.detector)
        crops = {photo: crop_face(photo, detector) for photo in dict.fromkeys(job.face for job in mine)}
        run_batch(_load_pipeline(args, detector), mine, crops, request, args.out_dir)
    if state is not None:
        state.wait_for_everyone()  # every share written before the main process reports (and eval reads)
    if main:
        kept = len(jobs) - len(todo)
        kept_note = f", kept {kept} already there (--overwrite makes them anew)" if kept else ""
        print(f"wrote {len(todo)} videos to {args.out_dir}{kept_note}")
    return 0


def _load_pipeline(args: argparse.Namespace, detector):
    import torch

    from ..pipeline import IDAnimatorPipeline

    dtype = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = IDAnimatorPipeline.from_pretrained(
        args.backbone,
        face_adapter=args.adapter,
        motion_adapter=args.motion_adapter,
        image_encoder=args.image_encoder,
        base=args.base,
        device=args.device,
        torch_dtype=dtype,
        offload=args.offload,
        tiny=args.tiny,
        detector=detector,
        fast_weights=args.fast_weights,
        control_models={args.control: args.control_model} if args.control_model and args.control else None,
    )
    if pipe.pipe._execution_device.type == "cpu" and not args.tiny:
        print("note: running on the CPU; a full-size video takes a long time.", file=sys.stderr)
    if not interactive():  # in a log, plain lines instead of diffusers' bar (its redraws leave escape codes)
        pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


def _remembering(action_class: type) -> type:
    """``action_class`` that also adds its ``dest`` to ``namespace.given`` when its flag is typed, so a typed
    value is told from a default even where the two are equal."""

    class Remembering(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}
            super().__call__(parser, namespace, values, option_string)

    return Remembering


def add_parser(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="make a video of the person in the photo(s)",
        formatter_class=HelpWithDefaults,
    )
    for name in (None, "store", "store_true", "store_false", "append"):  # before any flag is added
        gen.register("action", name, _remembering(gen._registry_get("action", name)))
    gen.set_defaults(given=frozenset())
    gen.add_argument(
        "--face",
        action="append",
        metavar="PHOTO",
        help="a photo of the face; repeat to mix several photos into one identity",
    )
    gen.add_argument("--prompt")  # each flag's dest is the GenerationRequest field it sets
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
    for flag, dest, limit in (
        ("--frames", "num_frames", settings.FRAMES),
        ("--steps", "num_inference_steps", settings.STEPS),
        ("--guidance", "guidance_scale", settings.GUIDANCE),
        ("--id-scale", "id_scale", settings.ID_SCALE),
        ("--height", "height", settings.HEIGHT),
        ("--width", "width", settings.WIDTH),
        ("--fps", "fps", settings.FPS),
    ):
        kind = int if limit.whole else float
        fast = {"num_inference_steps": settings.FAST_STEPS, "guidance_scale": settings.FAST_GUIDANCE}.get(dest)
        gen.add_argument(
            flag,
            dest=dest,
            type=kind,
            default=None if fast is not None else limit.default,
            metavar="N" if limit.whole else "X",
            help=f"{limit.low:g}-{limit.high:g}"
            + (f" (default: {limit.default:g}; {fast:g} with --fast)" if fast is not None else ""),
        )
    gen.add_argument(
        "--no-prompt-suffix",
        dest="add_prompt_suffix",
        action="store_false",
        help="do not append the release's quality words to the prompts",
    )
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    gen.add_argument("--offload", choices=settings.OFFLOAD_MODES, default="none")
    gen.add_argument("--detector", choices=DETECTORS, default="auto")
    gen.add_argument("--tiny", action="store_true", help="use tiny random weights (offline smoke test)")
    gen.add_argument(
        "--settings-from",
        type=Path,
        metavar="VIDEO",
        help="reuse the settings an MP4 made here carries (prompt, seed, sizes, steps, options...); "
        "flags typed as well win. The face photo is not stored: give --face",
    )
    more = gen.add_argument_group("beyond the release", "each works with the face adapter on")
    more.add_argument("--fast", action="store_true", help="AnimateLCM: 4-8 steps instead of 30")
    more.add_argument("--fast-weights", metavar="DIR", help="a local AnimateLCM folder (default: the registry's)")
    more.add_argument("--free-init", action="store_true", help="FreeInit: steadier motion, 3x the denoising time")
    more.add_argument(
        "--lora", action="append", metavar="PATH_OR_ID[:WEIGHT]", help="a style LoRA for SD1.5 (repeatable)"
    )
    more.add_argument("--control", choices=CONTROL_KINDS, help="structure control: keyframes or a driving video")
    more.add_argument(
        "--control-image", action="append", metavar="PATH[@FRAME]", help="a SparseCtrl keyframe (repeatable)"
    )
    more.add_argument("--control-video", metavar="PATH", help="the driving video of openpose, depth or canny")
    more.add_argument("--control-model", metavar="DIR", help="the control's model folder (default: the registry's)")
    more.add_argument(
        "--control-strength", type=float, default=settings.CONTROL_STRENGTH.default, metavar="X", help="0-2"
    )
    batch = gen.add_argument_group(
        "batch mode", "every photo x every prompt x every seed, written as OUT_DIR/FACE--pNN--sSEED.mp4 + .txt"
    )
    batch.add_argument("--faces-dir", type=Path, metavar="DIR", help="a folder of face photos (one identity each)")
    batch.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt a line (# comments), or a JSON list")
    batch.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds")
    batch.add_argument("--out-dir", type=Path, metavar="DIR", help="the videos folder (what eval --videos reads)")
    batch.add_argument("--overwrite", action="store_true", help="make videos already in --out-dir anew")
    gen.set_defaults(run=_generate)
