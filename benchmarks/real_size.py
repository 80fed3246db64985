"""Real-size check and benchmark with random weights of the real architecture (no download needed).

Builds SD1.5 (UNet, VAE, CLIP-L text encoder), the AnimateDiff v2 motion adapter, the CLIP ViT-H/14
image encoder and an ID-Animator face adapter with the released checkpoint's exact shapes, all random,
then goes through the same assembly code as real weights. Random weights time the same as trained ones.

It prints:
  * the face-adapter layout (tensor and parameter counts, which must match the release: 51 + 160
    tensors, 61,817,856 parameters) and how long installing it takes;
  * per offload mode: seconds per denoising step, seconds per video, peak GPU memory (CUDA only).

    python benchmarks/real_size.py                      # CPU: small size, layout + a short timing
    python benchmarks/real_size.py --device cuda        # GPU: 512x512, 16 frames, every offload mode
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

RELEASE_IMAGE_PROJ_TENSORS = 51
RELEASE_FACE_ADAPTER_TENSORS = 160
RELEASE_PARAMETERS = 61_817_856


def build_parts():
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from idanimator.models import BackboneParts
    from idanimator.testing import _tiny_tokenizer  # byte-level tokenizer; the text encoder is full size

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tiny_tokenizer(Path(tmp))
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD1.5 defaults otherwise
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    # The tokenizer is byte-level (a few hundred ids); the embedding table keeps CLIP-L's size.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=1024,
            hidden_act="gelu",
        )
    )
    motion_adapter = MotionAdapter(motion_max_seq_length=32, use_motion_mid_block=True)
    return BackboneParts(unet, vae, text_encoder, tokenizer), motion_adapter, image_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--offload", default=None, help="one mode (none/model/sequential); default: all on CUDA")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    frames = args.frames or (16 if cuda else 2)
    size = args.size or (512 if cuda else 128)
    steps = args.steps or (30 if cuda else 2)
    modes = [args.offload] if args.offload else (["none", "model", "sequential"] if cuda else ["none"])

    from PIL import Image

    from idanimator.adapter import spatial_cross_attention_names
    from idanimator.models import assemble_pipeline, build_motion_unet, place_pipeline
    from idanimator.pipeline import GenerationSettings, IDAnimatorPipeline
    from idanimator.testing import random_face_adapter

    torch.manual_seed(0)
    t = time.perf_counter()
    parts, motion_adapter, image_encoder = build_parts()
    print(f"built random real-size parts in {time.perf_counter() - t:.1f} s")
    from diffusers import UNetMotionModel

    probe = UNetMotionModel.from_unet2d(parts.unet, motion_adapter)
    names = spatial_cross_attention_names(probe)
    sizes = [probe.get_submodule(n.removesuffix(".processor")).to_q.out_features for n in names]
    del probe
    face = random_face_adapter(
        sizes, cross_attention_dim=768, clip_dim=1280, resampler_hidden=768, num_tokens=16, rank=128
    )
    counts = (len(face.image_proj), len(face.face_adapter), face.num_parameters())
    print(
        f"face adapter: {counts[0]} image_proj + {counts[1]} face_adapter tensors, {counts[2]:,} parameters "
        f"(release: {RELEASE_IMAGE_PROJ_TENSORS} + {RELEASE_FACE_ADAPTER_TENSORS}, {RELEASE_PARAMETERS:,})"
    )
    assert counts == (RELEASE_IMAGE_PROJ_TENSORS, RELEASE_FACE_ADAPTER_TENSORS, RELEASE_PARAMETERS)
    print(f"cross-attention layers: {len(names)} (indices 1..{2 * len(names) - 1}); motion-module processors skipped")

    face_image = Image.new("RGB", (224, 224), (180, 140, 120))
    dtype = torch.float16 if cuda else torch.float32
    print(f"\n{'offload':<11}{'size':>10}{'frames':>7}{'steps':>6}{'s/step':>9}{'s/video':>9}{'peak GiB':>10}")
    for mode in modes:
        t = time.perf_counter()
        unet = build_motion_unet(parts, motion_adapter, face)
        install_s = time.perf_counter() - t
        pipe = assemble_pipeline(parts, unet, image_encoder)
        place_pipeline(pipe, args.device, dtype, mode)
        model = IDAnimatorPipeline(pipe, device=args.device, dtype=dtype, offload=mode)
        settings = GenerationSettings(
            prompt="a person smiling", num_frames=frames, steps=steps, height=size, width=size, seed=0
        ).validate()
        step_times = []
        last = [time.perf_counter()]

        def on_step(step, total, latents, step_times=step_times, last=last):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        last[0] = t
        model.generate([face_image], settings, callback=on_step)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - t
        per_step = sorted(step_times)[len(step_times) // 2]
        peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan")
        print(
            f"{mode:<11}{f'{size}x{size}':>10}{frames:>7}{steps:>6}{per_step:>9.3f}{total:>9.1f}{peak:>10.2f}"
            f"   (face adapter install + LoRA fusion {install_s:.1f} s)"
        )
        del model, pipe, unet
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
