"""Video output: browser-playable MP4s, GIFs and PNG frames, written atomically; all offline and fast."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idanimator.errors import IDAnimatorError, InvalidRequestError
from idanimator.video import (
    Mp4Writer,
    mp4_frame_count,
    save_video,
    to_uint8_frames,
    write_gif,
    write_mp4,
    write_png_frames,
)
from tests.helpers import probe_video, read_video


def gradient(frames: int = 8, height: int = 64, width: int = 64) -> np.ndarray:
    """A smooth moving gradient, float in [0, 1]: what H.264 keeps almost exactly."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    video = [
        np.stack([(x / width + i / 32) % 1.0, y / height, np.full_like(x, 0.8 - i / 40)], axis=-1)
        for i in range(frames)
    ]
    return np.stack(video).astype(np.float32)


def noise(frames: int = 8, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# ----------------------------------------------------------------------------------------------
# Frames


def test_float_and_uint8_inputs_agree():
    floats = gradient(2)
    as_uint8 = to_uint8_frames(floats)
    assert all(f.dtype == np.uint8 and f.shape == (64, 64, 3) for f in as_uint8)
    again = to_uint8_frames(np.stack(as_uint8))
    assert all(np.array_equal(a, b) for a, b in zip(as_uint8, again, strict=True))
    pil = to_uint8_frames([Image.fromarray(f) for f in as_uint8])
    assert all(np.array_equal(a, b) for a, b in zip(as_uint8, pil, strict=True))


def test_float_range_is_clipped_and_gray_or_rgba_become_rgb():
    out = to_uint8_frames([np.array([[-0.5, 0.5, 2.0]], dtype=np.float32)])[0]
    assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == [0, 128, 255]
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert to_uint8_frames([rgba])[0].shape == (4, 4, 3)


@pytest.mark.parametrize("empty", [[], np.zeros((0, 8, 8, 3), dtype=np.uint8)])
def test_empty_input_is_a_value_error(empty):
    with pytest.raises(ValueError, match="no frames"):
        to_uint8_frames(empty)


def test_frames_of_different_sizes_are_refused_before_anything_is_written(tmp_path):
    frames = [np.zeros((64, 64, 3), np.uint8)] * 3 + [np.zeros((32, 64, 3), np.uint8)]
    with pytest.raises(ValueError, match="same size"):
        write_mp4(frames, tmp_path / "out" / "video.mp4")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# MP4


@pytest.mark.parametrize("fps", [9, 24])
def test_mp4_is_browser_playable_and_close_to_the_input(tmp_path, fps):
    frames = gradient(8, 64, 64)
    path = write_mp4(frames, tmp_path / "video.mp4", fps=fps)
    assert path == tmp_path / "video.mp4"

    info = probe_video(path)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert {"tv", "bt709"} <= set(info["color"])  # limited range, BT.709 matrix, and tagged so
    assert (info["width"], info["height"]) == (64, 64)
    assert info["fps"] == pytest.approx(fps)
    assert info["frame_count"] == 8

    decoded = read_video(path)
    assert decoded.shape == (8, 64, 64, 3) and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.float32) - np.stack(to_uint8_frames(frames)).astype(np.float32)).mean()
    assert error < 4.0


def test_mp4_moov_atom_comes_before_mdat(tmp_path):
    data = write_mp4(noise(), tmp_path / "video.mp4").read_bytes()
    moov, mdat = data.find(b"moov"), data.find(b"mdat")
    assert 0 <= moov < mdat


def test_frame_count_is_read_from_the_index_and_a_cut_file_has_none(tmp_path):
    """write_mp4's check that ffmpeg finished: the index's count, and None for a file cut anywhere."""
    path = write_mp4(noise(7), tmp_path / "video.mp4")
    data = path.read_bytes()
    assert mp4_frame_count(path) == 7 == probe_video(path)["frame_count"]
    for cut in (1, len(data) // 2, len(data) - 40):
        (tmp_path / "cut.mp4").write_bytes(data[:-cut])
        assert mp4_frame_count(tmp_path / "cut.mp4") is None
    assert mp4_frame_count(tmp_path / "missing.mp4") is None


def test_a_video_written_in_chunks_equals_one_written_at_once(tmp_path):
    """Long videos are decoded and written a few frames at a time: the same file as all at once."""
    frames = noise(10)
    whole = write_mp4(frames, tmp_path / "whole.mp4")
    with Mp4Writer(tmp_path / "chunks.mp4") as out:
        for start in range(0, 10, 4):
            out.write(frames[start : start + 4])
    assert out.frames == 10 and mp4_frame_count(out.path) == 10
    assert np.array_equal(read_video(out.path), read_video(whole))


def test_a_chunk_of_another_size_ends_the_video_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="all frames must have one size"):
        with Mp4Writer(tmp_path / "video.mp4") as out:
            out.write(noise(2))
            out.write(np.zeros((2, 32, 48, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_odd_size_is_padded_by_edge_replication(tmp_path):
    frames = gradient(8, 63, 65)
    info = probe_video(write_mp4(frames, tmp_path / "odd.mp4"))
    # Padded to 66x64 by us, not rescaled to multiples of 16 (80x64) by imageio-ffmpeg.
    assert (info["width"], info["height"]) == (66, 64) and info["frame_count"] == 8

    decoded = read_video(tmp_path / "odd.mp4").astype(np.float32)
    source = np.stack(to_uint8_frames(frames)).astype(np.float32)
    assert np.abs(decoded[:, :63, :65] - source).mean() < 4.0
    # The extra row and column repeat the last ones, so they look like the picture's edge.
    assert np.abs(decoded[:, 63, :65] - source[:, 62]).mean() < 6.0
    assert np.abs(decoded[:, :63, 65] - source[:, :, 64]).mean() < 6.0


def test_uint8_input_and_crf_option(tmp_path):
    small = write_mp4(noise(), tmp_path / "small.mp4", crf=40)
    large = write_mp4(noise(), tmp_path / "large.mp4", crf=10)
    assert small.stat().st_size < large.stat().st_size
    assert read_video(large).shape == (8, 64, 64, 3)


def test_mp4_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "video.mp4"
    path.write_bytes(b"old")
    write_mp4(noise(4), path)
    assert read_video(path).shape[0] == 4
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "bad", [{"fps": 0}, {"fps": float("nan")}, {"crf": 52}, {"crf": 1.5}, {"crf": "x"}, {"fps": "fast"}]
)
def test_bad_settings_are_refused(tmp_path, bad):
    with pytest.raises(InvalidRequestError):
        write_mp4(noise(2), tmp_path / "video.mp4", **bad)
    assert not (tmp_path / "video.mp4").exists()


@pytest.mark.parametrize("name", ["video.mp4", "video.gif", "frames"])
@pytest.mark.parametrize("fps", [0, 61, 240, 7.5, float("nan"), True])
def test_fps_outside_the_apps_range_is_refused(tmp_path, name, fps):
    with pytest.raises(InvalidRequestError, match=r"Frames per second .*1 and 60"):
        save_video(noise(2), tmp_path / name, fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_fps_limits_themselves_are_accepted(tmp_path):
    assert probe_video(write_mp4(noise(2), tmp_path / "fast.mp4", fps=60))["fps"] == pytest.approx(60)
    assert probe_video(write_mp4(noise(2), tmp_path / "slow.mp4", fps=1))["fps"] == pytest.approx(1)


# ----------------------------------------------------------------------------------------------
# Atomic writes and unwritable places


def test_ffmpeg_dying_mid_write_leaves_nothing_behind(tmp_path):
    """A real mid-stream failure: a 2 kB file size limit kills ffmpeg (SIGXFSZ) while it writes mdat."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
    try:
        with pytest.raises(IDAnimatorError, match="full") as caught:
            write_mp4(noise(), tmp_path / "video.mp4")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(tmp_path) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_encoder_is_a_plain_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg-here"))
    with pytest.raises(IDAnimatorError, match="could not be started"):
        write_mp4(noise(2), tmp_path / "video.mp4")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_encoder_failing_for_another_reason_names_the_file(tmp_path, monkeypatch):
    """An "ffmpeg" that exits at once with an error: not the disk's fault, so the message names the video."""
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'fake ffmpeg: unsupported option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    out = tmp_path / "out"
    with pytest.raises(IDAnimatorError, match="failed while writing") as caught:
        write_mp4(noise(), out / "video.mp4")
    assert str(out / "video.mp4") in str(caught.value)
    assert list(out.iterdir()) == []


def test_a_failed_write_keeps_the_previous_video(tmp_path):
    path = write_mp4(noise(3), tmp_path / "video.mp4")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
    try:
        with pytest.raises(IDAnimatorError, match="full"):
            write_mp4(noise(8), path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ""])
def test_unwritable_folder_is_a_plain_error(tmp_path, suffix):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    target = blocker / f"out{suffix}"
    with pytest.raises(IDAnimatorError, match="file.txt is a file, not a folder"):
        save_video(noise(2), target)
    assert blocker.read_text() == "not a folder"


def test_missing_parent_folders_are_refused_not_created(tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist; create it first"):
        save_video(noise(2), tmp_path / "a" / "b" / "video.mp4")
    assert not (tmp_path / "a").exists()


def test_target_that_is_a_folder_is_a_plain_error(tmp_path):
    (tmp_path / "video.mp4").mkdir()
    with pytest.raises(IDAnimatorError, match="is a folder"):
        write_mp4(noise(2), tmp_path / "video.mp4")
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# GIF, PNG frames, dispatch


def test_gif_loops_with_the_right_frames_and_timing(tmp_path):
    path = write_gif(noise(), tmp_path / "video.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 8
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 100
        assert gif.size == (64, 64)
    assert probe_video(path)["frame_count"] == 8
    assert read_video(path).shape == (8, 64, 64, 3)
    assert leftovers(tmp_path) == []


def test_gif_duration_rounds_to_gif_centiseconds(tmp_path):
    with Image.open(write_gif(gradient(3), tmp_path / "video.gif", fps=9)) as gif:
        assert gif.info["duration"] == 110


def test_png_frames_are_numbered_and_lossless(tmp_path):
    frames = noise(3, 63, 65)
    paths = write_png_frames(frames, tmp_path / "frames")
    assert [p.name for p in paths] == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    for path, frame in zip(paths, frames, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), frame)
    assert leftovers(tmp_path / "frames") == []


def test_save_video_dispatches_by_suffix(tmp_path):
    assert probe_video(save_video(noise(2), tmp_path / "a.MP4"))["codec"] == "h264"
    assert probe_video(save_video(noise(2), tmp_path / "a.gif"))["codec"] == "gif"
    assert save_video(noise(2), tmp_path / "b.mp4", fps="12") == tmp_path / "b.mp4"  # typed into a text field
    folder = save_video(noise(2), tmp_path / "frames")
    assert folder == tmp_path / "frames" and len(list(folder.glob("frame_*.png"))) == 2
    existing = tmp_path / "run.v2"
    existing.mkdir()
    save_video(noise(2), existing)
    assert len(list(existing.glob("frame_*.png"))) == 2
    with pytest.raises(InvalidRequestError, match=".mp4 or .gif"):
        save_video(noise(2), tmp_path / "video.avi")


def test_read_and_probe_missing_or_broken_files(tmp_path):
    with pytest.raises(IDAnimatorError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(IDAnimatorError, match="could not be read"):
        read_video(broken)
    with pytest.raises(IDAnimatorError, match="could not be read"):
        probe_video(broken)


# -- issue 21: every MP4 carries the settings that made it ---------------------------------------------------


def test_an_mp4_carries_its_settings_and_they_read_back_exactly(tmp_path):
    import subprocess

    import imageio_ffmpeg

    from idanimator.request import GenerationRequest, LoraSpec
    from idanimator.video import read_settings

    request = GenerationRequest(
        prompt='a "chef" cooking crêpes ☃ 😀', seed=42, num_frames=4, loras=(LoraSpec("style.safetensors", 0.5),)
    )
    settings = request.settings()
    whole = write_mp4(gradient(4), tmp_path / "whole.mp4", fps=8, settings=settings)
    with Mp4Writer(tmp_path / "chunks.mp4", fps=8, settings=settings) as writer:
        for chunk in (gradient(4)[:2], gradient(4)[2:]):
            writer.write(chunk)
    for path in (whole, writer.path):
        saved = read_settings(path)
        assert saved.pop("idanimator_version") == __import__("idanimator").__version__
        assert saved == settings and saved["prompt"] == 'a "chef" cooking crêpes ☃ 😀'
        assert len(read_video(path)) == 4  # the video itself is untouched
    # ffmpeg itself reads it as the standard comment tag, and keeps it through a remux
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    copy = tmp_path / "copy.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-i", str(whole), "-c", "copy", str(copy)], check=True)
    shown = subprocess.run([ffmpeg, "-hide_banner", "-i", str(copy)], capture_output=True, text=True).stderr
    assert "comment" in shown and "idanimator_version" in shown
    assert read_settings(copy) == read_settings(whole)


def test_a_video_without_settings_is_none_or_a_sentence(tmp_path):
    from idanimator.errors import UnreadableVideoError
    from idanimator.video import read_settings

    plain = write_mp4(gradient(2), tmp_path / "plain.mp4", fps=8)
    gif = write_gif(gradient(2), tmp_path / "clip.gif", fps=8)
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    for path in (plain, gif, tmp_path / "junk.mp4"):
        assert read_settings(path) is None
    with pytest.raises(InvalidRequestError, match=r"^The video plain.mp4 carries no generation settings"):
        read_settings(plain, required=True)
    with pytest.raises(UnreadableVideoError, match="does not exist"):
        read_settings(tmp_path / "missing.mp4")
