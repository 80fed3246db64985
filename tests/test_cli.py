"""The command line: each command, and errors as one line with a non-zero exit status."""

from __future__ import annotations

import json

import pytest

from idanimator.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_backbones_lists_the_registry(capsys):
    code, out, _ = run(capsys, "backbones")
    assert code == 0
    assert "realistic-vision-v6 (default)" in out and "epicrealism" in out


def test_download_offline_explains_what_to_do(capsys):
    code, out, err = run(capsys, "download")
    assert code == 1
    assert err.startswith("error: The face adapter ID-Animator/ID-Animator/animator.ckpt")
    assert "HF_HUB_OFFLINE" in err


def test_make_tiny_writes_the_real_layouts(capsys, tmp_path):
    code, out, _ = run(capsys, "make-tiny", str(tmp_path / "kit"))
    assert code == 0
    kit = tmp_path / "kit"
    assert json.loads((kit / "base" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (kit / "motion-adapter" / "config.json").is_file()
    assert (kit / "image-encoder" / "config.json").is_file()
    assert (kit / "animator.ckpt").is_file() and (kit / "tiny-backbone.safetensors").is_file()


def tiny_generate(capsys, tmp_path, face, *extra):
    return run(
        capsys,
        "generate",
        "--tiny",
        "--detector",
        "retinaface",
        "--face",
        str(face),
        "--prompt",
        "a person",
        "--frames",
        "4",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        str(tmp_path / "out.gif"),
        *extra,
    )


def test_generate_writes_a_gif_and_reports_the_random_seed(capsys, tmp_path, astronaut_path, tiny_kit):
    code, out, err = tiny_generate(capsys, tmp_path, astronaut_path)
    assert code == 0, err
    assert "seed: " in out and (tmp_path / "out.gif").is_file()


def test_no_face_is_one_line_and_exit_1(capsys, tmp_path, no_face_path, tiny_kit):
    code, _, err = tiny_generate(capsys, tmp_path, no_face_path)
    assert code == 1
    assert err.startswith("error: No face was found") and "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("--frames", "129", "Frames must be between 1 and 128"),
        ("--steps", "0", "Steps must be between 1 and 100"),
        ("--guidance", "nan", "Guidance scale must be between"),
        ("--id-scale", "3", "ID scale must be between 0 and 2"),
        ("--fps", "0", "Frames per second must be between 1 and 60"),
    ],
)
def test_out_of_range_numbers_are_one_line_naming_the_setting(capsys, tmp_path, astronaut_path, flag, value, named):
    code, out, err = tiny_generate(capsys, tmp_path, astronaut_path, flag, value)
    assert code == 1 and err.startswith(f"error: {named}") and err.count("\n") == 1
    assert not (tmp_path / "out.gif").exists()


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--control-image", "x.png"], "--control-image and --control-video need --control KIND"),
        (["--control", "sparse-sketch"], "The sparse-sketch control needs at least one control image"),
        (["--control", "canny"], "The canny control needs a driving video"),
        (["--control", "canny", "--control-video", "missing.mp4"], "The control video missing.mp4 does not exist"),
        (["--control", "sparse-rgb", "--control-image", "{face}@8"], "A control image is placed at frame 8, outside"),
        (["--control", "sparse-rgb", "--control-image", "{face}", "--control-strength", "3"], "The control strength"),
        (["--lora", "style.safetensors:9"], "A LoRA's weight must be between -2 and 2"),
    ],
)
def test_options_beyond_the_release_are_checked_before_loading(capsys, tmp_path, astronaut_path, extra, named):
    extra = [part.replace("{face}", str(astronaut_path)) for part in extra]
    code, _, err = tiny_generate(capsys, tmp_path, astronaut_path, "--frames", "8", *extra)
    assert code == 1 and err.startswith(f"error: {named}") and err.count("\n") == 1, err
    assert not (tmp_path / "out.gif").exists()


@pytest.mark.parametrize(
    "out, message",
    [
        ("video.avi", "Cannot save a video as video.avi"),
        ("missing/video.mp4", "does not exist; create it first"),
    ],
)
def test_a_bad_output_path_is_refused_before_any_model_loads(tmp_path, astronaut_path, out, message):
    import subprocess
    import sys

    script = (
        "import sys; from idanimator.cli import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'nothing loaded'); sys.exit(code)"
    )
    argv = ["generate", "--face", str(astronaut_path), "--prompt", "a person", "--out", str(tmp_path / out)]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert "nothing loaded" in proc.stdout
    assert not (tmp_path / "missing").exists()


def test_generate_help_shows_the_release_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    shown_defaults = (
        "(default: 16)",
        "(default: 30; 6 with --fast)",
        "(default: 8; 1.5 with --fast)",
        "(default: 0.8)",
    )
    for shown in ("--frames N", *shown_defaults, "deformed iris"):
        assert shown in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "`" not in capsys.readouterr().out


def test_make_tiny_on_an_existing_kit_says_so_and_force_rebuilds(capsys, tmp_path, tiny_kit):
    import shutil

    kit = tmp_path / "kit"
    shutil.copytree(tiny_kit["base"].parent, kit)
    stamp = (kit / "kit.json").stat().st_mtime_ns
    code, out, _ = run(capsys, "make-tiny", str(kit))
    assert code == 0 and "already in" in out and "--force" in out
    assert (kit / "kit.json").stat().st_mtime_ns == stamp


def test_files_we_write_follow_the_users_umask(capsys, tmp_path, tiny_kit):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "adapter.safetensors"
        assert run(capsys, "convert-checkpoint", str(tiny_kit["face_adapter"]), str(out))[0] == 0
        assert run(capsys, "make-tiny", str(tmp_path / "kit"))[0] == 0
    finally:
        os.umask(old)
    for path in (out, tmp_path / "kit", tmp_path / "kit" / "tiny-backbone.safetensors", tmp_path / "kit" / "kit.json"):
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
