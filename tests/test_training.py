"""Training the face adapter: random references, learning, the train command, exact resume, initialisation.

A tiny data set is built once for the module in build-dataset's layout: two short MP4s of a moving
astronaut crop (two "identities": the photo and a recoloured copy), each with a face pool of crops aligned
by the real detector, plus a clip too short and one without faces. Models are the tiny kit's.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from idanimator.cli import main
from idanimator.tiny import TINY_SETTINGS
from idanimator.training import train as loop
from idanimator.training.adapter_training import (
    FaceAdapterTrainingModel,
    TrainableFaceAdapter,
    read_initial_adapter,
)
from idanimator.training.dataset import (
    ClipDataset,
    Dropout,
    PoolFace,
    collate,
    draw_references,
    load_clips,
    read_frames,
    sample_window,
    stride_note,
)
from idanimator.training.train import diffusion_loss, load_frozen_parts, micro_step_generator

FRAMES, STRIDE, SIZE = 4, 2, 64
FACE_FRAMES = (0, 6, 12, 18)
TINY_RUN = ["--tiny", "--frames", "4", "--stride", "2", "--size", "64", "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, detector, astronaut):
    from idanimator.face import crop_face
    from idanimator.video import write_mp4

    root = tmp_path_factory.mktemp("dataset")
    photo = np.asarray(astronaut)
    identities = {"a": ("astronaut", photo), "b": ("recoloured", np.ascontiguousarray(photo[:, :, ::-1]))}
    records = []
    for name, (identity, image) in identities.items():
        frames = [image[20 + t : 276 + t, 100 + 2 * t : 356 + 2 * t] for t in range(24)]  # the camera pans
        write_mp4(frames, root / "videos" / f"{name}.mp4", fps=8)
        faces = []
        for frame in FACE_FRAMES:
            path = root / "faces" / name / f"{frame:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            crop_face(frames[frame], detector).image.save(path)  # the CLIP input, as build-dataset writes
            faces.append(str(path.relative_to(root)))
        records.append(_record(name, f"videos/{name}.mp4", 24, identity, faces, list(FACE_FRAMES)))
    records.append(_record("short", "videos/a.mp4", 2, "astronaut", records[0]["faces"][:1], [0]))
    records.append(_record("zz-no-face", "videos/a.mp4", 24, "astronaut", [], []))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _record(clip_id, video, end, identity, faces, face_frames) -> dict:
    caption = f"a person ({identity}) turns the head"
    return dict(
        clip_id=clip_id,
        video=video,
        start_frame=0,
        end_frame=end,
        fps=8.0,
        width=256,
        height=256,
        identity=identity,
        caption_attribute=identity,
        caption_action="turns the head",
        caption=caption,
        faces=faces,
        face_frames=face_frames,
    )


def _dataset(data_dir, feature_extractor, dropout=Dropout(0, 0, 0), **kw) -> ClipDataset:
    clips, _ = load_clips(data_dir, FRAMES)
    options = dict(frames=FRAMES, stride=STRIDE, size=SIZE, num_references=1, dropout=dropout, seed=0)
    return ClipDataset(clips, **{**options, **kw}, feature_extractor=feature_extractor)


def _trainable(parts, weights):
    adapter = TrainableFaceAdapter.from_weights(weights, parts.unet)
    parts.freeze("cpu", torch.float32)
    return FaceAdapterTrainingModel(parts.unet, adapter)


def _kit_weights(parts):
    return read_initial_adapter(None, parts.tiny_adapter).complete(parts.unet, 32, 8, 0)


# -- data and random references ------------------------------------------------------------------


def test_a_reference_is_never_a_denoised_frames_face_when_the_pool_has_others():
    pool = [PoolFace(f"f{n}.png", n) for n in (0, 6, 12, 18)]
    rng = np.random.default_rng(0)
    for start in range(0, 16):
        window = [start, start + 2, start + 4, start + 6]
        for index in draw_references(pool, window, 2, rng):
            assert not window[0] <= pool[index].frame <= window[-1]  # not even a frame between two
    only_inside = [PoolFace("f3.png", 3)]  # nothing else to choose: the pool's one face is used
    assert draw_references(only_inside, [2, 3, 4, 5], 3, rng) == [0, 0, 0]


def test_samples_take_references_from_their_own_clip_only(data_dir, tiny_kit):
    from idanimator.images import clip_image_processor

    dataset = _dataset(data_dir, clip_image_processor(), num_references=2)
    assert [c.clip_id for c in dataset.clips] == ["a", "b"]
    for position in range(6):
        for index, clip in enumerate(dataset.clips):
            sample = dataset[(index, position)]
            own = {str(face.path): face.frame for face in clip.faces}
            assert set(sample["references"]) <= set(own)  # never another clip's (identity's) face
            assert not any(sample["window"][0] <= own[r] <= sample["window"][-1] for r in sample["references"])
            assert sample["frames"].shape == (FRAMES, 3, SIZE, SIZE) and sample["faces"].shape == (2, 3, 224, 224)


def test_only_the_needed_frames_are_decoded_and_they_are_exact(data_dir):
    from idanimator.eval.reader import read_video

    every = read_video(data_dir / "videos" / "a.mp4").frames
    for window in ([0, 2, 4, 6], [9, 11, 13, 15], [17, 19, 21, 23], [5]):
        assert np.array_equal(read_frames(data_dir / "videos" / "a.mp4", window, 8.0), every[window])


def test_dropped_faces_are_zeros_in_clips_normalised_pixels_and_dropped_text_is_empty(data_dir, tiny_pipe):
    extractor = tiny_pipe.pipe.feature_extractor
    face_only = _dataset(data_dir, extractor, Dropout(0, 1, 0))[(0, 0)]
    assert torch.count_nonzero(face_only["faces"]) == 0 and face_only["caption"]
    text_only = _dataset(data_dir, extractor, Dropout(1, 0, 0))[(0, 0)]
    assert text_only["caption"] == "" and torch.count_nonzero(text_only["faces"]) > 0
    # A dropped face gives CLIP exactly what inference's unconditional branch gives it (encode_image's uncond).
    kept = _dataset(data_dir, extractor)[(0, 0)]
    _, uncond = tiny_pipe.pipe.encode_image(kept["faces"], "cpu", 1, output_hidden_states=True)
    dropped = tiny_pipe.pipe.image_encoder(face_only["faces"], output_hidden_states=True).hidden_states[-2]
    assert torch.equal(uncond, dropped)


def test_unusable_clips_are_skipped_with_a_count(data_dir):
    clips, note = load_clips(data_dir, FRAMES)
    assert len(clips) == 2
    assert note == "Skipped 2 of 4 clips: 1 shorter than --frames 4, 1 with no face in its pool."


@pytest.mark.parametrize(
    "manifest, expected",
    [
        (None, "There is no data set manifest"),
        ("", "lists no clips"),
        ("short-only", "None of the 1 clips"),
    ],
)
def test_a_dataset_that_cannot_train_is_one_sentence(tmp_path, data_dir, capsys, manifest, expected):
    if manifest is not None:
        lines = [line for line in (data_dir / "manifest.jsonl").read_text().splitlines() if '"short"' in line]
        (tmp_path / "manifest.jsonl").write_text("\n".join(lines) if manifest else "")
        for folder in ("videos", "faces"):
            (tmp_path / folder).symlink_to(data_dir / folder)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *TINY_RUN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err


# -- the trainable adapter -----------------------------------------------------------------------


def test_the_trainable_adapter_computes_what_the_inference_adapter_computes(tiny_kit):
    from idanimator.adapter import install_face_adapter

    parts = load_frozen_parts(tiny=True)
    weights = _kit_weights(parts)
    inference = copy.deepcopy(parts.unet)
    install_face_adapter(inference, weights)  # LoRA fused into attn2's weights, diffusers' IP-Adapter processor
    model = _trainable(parts, weights)  # LoRA computed beside the frozen weights
    assert all(torch.equal(v, weights.image_proj[k]) for k, v in model.adapter.to_weights().image_proj.items())
    assert all(torch.equal(v, weights.face_adapter[k]) for k, v in model.adapter.to_weights().face_adapter.items())

    torch.manual_seed(0)
    latents, text, faces = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 32), torch.randn(1, 2, 50, 32)
    with torch.no_grad():
        ours = model(latents, torch.tensor([500]), text, faces)
        theirs = inference(
            latents,
            torch.tensor([500]),
            encoder_hidden_states=text.repeat_interleave(3, dim=0),
            added_cond_kwargs={"image_embeds": [faces]},
        ).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_loss_on_a_fixed_batch_falls(data_dir, tiny_kit):
    parts = load_frozen_parts(tiny=True)
    model = _trainable(parts, _kit_weights(parts))
    batch = collate([_dataset(data_dir, parts.feature_extractor)[(0, 0)]])
    optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = diffusion_loss(model, parts, batch, micro_step_generator(0, 0, 0), "cpu", torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# -- initialisation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ip_adapter_files(tmp_path_factory, tiny_kit):
    """The tiny kit's resampler and face key/value in IP-Adapter-Plus-Face's two real layouts."""
    from idanimator.adapter import load_face_adapter_weights

    kit = load_face_adapter_weights(tiny_kit["face_adapter"])
    ip = {f"{k.split('.')[0]}.to_{k.split('.')[1][3]}_ip.weight": v for k, v in kit.face_adapter.items() if "face" in k}
    folder = tmp_path_factory.mktemp("ip-adapter")
    torch.save({"image_proj": kit.image_proj, "ip_adapter": ip}, folder / "ip-adapter-plus-face_sd15.bin")
    flat = {f"image_proj.{k}": v for k, v in kit.image_proj.items()} | {f"ip_adapter.{k}": v for k, v in ip.items()}
    save_file({k: v.contiguous() for k, v in flat.items()}, folder / "ip-adapter-plus-face_sd15.safetensors")
    return folder, kit.image_proj, ip


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_init_from_ip_adapter_plus_face_starts_as_ip_adapter_plus_face(ip_adapter_files, suffix):
    folder, image_proj, ip = ip_adapter_files
    parts = load_frozen_parts(tiny=True)
    reference = copy.deepcopy(parts.unet)
    weights = read_initial_adapter(str(folder / f"ip-adapter-plus-face_sd15{suffix}")).complete(parts.unet, 32, 8, 0)
    assert all(torch.equal(weights.image_proj[k], v) for k, v in image_proj.items())
    for key, value in ip.items():
        index, kv = key.split(".")[0], key.split(".")[1][3]
        assert torch.equal(weights.face_adapter[f"{index}.to_{kv}_face.weight"], value)
    ups = [v for k, v in weights.face_adapter.items() if k.endswith("_lora.up.weight")]
    assert len(ups) == 4 * len(ip) // 2 and all(torch.count_nonzero(u) == 0 for u in ups)

    model = _trainable(parts, weights)
    reference._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}])  # diffusers' own
    torch.manual_seed(1)
    latents, text, faces = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 32), torch.randn(1, 1, 50, 32)
    with torch.no_grad():
        ours = model(latents, torch.tensor([300]), text, faces)
        theirs = reference(
            latents,
            torch.tensor([300]),
            encoder_hidden_states=text.repeat_interleave(3, dim=0),
            added_cond_kwargs={"image_embeds": [faces]},
        ).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_init_from_an_id_animator_checkpoint_keeps_all_of_it(tiny_kit, tmp_path):
    from idanimator.adapter import load_face_adapter_weights, save_face_adapter_weights

    kit = load_face_adapter_weights(tiny_kit["face_adapter"])
    ours = save_face_adapter_weights(kit, tmp_path / "adapter.safetensors")
    parts = load_frozen_parts(tiny=True)
    for path in (tiny_kit["face_adapter"], ours):  # the release's layout and ours
        weights = read_initial_adapter(str(path)).complete(parts.unet, 32, 128, 0)
        assert weights.image_proj.keys() == kit.image_proj.keys()
        assert weights.face_adapter.keys() == kit.face_adapter.keys()  # the LoRA too, at its own rank
        assert all(torch.equal(weights.face_adapter[k], v) for k, v in kit.face_adapter.items())


def test_a_bad_init_file_is_one_sentence(tmp_path, data_dir, capsys):
    junk = tmp_path / "adapter.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--init-adapter", str(junk)]
    assert main([*args, *TINY_RUN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init-adapter") and "\n" not in err


# -- the train command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_kit):
    """`train --max-steps 3` (checkpoints at 2 and 3, validation videos at 2 of one identity held out of
    training), with the frozen parts' tensors recorded as they were loaded."""
    out = tmp_path_factory.mktemp("run")
    seen = {}

    def recording(*args, **kwargs):
        parts = real(*args, **kwargs)
        seen["parts"] = parts
        seen["before"] = {n: copy.deepcopy(m.state_dict()) for n, m in parts.modules().items()}
        return parts

    real = loop.load_frozen_parts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "load_frozen_parts", recording)
        args = ["--max-steps", "3", "--save-every", "2", "--validate-every", "2", "--validation-steps", "2"]
        args += ["--val-clips", "1"]
        assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY_RUN, *args]) == 0
    return out, seen


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_logs_a_finite_loss_every_step(trained):
    out, _ = trained
    steps = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in steps)
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard, through accelerate's tracker
    assert len(list((out / "validation" / "step-000002").glob("*.mp4"))) == 1  # the held-out identity's clip
    assert "FlowMagnitude" in next(r for r in _log(out) if "validation" in r)["validation"]  # eval's motion metric


def test_only_the_adapter_changes(trained):
    out, seen = trained
    for name, module in seen["parts"].modules().items():
        now = module.state_dict()
        for key, before in seen["before"][name].items():
            assert torch.equal(now[key], before), f"{name}.{key} changed"
    from idanimator.adapter import load_face_adapter_weights

    start = load_face_adapter_weights(seen["parts"].tiny_adapter)
    end = load_face_adapter_weights(out / "animator.ckpt")
    changed = [k for k, v in end.face_adapter.items() if not torch.equal(v, start.face_adapter[k])]
    assert len(changed) == len(end.face_adapter)  # every LoRA and face key/value tensor learned
    assert not torch.equal(end.image_proj["latents"], start.image_proj["latents"])


def test_the_trained_checkpoint_loads_in_the_pipeline_and_changes_the_video(trained, tiny_pipe, astronaut):
    from idanimator.pipeline import IDAnimatorPipeline

    out, _ = trained
    assert (out / "checkpoints" / "step-000002" / "animator.ckpt").is_file()
    pipe = IDAnimatorPipeline.from_pretrained(
        tiny=True, face_adapter=out / "animator.ckpt", device="cpu", detector=tiny_pipe.detector
    )
    settings = {**TINY_SETTINGS, "seed": 5, "id_scale": 1.0}
    crop = tiny_pipe.prepare_faces([astronaut])
    trained_video = pipe(crop, "a person", **settings, output_type="np").frames[0]
    initial_video = tiny_pipe(crop, "a person", **settings, output_type="np").frames[0]
    assert np.isfinite(trained_video).all()
    assert np.abs(trained_video - initial_video).max() > 1e-4


def test_resuming_from_step_2_gives_the_uninterrupted_runs_adapter(trained, data_dir, tmp_path, monkeypatch, capsys):
    out, _ = trained
    monkeypatch.chdir(tmp_path)  # a relative --out is shown as typed, not made absolute
    resumed = tmp_path / "resumed"
    args = ["--max-steps", "3", "--save-every", "2", "--resume", str(out / "checkpoints" / "step-000002")]
    assert main(["train", "--data", str(data_dir), "--out", "resumed", *TINY_RUN, *args]) == 0
    printed = capsys.readouterr().out
    assert f"starting from {out / 'checkpoints' / 'step-000002'} (step 2)" in printed
    assert printed.rstrip().endswith("wrote resumed/animator.ckpt")
    assert json.loads((resumed / "config.json").read_text())["out"] == str(resumed)  # recorded resolved
    assert [r["step"] for r in _log(resumed)] == [3]  # it continued at step 2
    assert _log(resumed)[0]["loss"] == [r for r in _log(out) if "loss" in r][-1]["loss"]
    uninterrupted, continued = load_file(out / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert continued.keys() == uninterrupted.keys()
    assert all(torch.equal(continued[k], uninterrupted[k]) for k in uninterrupted)


def test_resuming_with_other_settings_names_them_all_in_one_sentence(trained, data_dir, tmp_path, capsys):
    out, _ = trained
    args = ["--resume", str(out), "--out", str(tmp_path / "run"), "--max-steps", "4"]
    conflicting = ["--seed", "4", "--frames", "8", "--lora-rank", "4"]
    assert main(["train", "--data", str(data_dir), *TINY_RUN[:-2], *conflicting, *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: The checkpoint was trained with --frames 4 and --seed 3 and --lora-rank 128, this run has "
        "--frames 8 and --seed 4 and --lora-rank 4; resume with the checkpoint's settings (leave these flags out "
        "to use them)."
    )
    assert not (tmp_path / "run").exists()


def _files(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_training_into_an_existing_run_needs_resume_and_leaves_the_run_untouched(trained, data_dir, capsys):
    out, _ = trained
    before = _files(out)
    assert main(["train", "--data", str(data_dir), "--out", str(out), *TINY_RUN, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: A run is already in {out}: add --resume or choose another --out."
    assert _files(out) == before


def test_train_checks_flags_and_paths_before_importing_torch(trained, data_dir, tmp_path):
    """Each mistake is one line from a real process that never imported torch or diffusers, shown with the
    paths as typed (relative ones stay relative)."""
    import subprocess
    import sys

    out, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "data").symlink_to(data_dir)
    (tmp_path / "run").symlink_to(out)
    probe = (
        "import sys; from idanimator.cli import main; code = main(sys.argv[1:]); "
        "print(code, any(m in sys.modules for m in ('torch', 'diffusers', 'accelerate')))"
    )
    cases = [
        (["--data", "data", "--out", "new", "--frames", "0"], "error: --frames must be a whole number from 1 to 32"),
        (["--data", "missing", "--out", "new"], "error: The data set folder missing does not exist"),
        (["--data", "empty", "--out", "new"], "error: There is no data set manifest at empty/manifest.jsonl;"),
        (["--data", "data", "--out", "run"], "error: A run is already in run: add --resume or choose another --out."),
        (["--data", "data", "--out", "new", "--resume", "nowhere"], "error: --resume nowhere does not exist"),
        (["--out", "run", "--resume", "--seed", "4"], "error: The checkpoint was trained with --seed 3, this run"),
        (["--out", "new"], "error: --data is required to start a run"),
    ]
    for argv, expected in cases:
        done = subprocess.run(
            [sys.executable, "-c", probe, "train", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.stdout.strip() == "1 False", (argv, done.stdout, done.stderr)
        assert done.stderr.startswith(expected) and done.stderr.count("\n") == 1, (argv, done.stderr)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damaged", ["step-000003", "step-000002"])
def test_a_damaged_checkpoint_is_one_sentence_that_names_the_earlier_one(trained, data_dir, tmp_path, capsys, damaged):
    import shutil

    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    state = run / "checkpoints" / damaged / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut short, as by a full disk
    resume = run if damaged == "step-000003" else run / "checkpoints" / damaged
    args = ["--max-steps", "4", "--save-every", "2", "--resume", str(resume)]
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY_RUN, *args]) == 1
    err = capsys.readouterr().err.strip()
    if damaged == "step-000003":
        earlier = run / "checkpoints" / "step-000002"
        expected = f"The checkpoint file {state} is damaged; resume from the one before it with --resume {earlier}."
        assert err == f"error: {expected}"
    else:
        assert err == (
            f"error: The checkpoint file {state} is damaged and no earlier checkpoint exists; "
            "start again with another --out."
        )


def test_a_clip_whose_video_is_gone_is_skipped_by_name(data_dir, tmp_path):
    lines = (data_dir / "manifest.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("videos/b.mp4", "videos/gone.mp4")
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    for folder in ("videos", "faces"):
        (tmp_path / folder).symlink_to(data_dir / folder)
    clips, note = load_clips(tmp_path, FRAMES)
    assert [clip.clip_id for clip in clips] == ["a"]
    assert note == (
        "Skipped 3 of 4 clips: 1 shorter than --frames 4, 1 whose video is missing (videos/gone.mp4), "
        "1 with no face in its pool."
    )


def test_clips_too_short_for_the_stride_are_counted_once(data_dir, tmp_path, capsys):
    clips, _ = load_clips(data_dir, FRAMES)  # two clips of 24 frames
    assert stride_note(clips, FRAMES, STRIDE) is None  # 4 frames 2 apart span 7
    assert stride_note(clips, FRAMES, 10) == (
        "2 of 2 clips are too short for --frames 4 at --stride 10 (31 source frames), "
        "so their frames are taken closer together."
    )
    rng = np.random.default_rng(0)
    assert np.diff(sample_window(clips[0], FRAMES, 10, rng)).tolist() == [7, 7, 7]  # lowered to fit
    run = ["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY_RUN, "--stride", "10", "--max-steps", "2"]
    assert main(["train", *run]) == 0
    printed = capsys.readouterr()
    said = (printed.out + printed.err).count("clips are too short for --frames 4 at --stride 10")
    assert said == 1  # once for the run, not once per sample


# -- issue 20: launchers, precision, resuming from the checkpoint's settings, held-out validation ---------


def _train_process(launcher, argv, tmp_path, env=None, timeout=300):
    """A real `train` process (or several, under a launcher) on a GPU-less view of this machine."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    environ.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **(env or {}))
    command = [os.path.join(os.path.dirname(sys.executable), launcher[0]), *launcher[1:]]
    command += ["-m", "idanimator", "train", *argv]
    return subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=timeout)


def test_two_torchrun_processes_without_gpus_train_as_two_cpu_ranks(data_dir, tiny_kit, tmp_path):
    """Without a GPU, accelerate used to make each launched process a lone rank 0: both read the same clips and
    wrote the same files. Now they are two gloo ranks sharing one run: each step trains both clips once."""
    out = tmp_path / "run"
    argv = ["--data", str(data_dir), "--out", str(out), *TINY_RUN, "--max-steps", "2", "--save-every", "2"]
    done = _train_process(["torchrun", "--standalone", "--nproc_per_node", "2"], argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training on 2 clips in 2 processes (MULTI_CPU") == 1, done.stdout
    steps = _log(out)
    assert [r["step"] for r in steps] == [1, 2]  # one line per step: one run, not two
    assert all(sorted(r["clips"]) == ["a", "b"] for r in steps)  # rank 0 and rank 1 read different clips
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()


def test_fp16_without_cuda_is_one_sentence_before_anything_loads(data_dir, tmp_path, capsys, monkeypatch):
    run = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY_RUN, "--max-steps", "1"]
    assert main([*run, "--mixed-precision", "fp16"]) == 1
    assert capsys.readouterr().err == (
        "error: --mixed-precision asks for fp16, which needs a CUDA GPU and this machine has none; "
        "give --mixed-precision bf16 or no.\n"
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    assert main(run) == 1
    assert capsys.readouterr().err.startswith("error: accelerate's setting (its launch flag or config file) asks for")
    assert not (tmp_path / "run").exists()


def test_accelerate_launchs_mixed_precision_is_used_unless_the_flag_is_given(data_dir, tiny_kit, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(data_dir), "--out", str(out), *TINY_RUN, "--max-steps", "1"]
    launch = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16"]
    launch += ["--dynamo_backend", "no"]
    done = _train_process(launch, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixed precision bf16)" in done.stdout
    assert np.isfinite(_log(out)[0]["loss"])
    assert json.loads((out / "config.json").read_text())["mixed_precision"] is None  # accelerate's, not a flag


def test_resume_with_only_out_and_resume_takes_the_checkpoints_settings(trained, tmp_path, capsys):
    import shutil

    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "adapter.safetensors").unlink()  # the result of the copied run's last step is written again
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4"]) == 0  # no --data, --tiny, --frames
    printed = capsys.readouterr().out
    assert f"starting from {run / 'checkpoints' / 'step-000003'} (step 3)" in printed
    saved, now = json.loads((out / "config.json").read_text()), json.loads((run / "config.json").read_text())
    assert {k: v for k, v in now.items() if k not in ("out", "resume", "max_steps")} == {
        k: v for k, v in saved.items() if k not in ("out", "resume", "max_steps")
    }
    assert [r["step"] for r in _log(run) if "loss" in r] == [1, 2, 3, 4]


def test_no_validation_clip_is_ever_trained_on(trained):
    out, _ = trained
    validated = {p.stem for p in (out / "validation").rglob("*.mp4")}
    trained_on = {clip for r in _log(out) if "clips" in r for clip in r["clips"]}
    assert validated and trained_on and not validated & trained_on
    assert validated | trained_on == {"a", "b"}  # one identity each


def test_validation_holds_out_whole_identities_deterministically():
    from idanimator.errors import IDAnimatorError
    from idanimator.training.dataset import TrainingClip, hold_out

    def clip(name, identity):
        return TrainingClip(name, f"{name}.mp4", 0, 24, 8.0, "", identity, (PoolFace(f"{name}.png", 0),))

    clips = [clip("p1", "ann"), clip("q1", "bob"), clip("p2", "ann"), clip("r1", None), clip("q2", "bob")]
    train_clips, held = hold_out(clips, 2, seed=7)
    assert hold_out(clips, 2, seed=7) == (train_clips, held)  # the same clips for a resumed run
    persons = lambda group: {c.identity or c.clip_id for c in group}  # noqa: E731
    assert len(persons(held)) == 2 and not persons(held) & persons(train_clips)  # every clip of a person
    assert sorted(c.clip_id for c in train_clips + held) == sorted(c.clip_id for c in clips)
    assert hold_out(clips, 0, seed=7) == (clips, [])
    with pytest.raises(IDAnimatorError, match=r"^--val-clips 3 would hold out all 3 identities"):
        hold_out(clips, 3, seed=7)
