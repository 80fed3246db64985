"""The app's engine without the widgets: the pipeline cache, backbone switches, outputs, stop and errors."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from idanimator.errors import GenerationCancelled, InvalidRequestError, NoFaceError
from idanimator.request import ControlSpec, GenerationRequest, KeyFrame, LoraSpec
from idanimator.studio import (
    SEGMENT_FRAMES,
    Finished,
    Job,
    OutputFolder,
    Progress,
    Segment,
    Studio,
    StudioOptions,
    face_strip,
)
from tests.helpers import moving_face_video, read_video


@pytest.fixture(scope="module")
def studio(tiny_kit, detector, tmp_path_factory):
    return Studio(
        StudioOptions(tiny=True, device="cpu", output_dir=tmp_path_factory.mktemp("outputs"), stream_after_s=0),
        detector=detector,
    )


def request(face, **overrides) -> tuple[list, GenerationRequest]:
    """The photos and the request, as the page hands them to the studio."""
    values = dict(
        prompt="a man smiling",
        backbone="tiny",
        seed=11,
        num_frames=8,
        num_inference_steps=3,
        fps=8,
        height=64,
        width=64,
    )
    return [face], GenerationRequest(**{**values, **overrides})


def finish(studio, req, **kwargs):
    events = list(studio.run(*req, **kwargs))
    assert isinstance(events[-1], Finished)
    return events


def test_without_real_weights_the_studio_falls_back_to_tiny(tiny_kit, detector):
    engine = Studio(StudioOptions(device="cpu"), detector=detector)  # the Hub is offline in tests
    assert engine.tiny and "not in the local Hugging Face cache" in engine.tiny_reason


def test_with_the_hub_reachable_the_studio_stays_real_and_downloads_in_the_background(monkeypatch, tmp_path):
    import idanimator.weights

    monkeypatch.setattr(idanimator.weights, "hub_reachable", lambda: True)  # nothing is fetched here
    engine = Studio(StudioOptions(device="cpu", output_dir=tmp_path))
    assert not engine.tiny and engine.needs_download
    assert engine.backbones()[0] == "realistic-vision-v6" and "epicrealism" in engine.backbones()


def test_warm_up_loads_once_and_the_first_request_reuses_it(tiny_kit, detector, astronaut_path, tmp_path):
    engine = Studio(StudioOptions(tiny=True, device="cpu", output_dir=tmp_path), detector=detector)
    engine.warm_up()
    assert engine.ready.is_set() and engine.warm_error is None
    loads = dict(engine.service.loads)
    assert loads["backbone"] == 1
    finish(engine, request(astronaut_path))
    assert dict(engine.service.loads) == loads


def test_a_run_streams_progress_previews_segments_then_the_video(studio, astronaut_path):
    events = finish(studio, request(astronaut_path, num_frames=12))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert any(p.preview is not None for p in progress)
    segments = [e for e in events if isinstance(e, Segment)]
    assert [read_video(s.path).shape[0] for s in segments] == [SEGMENT_FRAMES, 12 - SEGMENT_FRAMES]
    done = events[-1]
    assert read_video(done.video).shape == (12, 64, 64, 3)
    assert done.seed == 11 and done.settings["seed"] == 11


def test_a_video_decoded_quickly_is_not_streamed(studio, astronaut_path):
    """Streaming costs gradio two processes a segment: below `stream_after_s` of decoding, only the video comes."""
    from dataclasses import replace

    before = studio.options
    studio.options = replace(before, stream_after_s=60)
    try:
        events = finish(studio, request(astronaut_path, num_frames=12))
    finally:
        studio.options = before
    assert not [e for e in events if isinstance(e, Segment)]
    assert read_video(events[-1].video).shape[0] == 12


def test_a_video_of_one_segment_is_streamed_as_itself(studio, astronaut_path):
    """No second encode of the same frames: the finished MP4 is the one segment."""
    events = finish(studio, request(astronaut_path, num_frames=SEGMENT_FRAMES))
    segments = [e.path for e in events if isinstance(e, Segment)]
    assert segments == [events[-1].video]
    assert read_video(segments[0]).shape[0] == SEGMENT_FRAMES


def test_a_request_with_every_option_leaves_the_next_plain_video_as_it_was(studio, astronaut_path, tmp_path):
    """Fast mode, FreeInit, a style LoRA and a canny ControlNet together, between two plain requests."""
    drive = moving_face_video(tmp_path, 8)
    plain = read_video(finish(studio, request(astronaut_path))[-1].video)
    lora = next(iter(studio.loras()))
    options = dict(
        fast=True, free_init=True, loras=(LoraSpec(lora, 0.7),), control=ControlSpec("canny", video=str(drive))
    )
    with_options = read_video(finish(studio, request(astronaut_path, **options))[-1].video)
    assert not np.array_equal(with_options, plain)
    assert np.array_equal(read_video(finish(studio, request(astronaut_path))[-1].video), plain)


def test_options_are_checked_with_a_sentence_before_any_work(studio, astronaut_path):
    with pytest.raises(InvalidRequestError, match="Unknown LoRA 'nope'"):
        studio.prepare(*request(astronaut_path, loras=(LoraSpec("nope"),)))
    with pytest.raises(InvalidRequestError, match="placed at frame 8, outside the video's frames 0-7"):
        studio.prepare(*request(astronaut_path, control=ControlSpec("sparse-rgb", (KeyFrame(astronaut_path, 8),))))


def test_second_request_does_not_reload_models(studio, astronaut_path):
    finish(studio, request(astronaut_path))
    loads = dict(studio.service.loads)
    finish(studio, request(astronaut_path, seed=12))
    assert dict(studio.service.loads) == loads


def test_same_seed_same_video(studio, astronaut_path):
    a = finish(studio, request(astronaut_path))[-1].video
    b = finish(studio, request(astronaut_path))[-1].video
    assert a != b and np.array_equal(read_video(a), read_video(b))


def test_backbone_switch_keeps_the_shared_parts(studio, astronaut_path):
    finish(studio, request(astronaut_path, backbone="tiny"))
    before = dict(studio.service.loads)
    finish(studio, request(astronaut_path, backbone="tiny-single-file"))
    after = dict(studio.service.loads)
    assert after["backbone"] == before["backbone"] + 1
    for part in ("motion_adapter", "image_encoder", "face_adapter"):
        assert after[part] == before[part] == 1
    assert studio.service.current_backbone == "tiny-single-file"


def test_face_embeddings_are_cached_across_requests_and_backbones(studio, astronaut_path, second_face):
    finish(studio, request(astronaut_path, backbone="tiny"))
    encoded = studio.service.face_cache.misses  # how often the image encoder ran
    finish(studio, request(astronaut_path, backbone="tiny-single-file", seed=3))
    finish(studio, request(astronaut_path, backbone="tiny", seed=4))
    assert studio.service.face_cache.misses == encoded
    finish(studio, request(second_face, backbone="tiny"))
    assert studio.service.face_cache.misses == encoded + 1


def test_unknown_or_custom_backbones_are_refused_on_a_public_server(studio, astronaut_path):
    with pytest.raises(InvalidRequestError, match="pick one from the list"):
        list(studio.run(*request(astronaut_path, backbone="/etc/passwd")))
    with pytest.raises(InvalidRequestError, match="switched off"):
        studio.prepare(*request(astronaut_path, backbone="/some/local/model.safetensors"))


def test_no_face_is_an_error_and_the_next_request_works(studio, no_face_path, astronaut_path):
    with pytest.raises(NoFaceError):
        list(studio.run(*request(no_face_path)))
    finish(studio, request(astronaut_path))


def test_stop_ends_the_run_at_the_next_step_and_the_next_request_works(studio, astronaut_path):
    stop = threading.Event()
    seen = []
    with pytest.raises(GenerationCancelled):
        for event in studio.run(*request(astronaut_path, num_inference_steps=20), stop=stop, preview_every=100):
            seen.append(event)
            stop.set()
    assert len([e for e in seen if isinstance(e, Progress)]) < 20
    finish(studio, request(astronaut_path))


def test_out_of_range_values_from_the_api_are_refused(studio, astronaut_path):
    for overrides in ({"num_frames": 999}, {"height": 4096}, {"fps": 0}, {"guidance_scale": float("nan")}):
        with pytest.raises(InvalidRequestError):
            list(studio.run(*request(astronaut_path, **overrides)))


def test_output_folder_is_pruned_by_count_and_age(tmp_path):
    folder = OutputFolder(tmp_path, max_files=3, max_age_s=3600)
    paths = []
    for i in range(5):
        path = folder.new_path(".mp4")
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 10 + i, time.time() - 10 + i))
        paths.append(path)
    old = folder.new_path(".mp4")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    folder.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths[2:])
    assert len({p.name for p in paths}) == 5  # random names never collide


def test_cuda_out_of_memory_is_caught_memory_freed_and_the_next_request_runs(studio, astronaut_path, monkeypatch):
    import torch

    from idanimator.errors import GPUOutOfMemoryError

    finish(studio, request(astronaut_path))
    pipe = studio.service.pipeline("tiny")

    def out_of_memory(*args, **kwargs):  # the fault, injected where CUDA would raise it
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipe, "denoise", out_of_memory)
    with pytest.raises(GPUOutOfMemoryError, match="fewer frames"):
        list(studio.run(*request(astronaut_path)))
    assert studio.service.current_backbone is None  # the pipeline was dropped and memory released
    finish(studio, request(astronaut_path))  # rebuilt, works


def test_uploaded_photos_are_previewed_with_a_sentence_for_each_bad_one(studio, astronaut_path, no_face_path):
    crops, notes = studio.preview_faces([str(astronaut_path), str(no_face_path)])
    assert len(crops) == 1 and crops[0].image.size == (224, 224)
    assert face_strip(crops * 2).size == (300, 150) and face_strip([]) is None
    assert notes == ["No face was found in coffee.png; use a clear, front-facing photo of one person."]
    with pytest.raises(NoFaceError) as caught:  # and a request names the photo, not the server's path
        studio.prepare(*request(str(no_face_path)))
    assert str(no_face_path.parent) not in str(caught.value)


def test_values_from_widgets_or_the_api_are_coerced_or_refused(studio, astronaut_path):
    job = studio.prepare(*request(astronaut_path, num_frames=10.0, num_inference_steps="2", seed=7.0, fps=8.0))
    assert (job.request.num_frames, job.request.num_inference_steps, job.request.seed, job.request.fps) == (10, 2, 7, 8)
    for overrides in ({"num_frames": 8.5}, {"num_inference_steps": "many"}, {"seed": -5}, {"fps": None}):
        with pytest.raises(InvalidRequestError):
            studio.prepare(*request(astronaut_path, **overrides))


def test_a_prepared_job_crosses_a_process_boundary_and_sizes_its_gpu_time(studio, astronaut_path):
    import pickle

    job = pickle.loads(pickle.dumps(studio.prepare(*request(astronaut_path))))
    assert isinstance(job, Job) and job.crops[0].image.size == (224, 224)
    events = pickle.loads(pickle.dumps(list(studio.execute(job))))  # what a ZeroGPU worker sends back
    assert read_video(events[-1].video).shape == (8, 64, 64, 3)
    assert 30 <= job.gpu_seconds() < 60
    big = Job(
        request=GenerationRequest(prompt="x", num_frames=32, num_inference_steps=100, height=768, width=512), crops=[]
    )
    assert big.gpu_seconds() == 300


def test_without_loading_in_prepare_the_pipeline_is_built_by_execute(tiny_kit, detector, astronaut_path, tmp_path):
    options = StudioOptions(tiny=True, device="cpu", output_dir=tmp_path, load_in_prepare=False)  # as on ZeroGPU
    engine = Studio(options, detector=detector)
    job = engine.prepare(*request(astronaut_path, backbone="tiny-single-file"))
    assert engine.service.current_backbone is None and engine.service.loads["backbone"] == 0
    assert read_video(list(engine.execute(job))[-1].video).shape[0] == 8
    assert engine.service.loads["backbone"] == 1


def test_unwritable_output_folder_is_a_sentence(tmp_path, tiny_kit, detector):
    from idanimator.errors import IDAnimatorError

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(IDAnimatorError, match="cannot be written"):
        Studio(StudioOptions(tiny=True, device="cpu", output_dir=blocker / "outputs"), detector=detector)


def test_operators_can_load_a_local_backbone(tiny_kit, detector, astronaut_path, tmp_path):
    engine = Studio(
        StudioOptions(tiny=True, device="cpu", output_dir=tmp_path, allow_custom_backbones=True), detector=detector
    )
    done = finish(engine, request(astronaut_path, backbone=str(tiny_kit["single_file"])))[-1]
    assert read_video(done.video).shape[0] == 8
    assert engine.service.current_backbone == str(tiny_kit["single_file"])


def test_the_speed_model_learns_a_steps_cost_and_a_work_cost():
    """Denoising that costs 0.1 s a step plus 0.002 s a unit of work, 0.5 s before the first step: learnt from
    runs of other sizes, a new size is predicted, and no run gives no estimate."""
    from idanimator.estimate import SpeedModel

    model = SpeedModel()
    assert model.estimate(30, 960) is None

    def seconds(steps, work):  # the first step is in the time before it ends
        return 0.5 + 0.1 * steps + 0.002 * work

    for steps, work in ((4, 64), (8, 512), (12, 96)):
        first = 0.5 + 0.1 + 0.002 * work / steps
        model.record(before_s=first, steps=steps, work=work, loop_s=seconds(steps, work) - first)
    assert model.estimate(60, 2880) == pytest.approx(seconds(60, 2880), rel=0.05)
    one = SpeedModel()
    one.record(before_s=0.6, steps=10, work=100, loop_s=2.0)
    assert one.estimate(10, 100) == pytest.approx(2.6)  # one kind of run: its own time back


def test_a_long_run_sends_a_few_previews_and_the_last_steps(studio, astronaut_path):
    """Each preview costs the page a saved image and an API client a download: at most PREVIEWS of them, evenly
    spread, and always the last step's."""
    from idanimator.studio import PREVIEWS

    events = finish(studio, request(astronaut_path, num_frames=4, num_inference_steps=25))
    steps = [e.step for e in events if isinstance(e, Progress) and e.preview is not None]
    assert steps == [7, 14, 21, 25] and len(steps) <= PREVIEWS + 1


def test_the_output_folder_knows_the_files_it_named(tmp_path):
    folder = OutputFolder(tmp_path, max_files=3, max_age_s=3600)
    video = folder.new_path(".mp4")
    segment = folder.new_path(".mp4", folder.new_folder())
    assert not folder.made_here(video)  # not written yet
    for path in (video, segment):
        path.write_bytes(b"x")
    (tmp_path / "mine.mp4").write_bytes(b"x")
    (tmp_path / "0123456789abcdef.mp4").symlink_to(video)
    assert folder.made_here(video) and folder.made_here(str(segment))
    assert not folder.made_here(tmp_path / "mine.mp4")  # the operator's, not ours
    assert not folder.made_here(tmp_path / "0123456789abcdef.mp4")  # a link
    other = tmp_path.parent / video.name
    other.write_bytes(b"x")
    assert not folder.made_here(other)  # our kind of name, elsewhere


def test_no_photo_is_said_before_anything_else_as_the_page_reads(studio):
    """A fresh page's Generate: the photo comes first on the page, so its sentence comes first."""
    with pytest.raises(InvalidRequestError, match="^Upload at least one photo of a face.$"):
        studio.prepare([], GenerationRequest(prompt=""))
    with pytest.raises(InvalidRequestError, match="The prompt is empty"):
        studio.prepare([None, "photo.png"], GenerationRequest(prompt=" "))
