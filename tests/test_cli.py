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
        ("--frames", "64", "Frames must be between 1 and 32"),
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
