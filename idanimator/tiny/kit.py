"""The tiny-model kit: random, tiny versions of every component, saved in their real on-disk layouts.

Tests and `--tiny` mode load these through exactly the same code as the real weights: a diffusers
SD1.5-style folder (tokenizer with a vocabulary built in code, text encoder, UNet, VAE, scheduler), a
diffusers MotionAdapter folder, a CLIP vision encoder folder, and a face adapter in the official
`animator.ckpt` layout. The outputs are noise-like videos; only the plumbing is real.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..adapter import FaceAdapterWeights, checkpoint_index, random_resampler, save_official_checkpoint
from ..files import atomic_folder
from ..images import CLIP_SIZE

KIT_VERSION = 2  # 2: the tokenizer merges letter pairs
KIT_MARKER = "kit.json"  # written last: a folder holding it is a complete kit
TINY_CROSS_ATTENTION_DIM = 32
TINY_VISION_HIDDEN = 32
TINY_RESAMPLER_HIDDEN = 64  # one 64-wide head, as the release's resampler derives heads = width / 64
TINY_NUM_TOKENS = 4
TINY_LORA_RANK = 4


def default_tiny_dir() -> Path:
    """Where `--tiny` keeps its kit (built on first use)."""
    root = os.environ.get("IDANIMATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "idanimator"
    )
    return Path(root) / f"tiny-v{KIT_VERSION}"


def tiny_kit_paths(root: str | Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "base": root / "base",
        "motion_adapter": root / "motion-adapter",
        "image_encoder": root / "image-encoder",
        "face_adapter": root / "animator.ckpt",
        "single_file": root / "tiny-backbone.safetensors",  # the base, as an original-layout single file
    }


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer (every byte is a token, with and without `</w>`) with merges for every pair
    of lowercase letters, so ordinary English prompts take about as many tokens as with CLIP's real vocabulary
    and fit its 77-token window as they would there."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [(a, b + end) for end in ("", "</w>") for a in letters for b in letters]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _tiny_base(folder: Path, scheduler) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = _tiny_tokenizer(Path(tok_dir))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_CROSS_ATTENTION_DIM,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        # Same block kinds as SD1.5 (cross-attention down blocks, a plain last down block, mirrored up
        # blocks, attention in the mid block), so the face-adapter index order is exercised.
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        # Four levels: latents are 1/8 of the image, as in SD1.5.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder)


def _tiny_motion_adapter(folder: Path) -> None:
    from diffusers import MotionAdapter

    MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=2,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    ).save_pretrained(folder)


def _tiny_image_encoder(folder: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_VISION_HIDDEN,
            intermediate_size=37,
            projection_dim=TINY_VISION_HIDDEN,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=CLIP_SIZE,  # what CLIPImageProcessor() produces, as for ViT-H/14
            patch_size=32,
        )
    ).save_pretrained(folder)


def random_face_adapter(
    cross_attention_hidden_sizes: list[int],
    *,
    cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM,
    clip_dim: int = TINY_VISION_HIDDEN,
    resampler_hidden: int = TINY_RESAMPLER_HIDDEN,
    num_tokens: int = TINY_NUM_TOKENS,
    rank: int = TINY_LORA_RANK,
    depth: int = 4,
    seed: int = 0,
) -> FaceAdapterWeights:
    """Random face-adapter weights with the release's key names, for a UNet whose j-th spatial
    cross-attention has hidden size ``cross_attention_hidden_sizes[j]``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    image_proj = random_resampler(clip_dim, cross_attention_dim, resampler_hidden, depth, num_tokens)

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=generator) * std

    face_adapter = {}
    for j, hidden in enumerate(cross_attention_hidden_sizes):
        i = checkpoint_index(j)
        for lora, fan_in in (
            ("to_q_lora", hidden),
            ("to_k_lora", cross_attention_dim),
            ("to_v_lora", cross_attention_dim),
            ("to_out_lora", hidden),
        ):
            face_adapter[f"{i}.{lora}.down.weight"] = rand(rank, fan_in)
            face_adapter[f"{i}.{lora}.up.weight"] = rand(hidden, rank)
        face_adapter[f"{i}.to_k_face.weight"] = rand(hidden, cross_attention_dim, std=0.5)
        face_adapter[f"{i}.to_v_face.weight"] = rand(hidden, cross_attention_dim, std=0.5)
    return FaceAdapterWeights(image_proj=image_proj, face_adapter=face_adapter)


def tiny_cross_attention_hidden_sizes(base_folder: str | Path) -> list[int]:
    """Hidden size of each spatial cross-attention of a saved UNet, in checkpoint order."""
    from diffusers import UNet2DConditionModel

    from ..adapter import spatial_cross_attention_names

    unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet")
    return [
        unet.get_submodule(n.removesuffix(".processor")).to_q.out_features for n in spatial_cross_attention_names(unet)
    ]


def build_tiny_kit(root: str | Path, *, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Build (once) the tiny kit under ``root`` and return the paths of its parts.

    Built in a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a half-made kit behind; a complete kit is reused.
    """
    from ..models import release_scheduler
    from .single_file import export_single_file

    root = Path(root)
    paths = tiny_kit_paths(root)
    marker = root / KIT_MARKER
    if marker.is_file() and not force:
        return paths
    with atomic_folder(root, marker=KIT_MARKER, what="a tiny kit") as work:
        torch.manual_seed(seed)
        work_paths = tiny_kit_paths(work)
        _tiny_base(work_paths["base"], release_scheduler())
        _tiny_motion_adapter(work_paths["motion_adapter"])
        _tiny_image_encoder(work_paths["image_encoder"])
        sizes = tiny_cross_attention_hidden_sizes(work_paths["base"])
        save_official_checkpoint(random_face_adapter(sizes, seed=seed), work_paths["face_adapter"])
        export_single_file(work_paths["base"], work_paths["single_file"])
        (work / KIT_MARKER).write_text(json.dumps({"version": KIT_VERSION, "seed": seed}))
    return paths


# Generation settings that suit the tiny kit in tests: a whole video in well under a second on a CPU.
TINY_SETTINGS = dict(num_frames=8, num_inference_steps=2, height=64, width=64)

# The backbones tiny mode offers by name: the kit's SD1.5 folder, and the same weights as one single file.
TINY_BACKBONES = {"tiny": "base", "tiny-single-file": "single_file"}
