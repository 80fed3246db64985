"""Loading each model component from a resolved path, and assembling the diffusers pipeline.

Every component is loaded on the CPU in float32 (the face LoRA is fused in float32, as the release's
weights are), and only then cast and placed. Each loader turns a broken or incomplete file into a
:class:`WeightsUnavailableError` that names the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNetMotionModel

from . import registry
from .adapter import FaceAdapterWeights, install_face_adapter, load_face_adapter_weights
from .errors import WeightsUnavailableError
from .images import clip_image_processor
from .registry import SINGLE_FILE_SUFFIXES
from .settings import OFFLOAD_MODES
from .weights import resolve


def release_scheduler() -> DDIMScheduler:
    """The release's DDIM: linear betas 0.00085-0.012, "leading" spacing, steps_offset 1, no clipping."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )


@dataclass
class BackboneParts:
    """The image model of one SD1.5 backbone (what a backbone switch replaces)."""

    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object


def _broken(what: str, path: Path, exc: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"The {what} at {path} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). "
        "It may be incomplete or corrupt: delete it and download it again."
    )


def load_backbone(path: Path, base: Path | None) -> BackboneParts:
    """A diffusers SD1.5 folder, or a single-file checkpoint (original SD layout) read with `base` as config.

    Parts a folder lacks (e.g. the VAE of a "noVAE" model) come from `base`.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise WeightsUnavailableError(f"{path} is not a .safetensors or .ckpt checkpoint.")
            if base is None:
                raise WeightsUnavailableError(
                    "A single-file backbone needs the SD1.5 base folder for its configuration."
                )
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(base),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
                torch_dtype=torch.float32,
            )
            return BackboneParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer)

        def part(sub: str) -> Path:
            if (path / sub).is_dir():
                return path
            if base is None:
                raise WeightsUnavailableError(f"The backbone folder {path} has no {sub}/ folder.")
            return base

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(part("vae"), subfolder="vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(
            part("text_encoder"), subfolder="text_encoder", dtype=torch.float32
        )
        tokenizer = CLIPTokenizer.from_pretrained(part("tokenizer"), subfolder="tokenizer")
        return BackboneParts(unet, vae, text_encoder, tokenizer)
    except WeightsUnavailableError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _broken("backbone", path, exc) from exc


_ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator (and CUDA's) gives every fresh tensor


def _fresh_layout(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` itself if it is laid out as a fresh allocation would be (dtype, contiguous, aligned), else a
    copy that is."""
    if tensor.dtype == dtype and tensor.is_contiguous() and tensor.data_ptr() % _ALIGNMENT == 0:
        return tensor
    return tensor.to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)


def load_motion_adapter(path: Path) -> MotionAdapter:
    try:
        adapter = MotionAdapter.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _broken("motion adapter", path, exc) from exc
    # Every backbone's motion UNet takes these tensors as they are (motion_unet_from_parts): lay them out as
    # fresh allocations once, here, rather than copying 1.8 GB on every backbone switch.
    state = {k: _fresh_layout(v, v.dtype) for k, v in adapter.state_dict().items()}
    adapter.load_state_dict(state, strict=True, assign=True)
    return adapter


def load_image_encoder(path: Path):
    from transformers import CLIPVisionModelWithProjection

    try:
        return CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _broken("image encoder", path, exc) from exc


class PerFrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm applied to each frame on its own, as in the original AnimateDiff and the release.

    diffusers' AnimateDiffTransformer3D normalises a [batch, channels, frames, h, w] tensor over all
    frames at once, which shifts the UNet output by ~4e-3 with the same weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)
        frames = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return frames.reshape(b, f, c, h, w).transpose(1, 2)


def use_per_frame_motion_norms(unet: UNetMotionModel) -> int:
    """Switch every motion-module GroupNorm to per-frame statistics; returns how many were switched."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    count = 0
    for module in unet.modules():
        if isinstance(module, AnimateDiffTransformer3D) and type(module.norm) is torch.nn.GroupNorm:
            module.norm.__class__ = PerFrameGroupNorm
            count += 1
    return count


def motion_unet_from_parts(unet2d: torch.nn.Module, motion_adapter: MotionAdapter) -> UNetMotionModel:
    """``UNetMotionModel.from_unet2d(unet2d, motion_adapter)`` without building a random model first.

    diffusers initialises the motion UNet with random weights (~1.3 B parameters at SD1.5 size: ~14 s on
    two cores, mostly spent faulting in 5 GB of fresh memory) only to copy every tensor over them. Here
    diffusers' own construction runs on the meta device with initialisation skipped (as its
    ``from_pretrained`` does) and the model takes the backbone's and the motion adapter's tensors in place.
    A tensor that is not laid out as a fresh allocation (contiguous, 64-byte aligned) is copied first, since
    CPU kernels sum in an order that depends on alignment: the model's tensors then have the same values and
    layout as diffusers' copies, so the pipeline's output is bit for bit the same.

    The motion-module tensors may thus be the shared motion adapter's own, and the rest the backbone's:
    nothing writes into them in place (casting, placing and offloading make new tensors; the LoRA fusion
    replaces attn2's weights), and this must stay so. Layouts this does not cover (PIA's 9-channel input, a
    backbone with parts the motion UNet lacks) go through diffusers' copy.
    """
    from diffusers.models.modeling_utils import no_init_weights

    unet_state, motion_state = unet2d.state_dict(), motion_adapter.state_dict()
    state = {**unet_state, **motion_state}
    if motion_adapter.config.get("conv_in_channels") or len(state) != len(unet_state) + len(motion_state):
        return UNetMotionModel.from_unet2d(unet2d, motion_adapter)
    with torch.device("meta"), no_init_weights():
        unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter, load_weights=False)
    names = {name for name, _ in (*unet.named_parameters(), *unet.named_buffers())}
    if set(state) != set(unet.state_dict()) or not names <= set(state):
        return UNetMotionModel.from_unet2d(unet2d, motion_adapter)
    dtype = unet2d.dtype  # as diffusers: the motion modules take the backbone's dtype
    unet.load_state_dict({k: _fresh_layout(v, dtype) for k, v in state.items()}, strict=True, assign=True)
    return unet


def build_motion_unet(
    parts: BackboneParts, motion_adapter: MotionAdapter, face: FaceAdapterWeights | None
) -> UNetMotionModel:
    """SD1.5 UNet + AnimateDiff motion modules (per-frame norms) + the face adapter, in float32 on the CPU.
    ``face`` None: no face adapter (training attaches its own, trainable one)."""
    unet = motion_unet_from_parts(parts.unet, motion_adapter)
    use_per_frame_motion_norms(unet)
    if face is not None:
        install_face_adapter(unet, face)
    return unet


def assemble_pipeline(parts: BackboneParts, unet: UNetMotionModel, image_encoder) -> AnimateDiffPipeline:
    pipe = AnimateDiffPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        motion_adapter=None,  # already merged into `unet`; keeping it would hold a second copy
        scheduler=release_scheduler(),
        feature_extractor=clip_image_processor(),
        image_encoder=image_encoder,
    )
    pipe.set_progress_bar_config(desc="denoising", leave=True)
    return pipe


def _placed(pipe: AnimateDiffPipeline, device: str) -> bool:
    """Whether every tensor of the pipeline's models is on ``device`` already."""
    target = torch.device(device)
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return all(t.device == target for m in models for t in (*m.parameters(), *m.buffers()))


def place_pipeline(pipe: AnimateDiffPipeline, device: str, dtype: torch.dtype, offload: str) -> None:
    """Cast and place: whole model on the device, or model/sequential CPU offload."""
    if dtype != torch.float32:  # everything is loaded in float32
        pipe.to(dtype=dtype)
    if offload == "none" or device == "cpu":
        if not _placed(pipe, device):  # moving what is already there still walks every module
            pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    pipe.vae.enable_slicing()


# -- from names to a ready diffusers pipeline -----------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """Where every part comes from (registry names, Hub ids or local paths) and how pipelines are placed."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    offload: str = "none"
    face_adapter: str | Path | None = None  # None: the registry's (the release's) weights
    motion_adapter: str | Path | None = None
    image_encoder: str | Path | None = None
    base: str | Path | None = None  # SD1.5 folder: configs for single-file backbones, parts a folder lacks
    backbones: tuple[tuple[str, Path], ...] = ()  # named local backbones (the tiny kit's); replace the registry's
    default_backbone: str = registry.DEFAULT_BACKBONE
    allow_hub_ids: bool = True  # False on public deployments: named backbones only
    tiny: bool = False  # the parts are the tiny random kit's
    # Where the extras' models come from (None: the registry's): a ControlModels (extras.control_models), the fast
    # mode's AnimateLCM folder, the folder of style LoRAs offered by name. Tiny mode gives tiny random ones: a
    # folder may be given as a function that builds it on first use.
    control_models: object | None = None
    fast_weights: str | Path | Callable[[], Path] | None = None
    lora_dir: Path | Callable[[], Path] | None = None

    @staticmethod
    def for_device(device: str | None = None, dtype: torch.dtype | None = None, **kwargs) -> LoadOptions:
        """float16 on CUDA, float32 on the CPU, unless ``dtype`` says otherwise."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        if kwargs.get("offload", "none") not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}")
        return LoadOptions(device=device, dtype=dtype, **kwargs)

    def backbone_names(self) -> list[str]:
        """The backbones offered by name: the named local ones if any, else the registry's."""
        return [name for name, _ in self.backbones] or list(registry.BACKBONES)


@dataclass
class SharedParts:
    """What every backbone shares: loaded once, reused by each pipeline built on them."""

    face: FaceAdapterWeights | None  # None when loaded without it (training brings its own)
    motion_adapter: MotionAdapter
    image_encoder: torch.nn.Module
    options: LoadOptions
    base_path: Path | None = field(default=None)  # resolved on first need (downloads the SD1.5 base)

    def base(self) -> Path:
        if self.base_path is None:
            self.base_path = resolve(self.options.base or registry.BASE_MODEL, what="SD1.5 base model")
        return self.base_path


def load_shared_parts(options: LoadOptions, *, face_adapter: bool = True) -> SharedParts:
    """Resolve (download if needed) and load the face adapter, motion adapter and image encoder
    (``face_adapter=False``: not the face adapter)."""
    face = resolve(options.face_adapter or registry.FACE_ADAPTER, what="face adapter") if face_adapter else None
    motion = resolve(options.motion_adapter or registry.MOTION_ADAPTER, what="motion adapter")
    encoder = resolve(options.image_encoder or registry.IMAGE_ENCODER, what="image encoder")
    return SharedParts(
        face=load_face_adapter_weights(face) if face is not None else None,
        motion_adapter=load_motion_adapter(motion),
        image_encoder=load_image_encoder(encoder),
        options=options,
    )


def resolve_backbone(options: LoadOptions, backbone: str | Path | None) -> Path:
    """A backbone name (named local one, registry name), Hub id or path -> local files (downloading them)."""
    backbone = backbone or options.default_backbone
    named = dict(options.backbones)
    if str(backbone) in named:
        return named[str(backbone)]
    return resolve(backbone, what="backbone", allow_hub_ids=options.allow_hub_ids)


def load_named_backbone(shared: SharedParts, backbone: str | Path | None = None) -> BackboneParts:
    """``backbone`` (see :func:`resolve_backbone`) loaded, with the parts its folder lacks (or a single file's
    configuration) from the SD1.5 base, which is resolved only then."""
    path = resolve_backbone(shared.options, backbone)
    complete = path.is_dir() and all((path / s).is_dir() for s in ("vae", "text_encoder", "tokenizer"))
    return load_backbone(path, None if complete else shared.base())


def build_animatediff(shared: SharedParts, backbone: str | Path | None = None) -> AnimateDiffPipeline:
    """A placed AnimateDiffPipeline for ``backbone`` on the shared parts: motion UNet with the face adapter."""
    parts = load_named_backbone(shared, backbone)
    pipe = assemble_pipeline(parts, build_motion_unet(parts, shared.motion_adapter, shared.face), shared.image_encoder)
    o = shared.options
    place_pipeline(pipe, o.device, o.dtype, o.offload)
    return pipe
