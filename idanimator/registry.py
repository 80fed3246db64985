"""Named weights and where each comes from. The one place that holds Hub ids and file names.

A *source* is either a whole Hub folder (diffusers layout) or one Hub file. Users may also give a
local folder or file anywhere a name is accepted (see :mod:`idanimator.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubFolder:
    """A diffusers/transformers folder in a Hub repository (optionally a subfolder of it)."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None
    repo_type: str = "model"
    allow_patterns: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")
    ignore_patterns: tuple[str, ...] = ("*.fp16.*", "*non_ema*", "*.onnx*", "*.msgpack", "*.ckpt", "safety_checker/*")


@dataclass(frozen=True)
class HubFile:
    """One file in a Hub repository (a single-file checkpoint)."""

    repo_id: str
    filename: str
    revision: str | None = None
    repo_type: str = "model"


Source = HubFolder | HubFile

# Single-file checkpoints we load (original SD layout). Pickled .pt/.pth/.bin files are refused everywhere.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Backbone:
    """A community Stable Diffusion 1.5 model usable as the image backbone."""

    label: str  # the name users recognise
    source: Source
    size: str  # approximate download
    licence: str = "CreativeML OpenRAIL-M"
    notes: str = ""


# SD1.5 in diffusers layout: tokenizer, text encoder, VAE and configs for single-file backbones.
_SD15_COMPONENTS = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
BASE_MODEL = HubFolder(
    "stable-diffusion-v1-5/stable-diffusion-v1-5", allow_patterns=_SD15_COMPONENTS, ignore_patterns=()
)

# AnimateDiff v2 motion module (mm_sd_v15_v2) converted to a diffusers MotionAdapter.
MOTION_ADAPTER = HubFolder("guoyww/animatediff-motion-adapter-v1-5-2")

# OpenCLIP ViT-H/14 vision tower, as shipped with IP-Adapter (the release's image_encoder is identical).
IMAGE_ENCODER = HubFolder("h94/IP-Adapter", subfolder="models/image_encoder")

# The released ID-Animator face adapter (resampler + face attention + LoRA, fp32, about 247 MB).
# It is hosted in the project's Space, not in its model repository (which holds only the card).
FACE_ADAPTER = HubFile("ID-Animator/ID-Animator", "animator.ckpt", repo_type="space")

# `eval`'s CLIP metrics (CLIPScore, CLIP temporal consistency, CLIPDist) use CLIP ViT-B/32, as the field does.
EVAL_CLIP = HubFolder("openai/clip-vit-base-patch32", allow_patterns=("*.json", "*.txt", "*.safetensors"))

# What the release's training started from (`train --init-adapter ip-adapter-plus-face`): IP-Adapter-Plus-Face
# SD1.5, whose resampler and face key/value have the face adapter's shapes. Its .bin twin is also accepted.
IP_ADAPTER_PLUS_FACE = HubFile("h94/IP-Adapter", "models/ip-adapter-plus-face_sd15.safetensors")

DEFAULT_BACKBONE = "realistic-vision-v6"

BACKBONES: dict[str, Backbone] = {
    "realistic-vision-v6": Backbone(
        label="Realistic Vision V6.0 B1 (release default)",
        source=HubFile("guoyww/animatediff_t2i_backups", "realisticVisionV60B1_v51VAE.safetensors"),
        size="2.1 GB",
        notes="The backbone of the ID-Animator demo (pruned single file with a baked VAE).",
    ),
    "sd-1.5": Backbone(
        label="Stable Diffusion 1.5",
        source=BASE_MODEL,
        size="4.3 GB",
        notes="The plain base model.",
    ),
    "epicrealism": Backbone(
        label="epiCRealism",
        source=HubFolder("emilianJR/epiCRealism"),
        size="about 4 GB",
        notes="Photorealistic; used in diffusers' AnimateDiff examples.",
    ),
    "dreamshaper-8": Backbone(
        label="DreamShaper 8",
        source=HubFolder("Lykon/dreamshaper-8"),
        size="about 4 GB",
        notes="General purpose, semi-realistic.",
    ),
    "realistic-vision-v5.1": Backbone(
        label="Realistic Vision V5.1",
        source=HubFolder("SG161222/Realistic_Vision_V5.1_noVAE"),
        size="4.3 GB",
        notes="The backbone of diffusers' AnimateDiff examples.",
    ),
    "absolutereality-1.8.1": Backbone(
        label="AbsoluteReality 1.8.1",
        source=HubFile("digiplay/AbsoluteReality_v1.8.1", "absolutereality_v181.safetensors"),
        size="2.1 GB",
        licence="Civitai model licence (see the model page)",
        notes="Photorealistic single file.",
    ),
    "toonyou-beta6": Backbone(
        label="ToonYou beta 6 (cartoon)",
        source=HubFile("frankjoshua/toonyou_beta6", "toonyou_beta6.safetensors"),
        size="2.3 GB",
        licence="not stated by the uploader",
        notes="Cartoon style, a classic AnimateDiff backbone.",
    ),
}

# Each structure control's model, by kind (a diffusers folder: config and weights only).
_CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
CONTROL_MODELS: dict[str, Source] = {
    # SparseCtrl for AnimateDiff v3, converted to diffusers by its authors (about 2 GB each in fp32).
    "sparse-sketch": HubFolder("guoyww/animatediff-sparsectrl-scribble", allow_patterns=_CONTROLNET_FILES),
    "sparse-rgb": HubFolder("guoyww/animatediff-sparsectrl-rgb", allow_patterns=_CONTROLNET_FILES),
    # SD1.5 ControlNet 1.1 (about 1.45 GB each in fp32).
    "openpose": HubFolder("lllyasviel/control_v11p_sd15_openpose", allow_patterns=_CONTROLNET_FILES),
    "depth": HubFolder("lllyasviel/control_v11f1p_sd15_depth", allow_patterns=_CONTROLNET_FILES),
    "canny": HubFolder("lllyasviel/control_v11p_sd15_canny", allow_patterns=_CONTROLNET_FILES),
}

# The fast mode (AnimateLCM): a diffusers MotionAdapter in the repository's root and its spatial LCM LoRA beside it.
ANIMATELCM_LORA = "AnimateLCM_sd15_t2v_lora.safetensors"
ANIMATELCM = HubFolder(
    "wangfuyun/AnimateLCM",
    allow_patterns=("config.json", "diffusion_pytorch_model.safetensors", ANIMATELCM_LORA),
    ignore_patterns=(),
)
