"""The library as a diffusers user calls it: a snippet written for AnimateDiffPipeline runs on
IDAnimatorPipeline with a face photo added (tiny kit, float32 and bfloat16)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from idanimator.errors import InvalidRequestError


def diffusers_style(pipe, face, dtype=torch.float32):
    """What a diffusers user writes for AnimateDiffPipeline, plus ``face_images``."""
    seen = []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["latents"].dtype))
        return callback_kwargs

    output = pipe(
        prompt="a woman smiling, best quality",
        negative_prompt="bad quality, worse quality",
        num_frames=8,
        guidance_scale=7.5,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(42),
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="pil",
        face_images=face,
    )
    return output, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_animatediff_snippet_runs_with_a_face_and_exports(tiny_kit, detector, astronaut_path, tmp_path, dtype):
    from diffusers.utils import export_to_video

    from idanimator.pipeline import IDAnimatorPipeline

    pipe = IDAnimatorPipeline.from_pretrained(tiny=True, torch_dtype=dtype, detector=detector).to("cpu")
    pipe.enable_vae_slicing()
    output, seen = diffusers_style(pipe, str(astronaut_path), dtype)
    frames = output.frames[0]
    assert len(output.frames) == 1 and len(frames) == 8 and all(isinstance(f, Image.Image) for f in frames)
    assert frames[0].size == (64, 64) and output.seed == 42
    assert [step for step, _ in seen] == [0, 1] and {d for _, d in seen} == {dtype}
    path = export_to_video(frames, str(tmp_path / "out.mp4"), fps=8)
    assert (tmp_path / "out.mp4").stat().st_size > 0 and path.endswith("out.mp4")


def test_a_seed_and_a_generator_with_that_seed_give_the_same_video(tiny_pipe, astronaut_path):
    by_seed = tiny_pipe(
        astronaut_path, "a man", num_frames=4, num_inference_steps=2, height=64, width=64, seed=9, output_type="np"
    )
    by_generator = tiny_pipe(
        face_images=astronaut_path,
        prompt="a man",
        num_frames=4,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(9),
        output_type="np",
    )
    assert by_seed.seed == by_generator.seed == 9
    assert np.array_equal(by_seed.frames, by_generator.frames)


def test_output_types_return_dict_and_ip_adapter_image(tiny_pipe, astronaut_path):
    common = dict(prompt="a man", num_frames=4, num_inference_steps=1, height=64, width=64, seed=3)
    np_frames = tiny_pipe(ip_adapter_image=astronaut_path, output_type="np", **common).frames
    pt_frames = tiny_pipe(ip_adapter_image=astronaut_path, output_type="pt", **common).frames
    (latents,) = tiny_pipe(ip_adapter_image=astronaut_path, output_type="latent", return_dict=False, **common)
    assert np_frames.shape == (1, 4, 64, 64, 3) and pt_frames.shape == (1, 4, 3, 64, 64)
    assert latents.shape == (1, 4, 4, 8, 8)
    np.testing.assert_allclose(pt_frames[0].permute(0, 2, 3, 1).numpy(), np_frames[0], atol=1e-6)
    with pytest.raises(InvalidRequestError, match="output_type must be one of"):
        tiny_pipe(astronaut_path, output_type="gif", **common)
    with pytest.raises(InvalidRequestError, match="face photo"):
        tiny_pipe(output_type="np", **common)


def test_set_ip_adapter_scale_is_the_id_scale_of_calls_that_give_none(tiny_kit, detector, astronaut_path):
    from idanimator.pipeline import IDAnimatorPipeline

    pipe = IDAnimatorPipeline.from_pretrained(tiny=True, detector=detector)
    common = dict(prompt="a man", num_frames=4, num_inference_steps=1, height=64, width=64, seed=3, output_type="np")
    pipe.set_ip_adapter_scale(0.0)
    zero = pipe(astronaut_path, **common)
    assert zero.request.id_scale == 0.0
    assert np.array_equal(zero.frames, pipe(astronaut_path, id_scale=0.0, **common).frames)
    assert not np.array_equal(zero.frames, pipe(astronaut_path, id_scale=1.0, **common).frames)


def test_the_default_negative_prompt_prints_no_tokenizer_notice(tiny_pipe, astronaut_path, caplog, capfd):
    with caplog.at_level(logging.WARNING):
        tiny_pipe(astronaut_path, "a man", num_frames=4, num_inference_steps=1, height=64, width=64, seed=1)
    said = caplog.text + "".join(capfd.readouterr())
    assert "Token indices sequence length" not in said
