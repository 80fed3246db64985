"""The one video reader: only real media files, sizes bounded before decoding, frames by index everywhere.

Every file here is made by the ffmpeg that imageio-ffmpeg bundles; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from idanimator import video
from idanimator.errors import InvalidRequestError, UnreadableVideoError, VideoTooLargeError
from idanimator.extras.conditions import preview_condition, read_video_frames
from idanimator.request import ControlSpec
from idanimator.settings import MAX_DECODED_PIXELS, MAX_SOURCE_PIXELS

ROOT = Path(__file__).resolve().parent.parent


def ffmpeg(*args) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *map(str, args)], check=True)


def one_sentence(error) -> bool:
    text = str(error.value)
    return text.endswith(".") and ". " not in text.rstrip(".")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reader")
    made = {name: folder / name for name in ("small.mp4", "big.mp4", "huge.mp4", "vfr.mp4", "moving.gif")}
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10:duration=1", "-pix_fmt", "yuv420p", made["small.mp4"])
    # Tiny files of huge frames: what a 50 KB upload can ask the decoder for.
    big = "color=black:s=4096x4096:d=1"
    ffmpeg("-f", "lavfi", "-i", big, "-c:v", "libx264", "-preset", "ultrafast", "-crf", "51", made["big.mp4"])
    huge = ["-f", "lavfi", "-i", "color=black:s=8192x8192:d=1", "-frames:v", "1"]
    ffmpeg(*huge, "-c:v", "libx264", "-preset", "ultrafast", "-crf", "51", made["huge.mp4"])
    # Variable frame rate: a 5-frame pause after frame 19, frames kept as they are (not made constant).
    vfr = ["-f", "lavfi", "-i", "testsrc2=size=128x128:rate=25:duration=2", "-vf", "setpts='(N+5*gte(N,20))/(25*TB)'"]
    ffmpeg(*vfr, "-fps_mode", "passthrough", "-c:v", "libx264", "-pix_fmt", "yuv420p", made["vfr.mp4"])
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=120x80:rate=10:duration=1", made["moving.gif"])
    made["loop.mp4"] = folder / "loop.mp4"  # a concat list naming itself, saved under a video's name
    made["loop.mp4"].write_text("ffconcat version 1.0\nfile loop.mp4\n")
    made["list.m3u8"] = folder / "list.m3u8"  # a playlist pointing at a real local video
    made["list.m3u8"].write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1,\nsmall.mp4\n#EXT-X-ENDLIST\n")
    return made


# -- what a file is, before decoding ----------------------------------------------------------------


def test_probe_reads_the_header_only(files):
    info = video.probe(files["small.mp4"])
    assert (info.name, info.width, info.height) == ("small.mp4", 96, 64)
    assert (info.fps, info.duration, info.frames) == (10, 1, 10)  # frames: an estimate, duration x fps
    gif = video.probe(files["moving.gif"])
    assert (gif.width, gif.height, gif.fps) == (120, 80, 10)
    assert (video.probe(files["big.mp4"]).width, video.probe(files["big.mp4"]).height) == (4096, 4096)


def test_decoded_sizes_shrink_but_never_grow(files):
    info = video.probe(files["small.mp4"])  # 96x64
    assert video.decoded_size(info) == (96, 64)
    assert video.decoded_size(info, cover=(48, 48)) == (72, 48)  # covers 48x48 with the aspect kept
    assert video.decoded_size(info, cover=(512, 512)) == (96, 64)  # never enlarged
    assert video.decoded_size(info, max_side=48) == (48, 32)
    assert video.decoded_size(info, size=(20, 30)) == (20, 30)


# -- only real media files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["loop.mp4", "list.m3u8"])
def test_concat_lists_and_playlists_are_refused_at_once(files, name):
    started = time.monotonic()
    with pytest.raises(UnreadableVideoError, match=f"The file {name} is not a video file") as error:
        video.read_video(files[name])
    assert one_sentence(error) and time.monotonic() - started < 5
    with pytest.raises(InvalidRequestError, match=name) as error:  # as a driving video
        read_video_frames(files[name], 4, (64, 64))
    assert one_sentence(error)


def test_a_missing_or_corrupt_file_is_one_sentence(files, tmp_path):
    with pytest.raises(UnreadableVideoError, match="nothing.mp4 does not exist") as error:
        video.read_video(tmp_path / "nothing.mp4")
    assert one_sentence(error)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UnreadableVideoError, match="junk.mp4 could not be read as a video") as error:
        video.read_video(junk)
    assert one_sentence(error)


# -- sizes bounded before decoding ------------------------------------------------------------------


def test_frames_over_the_source_limit_are_refused_before_decoding(files):
    assert 8192 * 8192 > MAX_SOURCE_PIXELS
    with pytest.raises(VideoTooLargeError, match="huge.mp4 is 8192x8192") as error:
        video.probe(files["huge.mp4"])  # the header alone refuses it
    assert one_sentence(error)
    with pytest.raises(InvalidRequestError, match="huge.mp4 is 8192x8192") as error:
        read_video_frames(files["huge.mp4"], 1, (64, 64))
    assert one_sentence(error)


def test_a_read_over_the_pixel_budget_is_refused_before_decoding(files):
    assert 25 * 4096 * 4096 > MAX_DECODED_PIXELS  # every frame of big.mp4 at full size
    with pytest.raises(VideoTooLargeError, match="big.mp4 would be 25 frames of 4096x4096") as error:
        video.read_video(files["big.mp4"])
    assert one_sentence(error)
    with pytest.raises(VideoTooLargeError, match="small.mp4 would be 3 frames of 96x64"):
        video.read_video(files["small.mp4"], [0, 1, 2], max_pixels=2 * 96 * 64)
    assert video.read_video(files["big.mp4"], max_side=256).frames.shape == (25, 256, 256, 3)


_MEASURE = """
import json, resource, sys
from idanimator.extras.conditions import preview_condition
from idanimator.request import ControlSpec
preview_condition(ControlSpec("canny", video=sys.argv[2]), 2, (64, 64))  # imports and a first read, at rest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images = preview_condition(ControlSpec("canny", video=sys.argv[1]), 8, (512, 512))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "sizes": sorted({im.size for im in images})}))
"""


def test_a_huge_driving_video_is_shrunk_in_the_decoder_and_costs_little_memory(files):
    """4096x4096 frames decoded at full size cost 50 MB each in this process (+0.8 GB for 8 frames before);
    shrunk by ffmpeg to the 512x512 asked for, 8 frames are 6 MB."""
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(files["big.mp4"]), str(files["small.mp4"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=True,
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["sizes"] == [[512, 512]]
    assert measured["growth_kib"] < 64 * 1024, measured


# -- frames by index, alike everywhere --------------------------------------------------------------


def test_a_variable_frame_rate_file_gives_the_same_frames_to_build_dataset_and_training(files):
    from idanimator.data.decode import read_frames as dataset_frames
    from idanimator.training.dataset import read_frames as training_frames

    every = video.read_video(files["vfr.mp4"]).frames
    assert len(every) == 50  # passthrough: no frame repeated to fill the pause, none dropped
    assert not np.array_equal(every[19], every[20])  # the frames after the pause are new ones
    for window in ([0, 2, 4, 6], [17, 19, 21, 23], [20], [30, 40, 49]):
        from_dataset = np.stack([frame for _, frame in dataset_frames(files["vfr.mp4"], window)])
        from_training = training_frames(files["vfr.mp4"], window, 25.0)
        assert np.array_equal(from_dataset, from_training) and np.array_equal(from_training, every[window])


def test_first_frames_and_a_shorter_video(files):
    assert video.read_video(files["small.mp4"], first=4).frames.shape == (4, 64, 96, 3)
    assert len(video.read_video(files["small.mp4"], first=99)) == 10  # as many as there are
    with pytest.raises(UnreadableVideoError, match="ended before frame 10"):
        video.read_video(files["small.mp4"], [3, 10])


def test_a_gif_works_as_a_driving_video(files):
    frames = read_video_frames(files["moving.gif"], 6, (40, 40))
    assert len(frames) == 6 and {frame.size for frame in frames} == {(60, 40)}  # shrunk to cover 40x40
    images = preview_condition(ControlSpec("canny", video=files["moving.gif"]), 6, (64, 64))
    assert {image.size for image in images} == {(64, 64)}
    assert all(np.asarray(image).max() == 255 for image in images)  # edges were found in every frame
