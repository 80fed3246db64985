"""The model and its defaults against the released ID-Animator, re-derived from the release's published code.

Everything expected here is written out from the release (github.com/ID-Animator/ID-Animator: `app.py`,
`infer.py`, `inference-v2.yaml`, `faceadapter/face_adapter.py`, `animatediff/pipelines/pipeline_animation.py`,
`animatediff/models/motion_module.py`) without calling the library's helpers: face alignment, CLIP
preprocessing, the resampler, prompts, the DDIM schedule and update, classifier-free guidance and decoding.
The library's public call is the thing under test; the loaded UNet, VAE, text encoder and image encoder of the
tiny random kit are used as black boxes where the reference cannot avoid them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from PIL import Image

from tests.test_adapter import release_resampler

# -- the release's literal values ----------------------------------------------------------------

# app.py: generate_image appends these to the user's prompts.
RELEASE_PROMPT_SUFFIX = " 8k uhd, high quality, medium shot"
RELEASE_NEGATIVE_SUFFIX = " long shots, full body"
# app.py: the "Negative Prompt" textbox's value.
RELEASE_NEGATIVE_PROMPT = (
    "(deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, anime), text, "
    "cropped, out of frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra "
    "fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad "
    "anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing "
    "arms, missing legs, extra arms, extra legs, fused fingers, too many fingers, long neck, UnrealisticDream"
)
# infer.py: video_length 16, 30 steps, guidance 8, scale 0.8, 512x512; save_videos_grid's fps 9.
RELEASE_FRAMES, RELEASE_STEPS, RELEASE_GUIDANCE, RELEASE_ID_SCALE = 16, 30, 8.0, 0.8
RELEASE_HEIGHT = RELEASE_WIDTH = 512
RELEASE_FPS = 9
# inference-v2.yaml: DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
# clip_sample=False); diffusers' defaults then: "leading" spacing, set_alpha_to_one=True, epsilon prediction.
# 30 "leading" steps: step ratio 1000 // 30 = 33, timesteps 33 * (29..0) + 1.
RELEASE_TIMESTEPS_30 = [958, 925, 892, 859, 826, 793, 760, 727, 694, 661, 628, 595, 562, 529, 496]
RELEASE_TIMESTEPS_30 += [463, 430, 397, 364, 331, 298, 265, 232, 199, 166, 133, 100, 67, 34, 1]
# AnimationPipeline.decode_latents: `latents = 1 / 0.18215 * latents`, one frame at a time.
RELEASE_LATENT_SCALE = 0.18215
# CLIPImageProcessor() defaults: OpenAI CLIP's mean and std.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# Tiny sizes for the end-to-end comparison (everything else is the library's default).
FRAMES, SIZE, SEED = 8, 64, 1234
PROMPT = "a person walking in a park"


# -- the release's inference, written out --------------------------------------------------------


def release_face_crop(path, detector) -> Image.Image:
    """app.py/infer.py: 5 landmarks -> face_align.norm_crop(photo, kps, 112) -> PIL resize to 224 (bicubic).

    The release took insightface's first detection; with one face in the photo that is also the largest.
    """
    from insightface.utils.face_align import norm_crop

    rgb = np.asarray(Image.open(path).convert("RGB"))
    faces = detector.detect(rgb)
    assert faces, "the reference photo has no detectable face"
    face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    landmarks = np.asarray(face.landmarks, dtype=np.float32).reshape(5, 2)
    with warnings.catch_warnings():  # norm_crop uses scikit-image's deprecated SimilarityTransform.estimate
        warnings.simplefilter("ignore", FutureWarning)
        aligned = norm_crop(np.ascontiguousarray(rgb), landmarks, 112)
    return Image.fromarray(aligned).resize((224, 224), Image.Resampling.BICUBIC)


def clip_pixels(image: Image.Image) -> torch.Tensor:
    """CLIPImageProcessor(): shortest side to 224 (bicubic), centre crop 224, x / 255, OpenAI mean/std."""
    width, height = image.size
    if min(width, height) != 224:
        scale = 224 / min(width, height)
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
        width, height = image.size
    left, top = (width - 224) // 2, (height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = (x - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def release_face_tokens(crop: Image.Image, image_encoder, image_proj: dict) -> torch.Tensor:
    """FaceAdapterPlusForVideoLora.get_image_embeds: CLIP penultimate hidden states -> resampler, for the crop
    (conditional) and for torch.zeros_like(pixel_values) (unconditional). Returns [uncond, cond] tokens."""
    pixels = clip_pixels(crop)
    heads = image_proj["layers.0.0.to_q.weight"].shape[0] // 64  # the release's heads = width / dim_head 64
    tokens = []
    for x in (torch.zeros_like(pixels), pixels):
        features = image_encoder(x, output_hidden_states=True).hidden_states[-2]
        tokens.append(release_resampler(features, image_proj, heads))
    return torch.cat(tokens)


def release_text(pipe, text: str) -> torch.Tensor:
    """AnimationPipeline.encode_prompt: padded/truncated to 77 tokens, the text encoder's last hidden state."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def release_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)  # beta_schedule "linear"
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(steps: int) -> list[int]:
    """DDIM "leading" spacing with steps_offset 1."""
    ratio = 1000 // steps
    return [ratio * i + 1 for i in reversed(range(steps))]


def ddim_step(eps: torch.Tensor, t: int, x: torch.Tensor, steps: int, alphas: torch.Tensor) -> torch.Tensor:
    """DDIM, eta 0, epsilon prediction, no clipping; the step before t=0 uses alpha 1 (set_alpha_to_one)."""
    prev = t - 1000 // steps
    a_t = alphas[t].item()
    a_prev = alphas[prev].item() if prev >= 0 else 1.0
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


class _GivenTokens(torch.nn.Module):
    """Stands in for the UNet's image projection: the reference's own face tokens go in unchanged."""

    def forward(self, image_embeds):
        return image_embeds


def release_face_attention_names(unet) -> list[str]:
    """Every spatial cross-attention (the release puts its face processor on every non-attn1 processor of its
    UNet3D, whose motion modules are not diffusers attention)."""
    return [n for n in unet.attn_processors if "motion_modules" not in n and n.endswith("attn2.processor")]


@torch.no_grad()
def release_video(pipe, crop, image_proj, prompt, negative, *, frames, size, steps, seed) -> np.ndarray:
    """The release's generate(): CFG batch [negative text + uncond face, text + face], guidance 8, ID scale
    0.8, DDIM, decode per frame. Returns [frames, height, width, 3] float32 in [0, 1]."""
    unet, vae = pipe.unet, pipe.vae
    tokens = release_face_tokens(crop, pipe.image_encoder, image_proj)
    text = torch.cat([release_text(pipe, negative), release_text(pipe, prompt)])
    text = text.repeat_interleave(frames, dim=0)  # the release's UNet3D repeats the text for every frame
    alphas = release_alphas_cumprod()
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, frames, size // 8, size // 8), generator=generator)  # init_noise_sigma 1

    face_processors = {n: unet.attn_processors[n] for n in release_face_attention_names(unet)}
    assert face_processors and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in face_processors.values())
    scales = {n: p.scale for n, p in face_processors.items()}
    projection = unet.encoder_hid_proj
    try:
        for processor in face_processors.values():
            processor.scale = [RELEASE_ID_SCALE]
        unet.encoder_hid_proj = _GivenTokens()
        for t in leading_timesteps(steps):
            eps = unet(
                torch.cat([latents] * 2),
                torch.tensor(t),
                encoder_hidden_states=text,
                added_cond_kwargs={"image_embeds": [tokens]},
            ).sample
            uncond, cond = eps.chunk(2)
            latents = ddim_step(uncond + RELEASE_GUIDANCE * (cond - uncond), t, latents, steps, alphas)
    finally:
        unet.encoder_hid_proj = projection
        for name, processor in face_processors.items():
            processor.scale = scales[name]

    latents = (latents / RELEASE_LATENT_SCALE)[0].transpose(0, 1)  # [frames, 4, h, w]
    video = torch.cat([vae.decode(latents[i : i + 1]).sample for i in range(frames)])
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


@pytest.fixture(scope="module")
def image_proj(tiny_kit) -> dict:
    """The kit's resampler weights read straight from its animator.ckpt (the release's layout A)."""
    return torch.load(tiny_kit["face_adapter"], map_location="cpu", weights_only=True)["image_proj"]


# -- 1. the whole model against the release ------------------------------------------------------


def test_scheduler_is_the_releases_ddim(tiny_pipe):
    import copy

    scheduler = copy.deepcopy(tiny_pipe.pipe.scheduler)
    scheduler.set_timesteps(RELEASE_STEPS)
    assert leading_timesteps(RELEASE_STEPS) == RELEASE_TIMESTEPS_30
    assert scheduler.timesteps.tolist() == RELEASE_TIMESTEPS_30
    assert scheduler.init_noise_sigma == 1.0
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), release_alphas_cumprod(), atol=1e-6, rtol=1e-5)
    alphas = release_alphas_cumprod()
    generator = torch.Generator().manual_seed(0)
    for t in RELEASE_TIMESTEPS_30:
        x, eps = torch.randn(2, 1, 4, 2, 3, 3, generator=generator)
        ours = scheduler.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, ddim_step(eps, t, x, RELEASE_STEPS, alphas), atol=1e-5, rtol=1e-5)


def test_defaults_reproduce_the_release_end_to_end(tiny_pipe, detector, astronaut_path, image_proj):
    result = tiny_pipe(
        face_images=[astronaut_path],
        prompt=PROMPT,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        seed=SEED,
        output_type="np",
    )
    video = result.frames[0]

    crop = release_face_crop(astronaut_path, detector)
    ours = np.asarray(result.faces[0].image.convert("RGB"), dtype=np.int16)
    theirs = np.asarray(crop, dtype=np.int16)
    assert ours.shape == theirs.shape == (224, 224, 3)
    assert np.array_equal(ours, theirs), f"aligned crop differs by up to {np.abs(ours - theirs).max()} levels"

    expected = release_video(
        tiny_pipe.pipe,
        crop,
        image_proj,
        PROMPT + RELEASE_PROMPT_SUFFIX,
        RELEASE_NEGATIVE_PROMPT + RELEASE_NEGATIVE_SUFFIX,
        frames=FRAMES,
        size=SIZE,
        steps=RELEASE_STEPS,
        seed=SEED,
    )
    assert result.seed == SEED
    assert video.dtype == np.float32 and video.shape == (FRAMES, SIZE, SIZE, 3)
    error = float(np.abs(video - expected).max())
    assert error < 1e-4, f"frames differ from the release's by up to {error:.2e}"
    assert float(expected.std()) > 0.01  # a real, non-constant video was compared


def test_negative_prompt_gets_the_releases_suffix(tiny_pipe, detector, astronaut_path, image_proj):
    """The default negative prompt fills the tiny tokenizer's 77 tokens, so its suffix is checked on a short one."""
    steps, negative = 3, "blurry"
    result = tiny_pipe(
        [astronaut_path],
        PROMPT,
        negative_prompt=negative,
        num_frames=4,
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        seed=SEED,
        output_type="np",
    )
    expected = release_video(
        tiny_pipe.pipe,
        release_face_crop(astronaut_path, detector),
        image_proj,
        PROMPT + RELEASE_PROMPT_SUFFIX,
        negative + RELEASE_NEGATIVE_SUFFIX,
        frames=4,
        size=SIZE,
        steps=steps,
        seed=SEED,
    )
    error = float(np.abs(result.frames[0] - expected).max())
    assert error < 1e-4, f"frames differ from the release's by up to {error:.2e}"


def test_motion_module_norms_run_per_frame_in_the_loaded_unet(tiny_pipe):
    """motion_module.py: TemporalTransformer3DModel rearranges "b c f h w -> (b f) c h w" before its GroupNorm,
    so every frame is normalised alone. Checked on the pipeline's own UNet, inside each transformer's forward."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    transformers = [m for m in tiny_pipe.pipe.unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
    assert transformers
    generator = torch.Generator().manual_seed(0)
    batch, frames, k = 2, 4, 3
    for transformer in transformers:
        norm = transformer.norm
        assert norm.eps == 1e-6 and norm.affine
        channels = norm.num_channels
        x = torch.randn(batch * frames, channels, 3, 3, generator=generator)
        changed = x.clone()
        changed[k] = changed[k] * 10 + 3  # batch 0, frame k
        seen = []
        handle = norm.register_forward_hook(lambda module, args, output, seen=seen: seen.append(output.detach()))
        try:
            with torch.no_grad():
                transformer(x, num_frames=frames)
                transformer(changed, num_frames=frames)
        finally:
            handle.remove()
        first, second = (out.reshape(batch, channels, frames, 3, 3) for out in seen)
        torch.testing.assert_close(second[:, :, 0], first[:, :, 0], atol=0, rtol=0)
        for f in range(frames):
            per_frame = torch.nn.functional.group_norm(
                x.reshape(batch, frames, channels, 3, 3)[:, f], norm.num_groups, norm.weight, norm.bias, 1e-6
            )
            torch.testing.assert_close(first[:, :, f], per_frame, atol=1e-5, rtol=1e-5)


# -- 2. the defaults of every entry point --------------------------------------------------------


def test_cli_defaults_are_the_releases():
    from idanimator.cli import build_parser
    from idanimator.cli.generate import request_from_args

    args = build_parser().parse_args(["generate", "--face", "x", "--prompt", "p", "--out", "o.mp4"])
    assert_release_request(request_from_args(args).validate())  # steps and guidance: the release's unless --fast


def test_library_request_defaults_are_the_releases():
    """What ``pipe(faces, prompt)`` leaves out is the request's default."""
    from idanimator.request import GenerationRequest

    assert_release_request(GenerationRequest(prompt="p"))


def assert_release_request(request) -> None:
    """Every setting of a GenerationRequest that the release fixes is the release's value."""
    assert request.negative_prompt == RELEASE_NEGATIVE_PROMPT
    assert request.num_frames == RELEASE_FRAMES
    assert request.num_inference_steps == RELEASE_STEPS
    assert request.guidance_scale == RELEASE_GUIDANCE
    assert request.id_scale == RELEASE_ID_SCALE
    assert (request.height, request.width) == (RELEASE_HEIGHT, RELEASE_WIDTH)
    assert request.fps == RELEASE_FPS
    assert request.add_prompt_suffix is True
    assert request.seed is None


def test_app_starting_values_are_the_releases(monkeypatch, tmp_path):
    import gradio as gr

    import app as page
    import idanimator.weights
    from idanimator.studio import Studio, StudioOptions

    monkeypatch.setattr(idanimator.weights, "hub_reachable", lambda: True)  # real mode; nothing is fetched
    engine = Studio(StudioOptions(device="cpu", output_dir=tmp_path))
    assert not engine.tiny
    values = page.starting_values(engine)
    assert values["num_frames"] == RELEASE_FRAMES
    assert values["num_inference_steps"] == RELEASE_STEPS
    assert values["guidance_scale"] == RELEASE_GUIDANCE
    assert values["id_scale"] == RELEASE_ID_SCALE
    assert values["fps"] == RELEASE_FPS
    assert page.resolutions(engine)[values["resolution"]] == (RELEASE_HEIGHT, RELEASE_WIDTH)

    demo = page.build_demo(engine)
    textboxes = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox)]
    negative = [b for b in textboxes if (b.label or "").lower().startswith("negative prompt")]
    assert len(negative) == 1 and negative[0].value == RELEASE_NEGATIVE_PROMPT
    suffix = [b for b in demo.blocks.values() if isinstance(b, gr.Checkbox) and "quality words" in (b.label or "")]
    assert len(suffix) == 1 and suffix[0].value is True
