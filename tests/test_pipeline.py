"""End to end on the tiny kit: a real face photo in, a video out, through the same code as real weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from idanimator.errors import GenerationCancelled, InvalidRequestError
from idanimator.tiny import TINY_SETTINGS
from tests.helpers import read_video


@pytest.fixture(scope="module")
def crops(tiny_pipe, astronaut_path, second_face):
    return tiny_pipe.prepare_faces([astronaut_path, second_face])


def generate(pipe, faces, **overrides):
    return pipe(faces, "a man walking on the moon", **{**TINY_SETTINGS, "seed": 7, "output_type": "np", **overrides})


def test_cli_generates_an_mp4_with_the_requested_frames_and_size(astronaut_path, tmp_path, tiny_kit):
    out = tmp_path / "out.mp4"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "idanimator",
            "generate",
            "--tiny",
            "--detector",
            "retinaface",
            "--face",
            str(astronaut_path),
            "--prompt",
            "a man smiling",
            "--out",
            str(out),
            "--frames",
            "6",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "96",
            "--seed",
            "3",
            "--fps",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed: 3" in proc.stdout
    video = read_video(out)
    assert video.shape == (6, 64, 96, 3)


def test_same_seed_same_video_other_seed_other_video(tiny_pipe, crops):
    a = generate(tiny_pipe, crops[:1])
    b = generate(tiny_pipe, crops[:1])
    c = generate(tiny_pipe, crops[:1], seed=8)
    assert a.frames[0].shape == (8, 64, 64, 3)
    assert np.array_equal(a.frames[0], b.frames[0])
    assert np.abs(a.frames[0] - c.frames[0]).max() > 1e-3


def test_random_seed_is_reported_and_reproduces(tiny_pipe, crops):
    first = generate(tiny_pipe, crops[:1], seed=None)
    assert 0 <= first.seed < 2**32
    again = generate(tiny_pipe, crops[:1], seed=first.seed)
    assert np.array_equal(first.frames[0], again.frames[0])
    assert generate(tiny_pipe, crops[:1], seed=-1).seed != first.seed


def test_id_scale_zero_and_one_differ(tiny_pipe, crops):
    zero = generate(tiny_pipe, crops[:1], id_scale=0.0)
    one = generate(tiny_pipe, crops[:1], id_scale=1.0)
    assert np.abs(zero.frames[0] - one.frames[0]).max() > 1e-3


def test_the_face_decides_the_video(tiny_pipe, crops):
    a = generate(tiny_pipe, crops[:1], id_scale=1.0)
    b = generate(tiny_pipe, crops[1:], id_scale=1.0)
    assert np.abs(a.frames[0] - b.frames[0]).max() > 1e-3


def test_two_faces_average_their_tokens(tiny_pipe, crops):
    embeds = tiny_pipe.encode_faces(crops)  # [uncond/cond, faces, seq, dim]
    assert embeds.shape[:2] == (2, 2)
    project = tiny_pipe.pipe.unet.encoder_hid_proj
    with torch.no_grad():
        both = project([embeds])[0]
        each = [project([embeds[:, i : i + 1]])[0] for i in range(2)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    mixed = generate(tiny_pipe, crops, id_scale=1.0)
    single = generate(tiny_pipe, crops[:1], id_scale=1.0)
    assert np.abs(mixed.frames[0] - single.frames[0]).max() > 1e-4


def test_photos_are_detected_and_aligned_inside_the_call(tiny_pipe, astronaut_path, crops):
    from_path = generate(tiny_pipe, [astronaut_path])
    from_crop = generate(tiny_pipe, crops[:1])
    assert np.array_equal(from_path.frames[0], from_crop.frames[0])
    assert from_path.faces[0].image.size == (224, 224)


def test_face_features_are_cached_by_image(tiny_pipe, crops):
    generate(tiny_pipe, crops[:1])
    before = tiny_pipe.face_cache.misses
    generate(tiny_pipe, crops[:1], seed=99)
    assert tiny_pipe.face_cache.misses == before
    from dataclasses import replace

    from PIL import Image

    unseen = replace(crops[0], image=crops[0].image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    generate(tiny_pipe, [unseen])
    generate(tiny_pipe, [unseen], seed=98)
    assert tiny_pipe.face_cache.misses == before + 1  # a new face runs the encoder once


def test_callback_sees_every_step_and_the_latents(tiny_pipe, crops):
    seen = []
    generate(
        tiny_pipe,
        crops[:1],
        num_inference_steps=3,
        callback=lambda step, total, latents: seen.append((step, total, latents.shape)),
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] == 3
    assert seen[0][2] == (1, 4, 8, 8, 8)


def test_stop_request_stops_and_the_pipeline_still_works(tiny_pipe, crops):
    steps = []

    def should_stop():
        return len(steps) >= 1

    with pytest.raises(GenerationCancelled):
        generate(
            tiny_pipe,
            crops[:1],
            num_inference_steps=5,
            callback=lambda step, total, latents: steps.append(step),
            should_stop=should_stop,
        )
    assert steps == [0]
    assert generate(tiny_pipe, crops[:1]).frames[0].shape[0] == 8


def test_without_guidance_the_conditional_face_branch_alone_runs(tiny_pipe, crops):
    # The unconditional face is CLIP of a zeros image, the same for every photo: were it used as the
    # condition, two different faces would give the same video.
    a = generate(tiny_pipe, crops[:1], guidance_scale=1.0, id_scale=1.0)
    b = generate(tiny_pipe, crops[1:2], guidance_scale=1.0, id_scale=1.0)
    assert a.frames[0].shape == (8, 64, 64, 3)
    assert np.abs(a.frames[0] - b.frames[0]).max() > 1e-3


def test_long_prompt_is_cut_with_a_warning(tiny_pipe, crops):
    result = tiny_pipe(crops[:1], "a very long prompt " * 40, **{**TINY_SETTINGS, "seed": 1})
    assert any("77 tokens" in w for w in result.warnings)


def test_ordinary_prompts_fit_the_tiny_tokenizer_as_they_fit_clips(tiny_pipe, crops):
    """The tiny kit's tokenizer is not byte-per-token: an example prompt plus the suffix fits in 77 tokens."""
    result = tiny_pipe(crops[:1], "a man filming with a camera in a park, autumn leaves falling", **TINY_SETTINGS)
    assert result.warnings == []


def test_long_prompts_reach_the_tokenizer_whole(tiny_pipe):
    """Cut by the tokenizer's own truncation inside the pipeline, never decoded and encoded again here."""
    from idanimator.request import GenerationRequest

    settings = GenerationRequest(prompt="a very long prompt " * 40).validate()
    warnings = []
    prompt, negative = tiny_pipe._final_prompts(settings, warnings)  # what denoise() hands diffusers
    assert prompt == settings.prompt + " 8k uhd, high quality, medium shot"
    assert negative.startswith("(deformed iris") and negative.endswith("UnrealisticDream long shots, full body")
    assert len(warnings) == 1


def test_prompt_suffix_is_on_by_default_and_can_be_switched_off(tiny_pipe, crops):
    with_suffix = generate(tiny_pipe, crops[:1])
    without = generate(tiny_pipe, crops[:1], add_prompt_suffix=False)
    assert np.abs(with_suffix.frames[0] - without.frames[0]).max() > 1e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_frames": 0}, "Frames"),
        ({"num_frames": 129}, "Frames"),
        ({"num_inference_steps": -1}, "Steps"),
        ({"height": 65}, "multiple of 8"),
        ({"width": 4096}, "Width"),
        ({"guidance_scale": float("nan")}, "Guidance"),
        ({"id_scale": float("inf")}, "ID scale"),
        ({"seed": 2**32}, "Seed"),
        ({"seed": -5}, "Seed"),
    ],
)
def test_out_of_range_settings_are_refused_with_a_sentence(tiny_pipe, crops, overrides, message):
    with pytest.raises(InvalidRequestError, match=message):
        generate(tiny_pipe, crops[:1], **overrides)


def test_empty_prompt_is_refused(tiny_pipe, crops):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        tiny_pipe(crops[:1], " \n\t ", **TINY_SETTINGS)


def test_control_characters_emoji_and_other_scripts(tiny_pipe, crops):
    result = tiny_pipe(crops[:1], "un homme\x00\x07 qui sourit 😀 宇航员", **{**TINY_SETTINGS, "seed": 1})
    assert "\x00" not in result.request.prompt and "😀" in result.request.prompt


def test_single_file_backbone_gives_the_same_video_as_its_folder(tiny_kit, tiny_pipe, crops, detector):
    from idanimator.pipeline import IDAnimatorPipeline

    single = IDAnimatorPipeline.from_pretrained(tiny_kit["single_file"], tiny=True, device="cpu", detector=detector)
    assert np.array_equal(generate(single, crops[:1]).frames[0], generate(tiny_pipe, crops[:1]).frames[0])


def test_converted_checkpoint_generates_the_identical_video(tiny_kit, tiny_pipe, crops, detector, tmp_path):
    from idanimator.cli import main
    from idanimator.pipeline import IDAnimatorPipeline

    out = tmp_path / "adapter.safetensors"
    assert main(["convert-checkpoint", str(tiny_kit["face_adapter"]), str(out)]) == 0
    converted = IDAnimatorPipeline.from_pretrained(tiny=True, face_adapter=out, device="cpu", detector=detector)
    assert np.array_equal(generate(converted, crops[:1]).frames[0], generate(tiny_pipe, crops[:1]).frames[0])


def test_decoding_in_chunks_gives_the_same_frames(tiny_pipe, crops):
    from idanimator.request import GenerationRequest

    settings = GenerationRequest(prompt="a man", seed=5, **TINY_SETTINGS).validate()
    whole = tiny_pipe(crops[:1], request=settings, output_type="np").frames[0]
    latents = tiny_pipe.denoise(crops[:1], settings).latents
    parts = np.concatenate([tiny_pipe.decode(latents, i, i + 3) for i in range(0, 8, 3)])
    np.testing.assert_allclose(parts, whole, atol=1e-5)


def test_whole_numbers_sent_as_floats_become_integers():
    from idanimator.request import GenerationRequest

    settings = GenerationRequest(
        prompt="a man", num_frames=10.0, num_inference_steps=3.0, height=64.0, width=64, seed=7.0
    )
    checked = settings.validate()
    assert (checked.num_frames, checked.num_inference_steps, checked.height, checked.seed) == (10, 3, 64, 7)
    assert all(type(v) is int for v in (checked.num_frames, checked.num_inference_steps, checked.height, checked.seed))
    with pytest.raises(InvalidRequestError, match="whole number"):
        GenerationRequest(prompt="a man", num_frames=10.5).validate()


def test_a_request_is_validated_once_and_given_whole_or_by_name(tiny_pipe, crops):
    from idanimator.request import GenerationRequest

    request = GenerationRequest(prompt="a man", seed=5, **TINY_SETTINGS).validate()
    assert request.validate() is request  # checked once: a validated request is not checked again
    assert request.replace(num_inference_steps=3).validate() is not request
    by_name = tiny_pipe(crops[:1], "a man", seed=5, **TINY_SETTINGS, output_type="np").frames[0]
    assert np.array_equal(tiny_pipe(crops[:1], request=request, output_type="np").frames[0], by_name)
    with pytest.raises(InvalidRequestError, match="Unknown setting"):
        tiny_pipe(crops[:1], "a man", num_franes=8)
    with pytest.raises(InvalidRequestError, match="either as a request or by name"):
        tiny_pipe(crops[:1], "a man", request=request)
