"""The command line: each command, and errors as one line with a non-zero exit status."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idanimator.cli import main
from tests.helpers import read_video


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


# -- issue 18: user errors say what is wrong, before any model loads ----------------------------------------


def _before_loading(*argv):
    """Run the CLI in a fresh process; its stderr, exit status and whether torch was imported."""
    import subprocess
    import sys

    script = (
        "import sys; from idanimator.cli import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'nothing loaded'); sys.exit(code)"
    )
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "lora, message",
    [
        ("{style}:abc", "The weight 'abc' of the LoRA {style} must be a number"),
        ("{style}:0,8", "The weight '0,8' of the LoRA {style} must be a number"),
        ("{empty}", "The LoRA {empty} has no .safetensors file"),
        ("{two}", "The LoRA {two} has several .safetensors files"),
    ],
)
def test_a_bad_lora_weight_or_folder_is_refused_before_any_model_loads(tmp_path, astronaut_path, lora, message):
    names = {"style": tmp_path / "style.safetensors", "empty": tmp_path / "empty", "two": tmp_path / "two"}
    names["style"].write_bytes(b"")
    names["empty"].mkdir()
    names["two"].mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (names["two"] / name).write_bytes(b"")
    lora, message = (text.format(**names) for text in (lora, message))
    argv = ["generate", "--face", str(astronaut_path), "--prompt", "a person", "--out", str(tmp_path / "o.mp4")]
    proc = _before_loading(*argv, "--lora", lora)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "nothing loaded" in proc.stdout


def test_a_lora_folder_with_one_file_and_a_file_with_a_weight_are_taken(tmp_path):
    from idanimator.extras.lorafiles import check_source
    from idanimator.request import LoraSpec

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "style.safetensors").write_bytes(b"")
    assert check_source(str(tmp_path / "one")) == ("local", tmp_path / "one")
    assert LoraSpec.parse("style.safetensors:0.5") == LoraSpec("style.safetensors", 0.5)
    assert LoraSpec.parse("owner/repo@v1:-1") == LoraSpec("owner/repo@v1", -1.0)
    assert LoraSpec.parse("C:/loras/style.safetensors") == LoraSpec("C:/loras/style.safetensors", 1.0)


def test_seed_bounds_are_printed_as_whole_numbers(capsys, tmp_path, astronaut_path):
    code, _, err = tiny_generate(capsys, tmp_path, astronaut_path, "--seed=-5")
    assert code == 1 and "Seed must be between 0 and 4294967295 (got -5)" in err, err
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "astronaut.png").write_bytes(astronaut_path.read_bytes())
    (tmp_path / "p.txt").write_text("a person\n")
    argv = ["--faces-dir", str(faces), "--prompts", str(tmp_path / "p.txt"), "--out-dir", str(tmp_path / "o")]
    code, _, err = run(capsys, "generate", *argv, "--seeds=-5")
    assert code == 1 and "between 0 and 4294967295" in err and "e+" not in err, err


def test_convert_checkpoint_refuses_its_input_as_output_and_a_wrong_suffix(capsys, tmp_path, tiny_kit):
    import shutil

    ckpt = tmp_path / "X.ckpt"
    shutil.copy(tiny_kit["face_adapter"], ckpt)
    ours = tmp_path / "X.safetensors"
    assert run(capsys, "convert-checkpoint", str(ckpt), str(ours))[0] == 0
    (tmp_path / "folder.safetensors").mkdir()
    before = {path: path.read_bytes() for path in (ckpt, ours)}
    for output, said in (
        (ckpt, "must end in .safetensors"),
        (tmp_path / "out.ckpt", "must end in .safetensors"),
        (tmp_path / "folder.safetensors", "is a folder"),
    ):
        code, _, err = run(capsys, "convert-checkpoint", str(ckpt), str(output))
        assert code == 1 and said in err and err.count("\n") == 1, err
    code, _, err = run(capsys, "convert-checkpoint", str(ours), str(tmp_path / "." / "X.safetensors"))
    assert code == 1 and "is the input file itself" in err, err
    assert {path: path.read_bytes() for path in (ckpt, ours)} == before and not (tmp_path / "out.ckpt").exists()


def test_a_folder_given_for_a_file_and_a_file_for_a_folder_are_named_as_such(capsys, tmp_path):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file.png").write_bytes(b"")
    (tmp_path / "p.txt").write_text("a person\n")
    folder, file = str(tmp_path / "a-folder"), str(tmp_path / "a-file.png")
    for argv, said in (
        (["generate", "--faces-dir", folder, "--prompts", folder, "--out-dir", folder], "The prompts file"),
        (["generate", "--faces-dir", file, "--prompts", str(tmp_path / "p.txt"), "--out-dir", folder], "The faces"),
        (["convert-checkpoint", folder, str(tmp_path / "o.safetensors")], "Face adapter file"),
    ):
        code, _, err = run(capsys, *argv)
        kind = "is a folder, not a file" if said != "The faces" else "is a file, not a folder"
        assert code == 1 and err.startswith(f"error: {said}") and kind in err and err.count("\n") == 1, err


def test_make_tiny_help_says_only_a_kit_is_replaced(capsys):
    with pytest.raises(SystemExit):
        main(["make-tiny", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "new or empty folder" in text and "refused and left untouched" in text and "only a kit is replaced" in text


# -- issue 21: videos that remember how they were made; the first hour on the command line ------------------


def _tiny_mp4(capsys, tmp_path, face, name, *extra):
    argv = ["generate", "--tiny", "--detector", "retinaface", "--face", str(face), "--out", str(tmp_path / name)]
    code, out, err = run(capsys, *argv, *extra)
    assert code == 0, err
    return tmp_path / name, err


def test_settings_from_a_video_remakes_it_and_typed_flags_win(capsys, tmp_path, astronaut_path, tiny_kit):
    from idanimator.video import read_settings

    first, err = _tiny_mp4(
        capsys, tmp_path, astronaut_path, "first.mp4", "--prompt", "a person waving", "--negative-prompt", "blur",
        "--frames", "4", "--steps", "2", "--height", "64", "--width", "64", "--fps", "5", "--id-scale", "0.5",
        "--no-prompt-suffix",
    )  # fmt: skip
    made = read_settings(first)
    assert (
        made["prompt"] == "a person waving"
        and made["num_inference_steps"] == 2
        and made["fps"] == 5
        and made["seed"] >= 0
    )
    assert "denoising: step 2/2" in err and "\x1b[" not in err and "\r" not in err  # stderr is not a terminal

    # --fps 9 is the default value, but typed: it wins over the video's 5, as --steps does
    again, _ = _tiny_mp4(capsys, tmp_path, astronaut_path, "again.mp4", "--settings-from", str(first), "--steps", "3")
    typed, _ = _tiny_mp4(capsys, tmp_path, astronaut_path, "typed.mp4", "--settings-from", str(first), "--fps", "9")
    assert read_settings(again) == made | {"num_inference_steps": 3}
    assert read_settings(typed) == made | {"fps": 9}
    assert read_video(again).shape == (4, 64, 64, 3)


def test_settings_from_a_video_without_them_is_one_sentence_before_anything_loads(tmp_path, astronaut_path):
    from idanimator.video import write_mp4

    plain = write_mp4(np.zeros((2, 64, 64, 3), np.uint8), tmp_path / "plain.mp4", fps=8)
    argv = ["generate", "--face", str(astronaut_path), "--out", str(tmp_path / "o.mp4")]
    for video, said in (
        (plain, "The video plain.mp4 carries no generation settings"),
        (tmp_path / "no.mp4", "The video no.mp4 does not exist"),
    ):
        proc = _before_loading(*argv, "--settings-from", str(video))
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: {said}"), proc.stderr
        assert proc.stderr.count("\n") == 1 and "nothing loaded" in proc.stdout


def test_missing_weights_are_one_line_within_seconds_and_each_command_says_how_to_get_them(tmp_path, astronaut_path):
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env |= {"HF_HOME": str(tmp_path / "empty-hf-home"), "HF_HUB_OFFLINE": "1"}
    script = (
        "import sys; from idanimator.cli import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'nothing loaded'); sys.exit(code)"
    )
    said = {}
    for command in (
        ["generate", "--face", str(astronaut_path), "--prompt", "a person", "--out", str(tmp_path / "o.mp4")],
        ["download"],
    ):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", script, *command], capture_output=True, text=True, env=env, timeout=120
        )
        elapsed = time.monotonic() - started
        assert proc.returncode == 1 and "nothing loaded" in proc.stdout and elapsed < 5, (elapsed, proc.stderr)
        assert proc.stderr.startswith("error: The face adapter") and proc.stderr.count("\n") == 1, proc.stderr
        assert "HF_HOME" in proc.stderr and str(tmp_path / "empty-hf-home") in proc.stderr
        said[command[0]] = proc.stderr
    assert "--tiny" in said["generate"] and "--adapter" in said["generate"]
    assert "--tiny" not in said["download"] and "--adapter" not in said["download"]


def test_convert_checkpoint_replaces_an_existing_output_only_with_force(capsys, tmp_path, tiny_kit):
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "convert-checkpoint", str(tiny_kit["face_adapter"]), str(out))
    assert code == 1 and err == f"error: The output {out} already exists; add --force to replace it.\n"
    assert out.read_bytes() == b"keep me"
    code, stdout, err = run(capsys, "convert-checkpoint", str(tiny_kit["face_adapter"]), str(out), "--force")
    assert code == 0 and stdout.startswith(f"replaced {out}") and out.stat().st_size > 1000, err


def test_make_tiny_says_how_to_use_its_kit_and_that_line_works(capsys, tmp_path, astronaut_path, tiny_kit):
    import shlex
    import shutil

    kit = tmp_path / "my kit"
    shutil.copytree(tiny_kit["base"].parent, kit)
    code, out, _ = run(capsys, "make-tiny", str(kit))
    line = next(line for line in out.splitlines() if "python -m idanimator generate" in line)
    argv = shlex.split(line.split("python -m idanimator ", 1)[1])
    argv = [
        {"PHOTO": str(astronaut_path), "TEXT": "a person", "OUT.mp4": str(tmp_path / "kit.mp4")}.get(a, a) for a in argv
    ]
    assert code == 0 and "--tiny" not in argv
    code, out, err = run(capsys, *argv, "--detector", "retinaface", "--frames", "2", "--steps", "1")
    assert code == 0 and (tmp_path / "kit.mp4").is_file(), err


def test_a_batch_in_a_log_prints_plain_lines_and_each_mp4_carries_its_settings(tmp_path, astronaut_path, tiny_kit):
    import subprocess
    import sys

    from idanimator.video import read_settings

    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "astronaut.png").write_bytes(astronaut_path.read_bytes())
    (tmp_path / "p.txt").write_text("a person waving\n")
    argv = ["generate", "--tiny", "--detector", "retinaface", "--faces-dir", str(faces), "--prompts"]
    argv += [str(tmp_path / "p.txt"), "--seeds", "1,2", "--out-dir", str(tmp_path / "v"), "--frames", "2"]
    argv += ["--steps", "2", "--height", "64", "--width", "64"]
    proc = subprocess.run([sys.executable, "-m", "idanimator", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr and "\r" not in proc.stderr, proc.stderr  # no bar redraws in a log
    assert "generating: 1/2 videos" in proc.stderr and "generating: 2/2 videos" in proc.stderr
    for seed in (1, 2):
        saved = read_settings(tmp_path / "v" / f"astronaut--p00--s{seed}.mp4")
        assert saved["seed"] == seed and saved["prompt"] == "a person waving" and saved["num_inference_steps"] == 2


def test_the_apps_default_output_folder_is_the_users_own(tmp_path):
    import os
    import subprocess
    import sys

    script = "from idanimator.outputs import default_output_parent; print(default_output_parent())"
    env = {k: v for k, v in os.environ.items() if k not in ("IDANIMATOR_CACHE", "XDG_CACHE_HOME")}
    for extra, expected in (
        ({"HOME": str(tmp_path)}, tmp_path / ".cache" / "idanimator"),
        ({"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "idanimator"),
        ({"IDANIMATOR_CACHE": str(tmp_path / "own")}, tmp_path / "own"),
    ):
        run_ = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env | extra)
        assert run_.stdout.strip() == str(expected), run_.stderr
