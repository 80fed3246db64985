"""Real-size speed and memory benchmark: random weights of the real architecture, through the product's code.

Random weights time and weigh the same as trained ones, so nothing is downloaded. The parts are built
with the released shapes (SD1.5 UNet, VAE and CLIP-L text encoder; AnimateDiff v2 motion adapter; CLIP
ViT-H/14 image encoder; ID-Animator's face adapter), written in their real on-disk layouts (the backbone
as an fp16 diffusers folder and as an fp16 original-layout single file, as community backbones ship) into
a temporary folder removed at exit, and loaded back by ``idanimator.models`` exactly as real weights are.
Sections (all by default on CUDA; on a CPU only ``layout`` and ``cold-start``, unless named):

  layout       the face adapter's tensors and parameters against the release's (51 + 160, 61,817,856)
  cold-start   each stage of loading and building a pipeline, cold and on a backbone switch, with diffusers'
               ``UNetMotionModel.from_unet2d`` (before) and ours (after), alternating; ratios after/before
  speed        fp16 + SDPA, no offload: seconds per video (16 frames, 512x512, 30 steps), per denoising
               step, per UNet call and for the VAE decode
  floor        the UNet's FLOPs per step (torch.utils.flop_counter) over the card's measured fp16 matmul
               rate: the arithmetic floor, and the fraction of it achieved
  memory       peak GPU memory for each offload mode (none, model, sequential) at 16, 24 and 32 frames
  compile      (--compile) torch.compile'd UNet against the plain one, per UNet call
  channels-last (--channels-last) the UNet in channels-last memory format against the plain one

    python benchmarks/gpu.py --out results.json            # on a CUDA machine: everything, ~5-8 min on an H100
    python benchmarks/gpu.py --compile --channels-last --out results.json
    python benchmarks/gpu.py --device cpu                   # layout + cold start at real size (minutes)
    python benchmarks/gpu.py --smoke --json                 # tiny sizes on the CPU, one repeat (the test suite)

It prints a table, then the results as one JSON object (``--json``: only the JSON), and writes the JSON to
``--out`` after every section. It imports only torch, diffusers, transformers (with their own
dependencies) and the project's modules: no gradio, no face detector; ``unexpected_imports`` in the
results lists any that slipped in.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the project, also where it is not installed

RELEASE_LAYOUT = {"image_proj_tensors": 51, "face_adapter_tensors": 160, "parameters": 61_817_856}
GOALS = {"seconds_per_video": 3.0, "peak_gib_no_offload": 9.0}  # issue 9's goal on an H100
# What a GPU machine lacks (gradio, the face detectors, imageio-ffmpeg) and the parts of the project that need them.
NOT_HERE = ("gradio", "gradio_client", "spaces", "insightface", "retinaface", "face_recognition", "imageio_ffmpeg")
NOT_HERE += ("idanimator.face", "idanimator.video", "idanimator.service", "idanimator.studio")
PROMPT = "a person smiling"
GIB = 1024**3

# The released shapes (diffusers' defaults where they are SD1.5's), and the tiny kit's for --smoke.
REAL = {
    "unet": dict(cross_attention_dim=768, sample_size=64),
    "vae": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ),
    "text": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    "vision": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=1024,
        hidden_act="gelu",
    ),
    "motion": dict(motion_max_seq_length=32, use_motion_mid_block=True),  # AnimateDiff v2 (mm_sd_v15_v2)
    "face": dict(cross_attention_dim=768, clip_dim=1280, resampler_hidden=768, num_tokens=16, rank=128),
}
TINY = {
    "unet": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    "vae": dict(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    ),
    "text": dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
    ),
    "vision": dict(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
    ),
    "motion": dict(
        block_out_channels=(32, 64),
        motion_layers_per_block=2,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    ),
    "face": dict(),  # random_face_adapter's defaults are the tiny kit's
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


class Clock:
    """Wall-clock timing that waits for the device (CUDA kernels run asynchronously)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def time(self, function: Callable[[], object]) -> tuple[float, object]:
        start = self.now()
        result = function()
        return self.now() - start, result


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- random real-size parts, written in their real layouts ---------------------------------------


def write_parts(spec: dict, folder: Path, backbone_dtype: torch.dtype) -> dict[str, Path]:
    """Build random parts with ``spec``'s shapes and write them as real weights are distributed."""
    from diffusers import AutoencoderKL, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from idanimator.adapter import save_official_checkpoint, spatial_cross_attention_names
    from idanimator.models import release_scheduler
    from idanimator.tiny import random_face_adapter, tiny_kit_paths
    from idanimator.tiny.kit import _tiny_tokenizer  # byte-level; the text encoder keeps its real size
    from idanimator.tiny.single_file import export_single_file

    paths = tiny_kit_paths(folder)  # the kit's layout: base/, motion-adapter/, image-encoder/, animator.ckpt, ...
    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(folder / "tokenizer-source")
    text = {"vocab_size": len(tokenizer), **spec["text"]}
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    unet = UNet2DConditionModel(**spec["unet"])
    sizes = [
        unet.get_submodule(n.removesuffix(".processor")).to_q.out_features for n in spatial_cross_attention_names(unet)
    ]
    backbone = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text, **ids)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=release_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    backbone.to(dtype=backbone_dtype)  # community backbones ship in fp16
    backbone.save_pretrained(paths["base"])
    del backbone, unet
    export_single_file(paths["base"], paths["single_file"])
    MotionAdapter(**spec["motion"]).save_pretrained(paths["motion_adapter"])
    CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["vision"])).save_pretrained(paths["image_encoder"])
    save_official_checkpoint(random_face_adapter(sizes, **spec["face"]), paths["face_adapter"])
    gc.collect()
    return paths


def load_options(paths: dict[str, Path], device: str, dtype: torch.dtype, offload: str = "none"):
    """The product's LoadOptions for the written parts: two backbones, a folder and a single file."""
    from idanimator.models import LoadOptions

    return LoadOptions(
        device=device,
        dtype=dtype,
        offload=offload,
        face_adapter=paths["face_adapter"],
        motion_adapter=paths["motion_adapter"],
        image_encoder=paths["image_encoder"],
        base=paths["base"],
        backbones=(("folder", paths["base"]), ("single-file", paths["single_file"])),
        default_backbone="folder",
        allow_hub_ids=False,
    )


# -- sections --------------------------------------------------------------------------------------


def layout(paths: dict[str, Path], real: bool) -> dict:
    from idanimator.adapter import load_face_adapter_weights

    face = load_face_adapter_weights(paths["face_adapter"])
    counts = {
        "image_proj_tensors": len(face.image_proj),
        "face_adapter_tensors": len(face.face_adapter),
        "parameters": face.num_parameters(),
        "cross_attention_layers": len(face.cross_attention_indices),
    }
    return {**counts, "matches_release": all(counts[k] == v for k, v in RELEASE_LAYOUT.items()) if real else None}


STAGES = {  # idanimator.models' functions that build_animatediff and load_shared_parts call, in order
    "load_face_adapter_weights": "load face adapter",
    "load_motion_adapter": "load motion adapter",
    "load_image_encoder": "load image encoder",
    "load_backbone": "load backbone",
    "motion_unet_from_parts": "motion UNet",
    "use_per_frame_motion_norms": "per-frame motion norms",
    "install_face_adapter": "install face adapter",
    "assemble_pipeline": "assemble",
    "place_pipeline": "place (cast, move)",
}


@contextlib.contextmanager
def instrumented(clock: Clock, way: str):
    """Time every stage of the product's build, with diffusers' from_unet2d ("before") or ours ("after")."""
    from diffusers import UNetMotionModel

    import idanimator.models as models

    times: dict[str, float] = {}
    originals = {name: getattr(models, name) for name in STAGES}

    def timing(name: str, function: Callable):
        def timed(*args, **kwargs):
            seconds, result = clock.time(lambda: function(*args, **kwargs))
            times[STAGES[name]] = times.get(STAGES[name], 0.0) + seconds
            return result

        return timed

    for name, function in originals.items():
        if name == "motion_unet_from_parts" and way == "before":
            function = UNetMotionModel.from_unet2d  # what build_motion_unet called before
        setattr(models, name, timing(name, function))
    try:
        yield times
    finally:
        for name, function in originals.items():
            setattr(models, name, function)


def cold_start(paths: dict[str, Path], device: str, dtype: torch.dtype, repeats: int) -> dict:
    """A cold load (shared parts + the folder backbone), a switch to the single file and one back to the folder,
    as the model service does them, with each way of building the motion UNet; the two ways alternate."""
    clock, options = Clock(device), load_options(paths, device, dtype)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for repeat in range(repeats):
        for way in ("before", "after") if repeat % 2 == 0 else ("after", "before"):
            log(f"  cold start and switches, {way} ...")
            runs[way].append(loads_and_switches(options, clock, way))
            free_memory(device)

    def seconds(way: str, label: str) -> float:
        return median([run[label]["seconds"] for run in runs[way]])

    def stages(way: str, label: str) -> dict[str, float]:
        names = runs[way][0][label]["stages"]
        return {stage: median([run[label]["stages"][stage] for run in runs[way]]) for stage in names}

    labels = list(runs["after"][0])
    out = {
        way: {label: {"seconds": seconds(way, label), "stages": stages(way, label)} for label in labels} for way in runs
    }
    unet = {way: out[way]["switch back"]["stages"]["motion UNet"] for way in runs}
    return {
        **out,
        "cold_ratio": seconds("after", "cold") / seconds("before", "cold"),
        "switch_ratio": seconds("after", "switch back") / seconds("before", "switch back"),
        "motion_unet_ratio": unet["after"] / unet["before"],
        "switch_vs_cold_after": seconds("after", "switch back") / seconds("after", "cold"),
        "repeats": repeats,
    }


def loads_and_switches(options, clock: Clock, way: str) -> dict:
    """Shared parts, then the folder backbone (cold), the single file (a switch) and the folder again."""
    from idanimator.models import build_animatediff, load_shared_parts

    result = {}
    with instrumented(clock, way) as times:
        shared_s, shared = clock.time(lambda: load_shared_parts(options))
        for label, backbone in (("cold", "folder"), ("switch", "single-file"), ("switch back", "folder")):
            if label != "cold":
                times.clear()  # the cold load's stages include the shared parts'
            seconds, pipe = clock.time(lambda b=backbone: build_animatediff(shared, b))
            result[label] = {"seconds": seconds + (shared_s if label == "cold" else 0.0), "stages": dict(times)}
            del pipe
            free_memory(options.device)  # the service drops the pipeline before loading the next one
    return result


def pipeline_for(paths: dict[str, Path], device: str, dtype: torch.dtype, offload: str):
    """A fresh server's pipeline: shared parts and the folder backbone, placed for ``offload``."""
    from idanimator.models import build_animatediff, load_shared_parts
    from idanimator.pipeline import IDAnimatorPipeline

    pipe = build_animatediff(load_shared_parts(load_options(paths, device, dtype, offload)), "folder")
    pipe.set_progress_bar_config(disable=True)
    return IDAnimatorPipeline(pipe, dtype=dtype)


def face_image():
    """The aligned face crop the pipeline encodes (no detection here: a flat skin tone, 224x224)."""
    from PIL import Image

    return Image.new("RGB", (224, 224), (180, 140, 120))


def one_video(model, clock: Clock, frames: int, size: int, steps: int) -> dict:
    """Denoise and decode one video; seconds in all, per step, and for the decode."""
    from idanimator.pipeline import FaceFeatureCache
    from idanimator.request import GenerationRequest

    settings = GenerationRequest(
        prompt=PROMPT, num_frames=frames, num_inference_steps=steps, height=size, width=size, seed=0
    )
    model.face_cache = FaceFeatureCache()  # the image encoder runs, as for a new face
    marks: list[float] = []
    start = clock.now()
    result = model.denoise([face_image()], settings.validate(), callback=lambda *_: marks.append(clock.now()))
    denoised = clock.now()
    model.decode(result.latents)
    end = clock.now()
    per_step = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {
        "video_s": end - start,
        "step_s": median(per_step) if per_step else marks[0] - start,
        "before_first_step_s": marks[0] - start - (median(per_step) if per_step else 0.0),  # prompt and face encoding
        "decode_s": end - denoised,
        "latents": result.latents,
    }


def capture_unet_call(model, clock: Clock, frames: int, size: int) -> tuple[tuple, dict]:
    """The exact arguments of one UNet call of the pipeline (batch 2 with classifier-free guidance)."""
    captured: dict = {}

    def keep(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, (list, tuple)):
            return type(value)(keep(v) for v in value)
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items()}
        return value

    def hook(module, args, kwargs):
        if not captured:
            captured.update(args=keep(args), kwargs=keep(kwargs))

    handle = model.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        one_video(model, clock, frames, size, steps=1)
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def unet_seconds(unet, call: tuple[tuple, dict], clock: Clock, repeats: int) -> float:
    args, kwargs = call
    with torch.inference_mode():
        unet(*args, **kwargs)  # warm
        return median([clock.time(lambda: unet(*args, **kwargs))[0] for _ in range(repeats)])


def speed(model, clock: Clock, frames: int, size: int, steps: int, repeats: int) -> tuple[dict, tuple, torch.Tensor]:
    one_video(model, clock, frames, size, steps=2)  # warm-up: kernels, allocator, attention back end
    videos = [one_video(model, clock, frames, size, steps) for _ in range(repeats)]
    call = capture_unet_call(model, clock, frames, size)
    unet_s = unet_seconds(model.pipe.unet, call, clock, max(3, repeats * 3))
    processors = sorted({type(p).__name__ for p in model.pipe.unet.attn_processors.values()})
    out = {k: median([v[k] for v in videos]) for k in ("video_s", "step_s", "before_first_step_s", "decode_s")}
    return {**out, "unet_call_s": unet_s, "attention_processors": processors}, call, videos[-1]["latents"]


def matmul_rate(device: str, dtype: torch.dtype, smoke: bool) -> float:
    """Measured dense matmul FLOP/s of the device in ``dtype`` (what the floor divides by)."""
    clock, n = Clock(device), 256 if smoke else (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    count = 3 if smoke else (50 if device.startswith("cuda") else 5)
    seconds, _ = clock.time(lambda: [a @ b for _ in range(count)])
    return 2 * n**3 * count / seconds


def floor(
    model, call: tuple[tuple, dict], latents, measured: dict, steps: int, device: str, dtype, smoke: bool
) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = call
    with torch.inference_mode():
        with FlopCounterMode(display=False) as unet_counter:
            model.pipe.unet(*args, **kwargs)
        with FlopCounterMode(display=False) as vae_counter:
            model.decode(latents)
    rate = matmul_rate(device, dtype, smoke)
    unet_floor = unet_counter.get_total_flops() / rate
    video_floor = steps * unet_floor + vae_counter.get_total_flops() / rate
    return {
        "unet_flops_per_step": unet_counter.get_total_flops(),
        "vae_decode_flops": vae_counter.get_total_flops(),
        "matmul_tflops": rate / 1e12,
        "unet_floor_s": unet_floor,
        "unet_achieved_fraction": unet_floor / measured["unet_call_s"],
        "video_floor_s": video_floor,
        "video_achieved_fraction": video_floor / measured["video_s"],
    }


def memory(paths, device: str, dtype, modes: list[str], frame_counts: list[int], size: int, steps: int) -> dict:
    """Peak GPU memory (weights included) of a video per offload mode and frame count, each mode in a fresh
    pipeline. On a CPU only the code path runs (no GPU figures; offload needs CUDA)."""
    cuda, clock, out = device.startswith("cuda"), Clock(device), {}
    for mode in modes if cuda else ["none"]:
        log(f"  memory, offload {mode} ...")
        model = pipeline_for(paths, device, dtype, mode)
        resident = torch.cuda.memory_allocated() / GIB if cuda else None
        out[mode] = {"resident_gib": resident}
        for frames in frame_counts:
            free_memory(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            video = one_video(model, clock, frames, size, steps)
            peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
            reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None
            out[mode][str(frames)] = {"peak_gib": peak, "peak_reserved_gib": reserved, "step_s": video["step_s"]}
        del model
        free_memory(device)
    return out


def compiled(model, call, clock: Clock, repeats: int, backend: str, mode: str | None) -> dict:
    unet = model.pipe.unet
    fast = torch.compile(unet, backend=backend, mode=mode)
    args, kwargs = call
    with torch.inference_mode():
        compile_s, _ = clock.time(lambda: fast(*args, **kwargs))
    plain, other = [], []
    for _ in range(repeats):  # alternating
        plain.append(unet_seconds(unet, call, clock, 3))
        other.append(unet_seconds(fast, call, clock, 3))
    return {"ratio": median(other) / median(plain), "first_call_s": compile_s, "backend": backend, "mode": mode}


def channels_last(model, call, clock: Clock, repeats: int) -> dict:
    unet = model.pipe.unet
    plain, other = [], []
    try:
        for _ in range(repeats):  # alternating
            unet.to(memory_format=torch.contiguous_format)
            plain.append(unet_seconds(unet, call, clock, 3))
            unet.to(memory_format=torch.channels_last)
            other.append(unet_seconds(unet, call, clock, 3))
    finally:
        unet.to(memory_format=torch.contiguous_format)
    return {"ratio": median(other) / median(plain)}


# -- the run -------------------------------------------------------------------------------------


def environment(device: str, dtype: torch.dtype) -> dict:
    import diffusers
    import transformers

    env = {
        "device": "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            device=props.name,
            gpu_memory_gib=props.total_memory / GIB,
            cuda=torch.version.cuda,
            sdpa={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    return env


def run(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Every section asked for, in one process; a section that fails is recorded in ``errors`` and the rest
    still run (a GPU machine is lent for minutes: one failure must not cost the other figures)."""
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16 if device.startswith("cuda") else torch.float32
    clock, wanted = Clock(device), args.sections
    results: dict = {
        **environment(device, dtype),
        "smoke": args.smoke,
        "settings": {"frames": args.frames, "size": args.size, "steps": args.steps, "repeats": args.repeats},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
        "section_s": {},
        "errors": {},
    }

    @contextlib.contextmanager
    def section(name: str):
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - recorded with the results; the other sections still run
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results["errors"][name] = f"{type(exc).__name__}: {str(exc)[:500]}"
            free_memory(device)
        results["section_s"][name] = time.perf_counter() - start
        save(results)

    with tempfile.TemporaryDirectory(prefix="idanimator-gpu-bench-", dir=args.workdir) as tmp:
        with section("write random parts"):
            paths = write_parts(TINY if args.smoke else REAL, Path(tmp), torch.float16)
        if "layout" in wanted:
            with section("layout"):
                results["layout"] = layout(paths, real=not args.smoke)
        if "cold-start" in wanted:
            with section("cold-start"):
                results["cold_start"] = cold_start(paths, device, dtype, args.cold_repeats)
        model = call = latents = None
        if wanted & {"speed", "floor", "compile", "channels-last"}:
            with section("speed"):
                model = pipeline_for(paths, device, dtype, "none")
                results["speed"], call, latents = speed(model, clock, args.frames, args.size, args.steps, args.repeats)
        if call is not None and "floor" in wanted:
            with section("floor"):
                results["floor"] = floor(model, call, latents, results["speed"], args.steps, device, dtype, args.smoke)
        if call is not None and "compile" in wanted:
            with section("compile"):
                results["compile"] = compiled(model, call, clock, args.repeats, args.compile_backend, args.compile_mode)
        if call is not None and "channels-last" in wanted:
            with section("channels-last"):
                results["channels_last"] = channels_last(model, call, clock, args.repeats)
        del model, call, latents
        free_memory(device)
        if "memory" in wanted:
            with section("memory"):
                frames, steps = args.memory_frames, args.memory_steps
                results["memory"] = memory(paths, device, dtype, args.offload_modes, frames, args.size, steps)
    results["goals"] = goals(results)
    results["unexpected_imports"] = sorted(m for m in NOT_HERE if m in sys.modules)
    save(results)
    return results


def goals(results: dict) -> dict | None:
    if results["device"] == "cpu" or results["smoke"]:
        return None
    video = results.get("speed", {}).get("video_s")
    peak = results.get("memory", {}).get("none", {}).get("16", {}).get("peak_gib")
    return {
        **GOALS,
        "seconds_per_video_over_goal": None if video is None else video / GOALS["seconds_per_video"],
        "peak_gib_over_goal": None if peak is None else peak / GOALS["peak_gib_no_offload"],
    }


def table(r: dict) -> str:
    def num(value, digits=2, unit=""):
        return (
            "-"
            if value is None or (isinstance(value, float) and not math.isfinite(value))
            else f"{value:.{digits}f}{unit}"
        )

    lines = [f"{r['device']}, {r['dtype']}, torch {r['torch']}, diffusers {r['diffusers']}, {r['date']}", ""]
    if "layout" in r:
        lay = r["layout"]
        lines.append(
            f"face adapter: {lay['image_proj_tensors']} image_proj + {lay['face_adapter_tensors']} face_adapter "
            f"tensors, {lay['parameters']:,} parameters, {lay['cross_attention_layers']} layers "
            "(release: 51 + 160, 61,817,856)"
        )
    if "cold_start" in r:
        cs = r["cold_start"]
        lines += ["", f"{'seconds (medians)':<34}{'before':>9}{'after':>9}{'ratio':>8}"]
        names = {
            "cold": "cold: shared parts + folder",
            "switch": "switch to the single file",
            "switch back": "switch back to the folder",
        }
        for label, name in names.items():
            b, a = cs["before"][label]["seconds"], cs["after"][label]["seconds"]
            lines.append(f"{name:<34}{b:>9.2f}{a:>9.2f}{a / b:>8.2f}")
        lines.append("stages of the cold load:")
        for stage in cs["before"]["cold"]["stages"]:
            b, a = cs["before"]["cold"]["stages"][stage], cs["after"]["cold"]["stages"].get(stage, float("nan"))
            lines.append(f"  {stage:<32}{b:>9.2f}{a:>9.2f}{a / b if b else float('nan'):>8.2f}")
        lines.append(
            f"switch back / cold, after: {cs['switch_vs_cold_after']:.2f} ({cs['repeats']} repeats, alternating)"
        )
    if "speed" in r:
        s, st = r["speed"], r["settings"]
        lines += [
            "",
            f"speed, {st['frames']} frames at {st['size']}x{st['size']}, {st['steps']} steps, no offload:",
            f"  seconds per video {s['video_s']:.2f}; per step {s['step_s']:.3f}; UNet call {s['unet_call_s']:.3f}; "
            f"VAE decode {s['decode_s']:.2f}; prompt + face encoding {s['before_first_step_s']:.3f}",
        ]
    if "floor" in r:
        f = r["floor"]
        lines.append(
            f"  floor: UNet {f['unet_flops_per_step'] / 1e12:.3f} TFLOP per step at {f['matmul_tflops']:.1f} TFLOP/s "
            f"= {f['unet_floor_s']:.3f} s ({f['unet_achieved_fraction']:.0%} achieved); video floor "
            f"{f['video_floor_s']:.2f} s ({f['video_achieved_fraction']:.0%} achieved)"
        )
    for key, label in (("compile", "torch.compile"), ("channels_last", "channels-last")):
        if key in r:
            lines.append(f"  {label}: UNet call {r[key]['ratio']:.2f}x the plain one")
    if "memory" in r:
        frames = [k for k in next(iter(r["memory"].values())) if k != "resident_gib"]
        lines += ["", f"{'peak GPU memory (GiB)':<24}{'resident':>9}" + "".join(f"{f + ' fr':>9}" for f in frames)]
        for mode, row in r["memory"].items():
            cells = "".join(f"{num(row[f]['peak_gib']):>9}" for f in frames)
            lines.append(f"{mode:<24}{num(row['resident_gib']):>9}{cells}")
    if r.get("goals"):
        g = r["goals"]
        lines += [
            "",
            f"goal: <= {g['seconds_per_video']} s per video ({num(g['seconds_per_video_over_goal'])}x it), "
            f"<= {g['peak_gib_no_offload']} GiB peak without offload ({num(g['peak_gib_over_goal'])}x it)",
        ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dtype", default=None, help="float16 (default on CUDA), bfloat16 or float32")
    parser.add_argument(
        "--sections", default=None, help="comma-separated (default: all on CUDA, layout,cold-start on a CPU)"
    )
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-repeats", type=int, default=None, help="default 2 on CUDA, 1 on a CPU")
    parser.add_argument("--memory-frames", default="16,24,32")
    parser.add_argument("--memory-steps", type=int, default=2, help="peak memory does not grow with steps")
    parser.add_argument("--offload-modes", default="none,model,sequential")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet")
    parser.add_argument("--compile-backend", default=None, help="default inductor (eager with --smoke)")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--channels-last", action="store_true", help="also time the UNet in channels-last format")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, one repeat (the test suite's)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--out", default=None, help="write the results (JSON) to this file, after every section")
    parser.add_argument("--workdir", default=None, help="where the temporary weights go (default: the system's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.frames, args.size, args.steps, args.repeats = 2, 64, 2, 1
        args.memory_frames, args.memory_steps, args.cold_repeats = "2", 1, args.cold_repeats or 1
        args.compile_backend = args.compile_backend or "eager"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.cold_repeats = args.cold_repeats or (2 if cuda else 1)
    args.compile_backend = args.compile_backend or "inductor"
    default = {"layout", "cold-start", "speed", "floor", "memory"} if cuda or args.smoke else {"layout", "cold-start"}
    args.sections = set(args.sections.split(",")) if args.sections else default
    args.sections |= {"compile"} if args.compile else set()
    args.sections |= {"channels-last"} if args.channels_last else set()
    known = {"layout", "cold-start", "speed", "floor", "memory", "compile", "channels-last"}
    if args.sections - known:
        parser.error(f"unknown sections {sorted(args.sections - known)}; known: {sorted(known)}")
    args.memory_frames = [int(f) for f in str(args.memory_frames).split(",")]
    args.offload_modes = args.offload_modes.split(",")
    return args


def main() -> None:
    args = parse()
    # A stopped run (a time limit's SIGTERM) still removes its temporary weights on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def save(results: dict) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    results = run(args, save)
    if not args.json:
        print(table(results) + "\n")
    print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    main()
