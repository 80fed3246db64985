"""Structure control on the tiny kit: SparseCtrl keyframes and a canny ControlNet steer the video, the face still
reaches every spatial cross-attention, bad inputs get one sentence, and the cached pipeline is left as it was."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from idanimator.adapter import spatial_cross_attention_names
from idanimator.errors import InvalidImageError, InvalidRequestError, WeightsUnavailableError
from idanimator.extras import control
from idanimator.extras.conditions import preview_condition
from idanimator.extras.control_models import ControlModels
from idanimator.models import PerFrameGroupNorm
from idanimator.pipeline import IDAnimatorPipeline
from idanimator.request import ControlSpec, GenerationRequest, KeyFrame
from idanimator.tiny import TINY_SETTINGS
from idanimator.tiny.control_kit import tiny_control_models
from idanimator.tiny.kit import TINY_NUM_TOKENS
from idanimator.video import write_mp4

# One step without classifier-free guidance: a quarter of the work, and the face still enters (its conditional half).
FAST = {**TINY_SETTINGS, "num_inference_steps": 1, "seed": 7, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def control_paths(tiny_kit):
    return tiny_control_models()  # beside the session's tiny kit, sized from its UNet (what tiny mode uses)


def with_control_models(pipeline, models: ControlModels) -> IDAnimatorPipeline:
    """A pipeline on ``pipeline``'s modules whose controls take their models from ``models``."""
    return IDAnimatorPipeline(
        pipeline.pipe,
        dtype=pipeline.dtype,
        detector=pipeline.detector,
        face_cache=pipeline.face_cache,
        control_models=models,
    )


@pytest.fixture(scope="module")
def pipe(tiny_pipe, control_paths):
    """The session's tiny pipeline's modules with the tiny control models (as the service would give them)."""
    return with_control_models(tiny_pipe, ControlModels(control_paths))


@pytest.fixture(scope="module")
def crops(pipe, astronaut_path, second_face):
    return pipe.prepare_faces([astronaut_path, second_face])


@pytest.fixture(scope="module")
def sketch_path(tmp_path_factory):
    """A drawing as people make them: dark lines on white paper (the model reads it inverted)."""
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 10, 66, 46), outline="black", width=4)
    draw.line((48, 46, 48, 80), fill="black", width=4)
    draw.line((20, 60, 76, 60), fill="black", width=4)
    path = tmp_path_factory.mktemp("sketch") / "figure.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def driving_video(tmp_path_factory, astronaut):
    """A real photo panning across 10 frames, as an H.264 MP4."""
    photo = np.asarray(astronaut.resize((128, 128)))
    path = tmp_path_factory.mktemp("video") / "drive.mp4"
    return write_mp4([np.roll(photo, 12 * i, axis=1) for i in range(10)], path, fps=8)


def generate(pipe, crops, control_spec=None, **overrides):
    return pipe(crops, "a man walking", **{**FAST, **overrides}, control=control_spec, output_type="np").frames[0]


@contextmanager
def face_token_log(unet):
    """Record, for every call of every spatial cross-attention of the UNet, whether face tokens came with the
    text (diffusers hands them over as ``encoder_hidden_states=(text, [face tokens])``)."""
    names = [name.removesuffix(".processor") for name in spatial_cross_attention_names(unet)]
    log = {name: [] for name in names}

    def hook(name):
        def record(module, args, kwargs):
            states = kwargs.get("encoder_hidden_states")
            faces = states[1][0] if isinstance(states, tuple) else None
            rows = args[0].shape[0]  # one per frame (and per guidance half): each must get its face tokens
            log[name].append(faces is not None and faces.shape[:2] == (rows, TINY_NUM_TOKENS) and bool(faces.any()))

        return record

    handles = [unet.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def plain(pipe, crops):
    return generate(pipe, crops[:1])


@pytest.fixture(scope="module")
def sketch_runs(pipe, crops, sketch_path, plain):
    """The same sketch at frame 0 and at frame 7 (after `plain`, so that one saw no control before it)."""
    runs = {}
    for frame in (0, 7):
        spec = ControlSpec("sparse-sketch", keyframes=(KeyFrame(sketch_path, frame),))
        with face_token_log(pipe.pipe.unet) as log:
            runs[frame] = generate(pipe, crops[:1], spec)
        runs[f"log{frame}"] = log
    return runs


@pytest.fixture(scope="module")
def canny_runs(pipe, crops, driving_video, plain):
    """Two faces under the same driving video; the first face once more with classifier-free guidance (its
    unconditional face half and the doubled condition frames go through the ControlNet pipeline too)."""
    spec = ControlSpec("canny", video=driving_video)
    runs = {"first": generate(pipe, crops[:1], spec), "second": generate(pipe, crops[1:], spec)}
    with face_token_log(pipe.pipe.unet) as runs["log"]:
        generate(pipe, crops[:1], spec, guidance_scale=8.0)
    return runs


# -- the control steers -------------------------------------------------------------------------


def test_a_sketch_keyframe_changes_the_video_most_at_its_own_frame(sketch_runs, plain):
    for frame in (0, 7):
        assert np.abs(sketch_runs[frame] - plain).max() > 1e-2
    per_frame = np.abs(sketch_runs[0] - sketch_runs[7]).mean(axis=(1, 2, 3))
    assert set(np.argsort(per_frame)[-2:]) == {0, 7}  # moving the keyframe moves the change
    assert per_frame[[0, 7]].min() > 3 * np.median(per_frame)


def test_an_rgb_keyframe_changes_the_video(pipe, crops, astronaut_path, plain):
    video = generate(pipe, crops[:1], ControlSpec("sparse-rgb", keyframes=(KeyFrame(astronaut_path, 3),)))
    assert np.abs(video - plain).max() > 1e-2


def test_rgb_keyframes_are_encoded_the_same_every_time(pipe, control_paths):
    """The VAE posterior's mode, not a draw from the global generator: one seed, one video."""
    sparse = control.control_pipeline(pipe.pipe, "sparse-rgb", pipe.control_models.get("sparse-rgb"))
    image = Image.new("RGB", (64, 64), (200, 30, 90))
    first, second = (sparse.prepare_image([image], 64, 64, "cpu", torch.float32) for _ in range(2))
    assert first.shape == (1, 4, 1, 8, 8)
    assert torch.equal(first, second)


def test_a_canny_driving_video_changes_the_video_and_the_face_still_matters(canny_runs, plain):
    assert np.abs(canny_runs["first"] - plain).max() > 1e-2
    assert np.abs(canny_runs["first"] - canny_runs["second"]).max() > 1e-2  # another face, another video


@pytest.mark.parametrize("runs", ["sketch", "canny"])
def test_face_tokens_reach_every_spatial_cross_attention_under_control(runs, sketch_runs, canny_runs):
    logs = [sketch_runs["log0"], sketch_runs["log7"]] if runs == "sketch" else [canny_runs["log"]]
    for log in logs:
        assert log and all(calls for calls in log.values())  # every spatial cross-attention ran
        assert all(all(calls) for calls in log.values())  # and got the face tokens every time


def test_sparsectrl_motion_modules_normalise_each_frame(pipe):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    model = pipe.control_models.get("sparse-sketch")
    norms = [m.norm for m in model.modules() if isinstance(m, AnimateDiffTransformer3D)]
    assert norms and all(isinstance(norm, PerFrameGroupNorm) for norm in norms)


def test_the_cached_pipeline_is_unchanged_after_control(pipe, crops, plain, sketch_runs, canny_runs):
    diffusers_pipe = pipe.pipe
    processors = dict(diffusers_pipe.unet.attn_processors)
    components = dict(diffusers_pipe.components)
    after = generate(pipe, crops[:1])
    assert np.array_equal(after, plain)
    assert dict(diffusers_pipe.components) == components
    assert all(diffusers_pipe.unet.attn_processors[k] is v for k, v in processors.items())
    modules = [m for part in ("unet", "vae", "text_encoder") for m in getattr(diffusers_pipe, part).modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert {p.dtype for p in diffusers_pipe.unet.parameters()} == {pipe.dtype}


def test_strength_zero_is_no_control_and_loads_nothing():
    base, arguments = object(), {"prompt": "x"}
    request = GenerationRequest(prompt="x", **TINY_SETTINGS, control=ControlSpec("canny", video="x.mp4", strength=0))
    with control.structure_control(base, request, ControlModels({"canny": "/nowhere"}), arguments) as inside:
        assert inside == (base, {"prompt": "x"})


# -- what is fed ----------------------------------------------------------------------------------


def test_preview_shows_the_edges_fed_for_each_frame(driving_video):
    images = preview_condition(ControlSpec("canny", video=driving_video), 8, (64, 96))
    assert [im.info["caption"] for im in images] == [f"frame {i}" for i in range(8)]
    assert all(im.size == (96, 64) for im in images)
    pixels = np.asarray(images[0])
    assert set(np.unique(pixels)) <= {0, 255} and 0 < pixels.mean() < 128  # white edges on black


def test_preview_shows_keyframes_as_white_lines_on_black_at_their_frames(sketch_path, astronaut_path):
    keys = (KeyFrame(astronaut_path, 5), KeyFrame(sketch_path, 2))
    images = preview_condition(ControlSpec("sparse-sketch", keyframes=keys), 8, (64, 64))
    assert [im.info["caption"] for im in images] == ["frame 2", "frame 5"]
    assert np.asarray(images[0]).mean() < 60  # the paper drawing, inverted


# -- errors: one sentence each --------------------------------------------------------------------


def one_sentence(error) -> bool:
    text = str(error.value)
    return text.endswith(".") and ". " not in text.rstrip(".")


def test_a_control_image_that_is_not_an_image(pipe, crops, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    with pytest.raises(InvalidImageError) as error:
        generate(pipe, crops[:1], ControlSpec("sparse-rgb", keyframes=(KeyFrame(junk, 0),)))
    assert "notes.png" in str(error.value) and one_sentence(error)


def test_a_keyframe_outside_the_video(pipe, crops, sketch_path):
    with pytest.raises(InvalidRequestError, match="frame 8") as error:
        generate(pipe, crops[:1], ControlSpec("sparse-sketch", keyframes=(KeyFrame(sketch_path, 8),)))
    assert one_sentence(error)


def test_two_keyframes_at_one_frame(pipe, crops, sketch_path, astronaut_path):
    keys = (KeyFrame(sketch_path, 4), KeyFrame(astronaut_path, 4))
    with pytest.raises(InvalidRequestError, match="frame 4") as error:
        generate(pipe, crops[:1], ControlSpec("sparse-sketch", keyframes=keys))
    assert one_sentence(error)


def test_a_driving_video_shorter_than_the_request(pipe, crops, driving_video):
    with pytest.raises(InvalidRequestError, match="only 10 frames but 12") as error:
        generate(pipe, crops[:1], ControlSpec("canny", video=driving_video), num_frames=12)
    assert one_sentence(error)


def test_an_unreadable_driving_video(pipe, crops, tmp_path):
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not really a video")
    with pytest.raises(InvalidRequestError, match="clip.mp4") as error:
        generate(pipe, crops[:1], ControlSpec("openpose", video=broken))
    assert one_sentence(error)


def test_a_colour_video_for_depth(pipe, crops, driving_video):
    with pytest.raises(InvalidRequestError, match="depth rendering") as error:
        generate(pipe, crops[:1], ControlSpec("depth", video=driving_video))
    assert one_sentence(error)


def test_a_control_model_that_cannot_be_had_offline(pipe, crops, driving_video):
    # The registry's models, which are neither cached nor downloadable in the tests (HF_HUB_OFFLINE).
    with pytest.raises(WeightsUnavailableError, match="lllyasviel/control_v11p_sd15_canny") as error:
        generate(with_control_models(pipe, ControlModels()), crops[:1], ControlSpec("canny", video=driving_video))
    assert one_sentence(error)


@pytest.mark.parametrize(
    "kind, folder, message",
    [("canny", "sparse-sketch", "holds a SparseControlNetModel"), ("sparse-rgb", "sparse-sketch", "sketch")],
)
def test_a_control_model_of_the_wrong_kind(control_paths, kind, folder, message):
    with pytest.raises(WeightsUnavailableError, match=message) as error:
        ControlModels({kind: control_paths[folder]}).get(kind)
    assert one_sentence(error)


def test_a_control_model_folder_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist") as error:
        ControlModels({"depth": tmp_path / "missing"}).get("depth")
    assert one_sentence(error)
