"""The identity-preserving loss: ArcFace (arcface_torch's iresnet layout), the differentiable crop onto its
template, x0 from the training step's own prediction, and the loss in the train command.

A one-clip data set in build-dataset's layout (a moving astronaut crop with a face pool aligned by the real
detector) and the tiny kit's models; the ArcFace is the tiny kit's random one.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from idanimator.arcface import IResNet, load_arcface, warp_to_template
from idanimator.cli import main
from idanimator.errors import IDAnimatorError
from idanimator.face import largest_face
from idanimator.tiny.arcface_kit import build_tiny_arcface
from idanimator.training.adapter_training import FaceAdapterTrainingModel, TrainableFaceAdapter, read_initial_adapter
from idanimator.training.dataset import ClipDataset, Dropout, collate, load_clips
from idanimator.training.identity_loss import IdentityLoss, predicted_x0, timestep_weights
from idanimator.training.train import load_frozen_parts, micro_step_generator, step_losses

FRAMES, SIZE = 4, 64
TINY_RUN = ["--tiny", "--frames", "4", "--stride", "2", "--size", "64", "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, detector, astronaut):
    from idanimator.face import crop_face
    from idanimator.video import write_mp4

    root = tmp_path_factory.mktemp("id-dataset")
    photo = np.asarray(astronaut)
    frames = [photo[20 + t : 276 + t, 100 + 2 * t : 356 + 2 * t] for t in range(16)]  # the camera pans
    write_mp4(frames, root / "videos" / "a.mp4", fps=8)
    faces = []
    for frame in (0, 5, 10, 15):
        path = root / "faces" / f"{frame:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop_face(frames[frame], detector).image.save(path)  # the CLIP input, as build-dataset writes
        faces.append(str(path.relative_to(root)))
    record = dict(
        clip_id="a",
        video="videos/a.mp4",
        start_frame=0,
        end_frame=16,
        fps=8.0,
        width=256,
        height=256,
        identity="astronaut",
        caption_attribute="an astronaut",
        caption_action="turns the head",
        caption="an astronaut turns the head",
        faces=faces,
        face_frames=[0, 5, 10, 15],
    )
    (root / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return root


def _dataset(root, feature_extractor, id_frames=FRAMES, size=SIZE) -> ClipDataset:
    clips, _ = load_clips(root, FRAMES)
    options = dict(frames=FRAMES, stride=2, size=size, num_references=1, dropout=Dropout(0, 0, 0), seed=0)
    return ClipDataset(
        clips, **options, feature_extractor=feature_extractor, id_frames=id_frames, detector="retinaface"
    )


def _model(parts):
    weights = read_initial_adapter(None, parts.tiny_adapter).complete(parts.unet, 32, 8, 0)
    adapter = TrainableFaceAdapter.from_weights(weights, parts.unet)
    parts.freeze("cpu", torch.float32)
    return FaceAdapterTrainingModel(parts.unet, adapter)


# -- the crop onto the template and the network --------------------------------------------------


@pytest.mark.parametrize("angle", [0, 25])
def test_the_differentiable_warp_is_insightfaces_norm_crop(detector, astronaut, angle):
    from insightface.utils.face_align import norm_crop

    photo = np.asarray(astronaut.rotate(angle, resample=Image.Resampling.BICUBIC))
    landmarks = largest_face(detector.detect(photo)).landmarks
    with warnings.catch_warnings():  # norm_crop calls scikit-image's deprecated SimilarityTransform.estimate
        warnings.simplefilter("ignore", FutureWarning)
        theirs = norm_crop(photo, landmarks, 112).astype(np.float32)
    pixels = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float().requires_grad_(True)
    ours = warp_to_template(pixels, landmarks[None])
    assert ours.shape == (1, 3, 112, 112)
    assert np.abs(ours[0].permute(1, 2, 0).detach().numpy() - theirs).max() <= 2.0  # of 255
    ours.sum().backward()
    assert pixels.grad.abs().sum() > 0  # gradients reach the pixels


def _arcface_torch_names(blocks: list[int]) -> set[str]:
    """The state-dict names of arcface_torch's iresnet with these blocks per stage, spelled out from its
    layout (not from our module)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    names |= {f"{m}.{p}" for m in ("bn1", "bn2", "features") for p in bn}
    for stage, count in enumerate(blocks, start=1):
        for i in range(count):
            block = f"layer{stage}.{i}"
            names |= {f"{block}.conv1.weight", f"{block}.conv2.weight", f"{block}.prelu.weight"}
            names |= {f"{block}.{m}.{p}" for m in ("bn1", "bn2", "bn3") for p in bn}
            if i == 0:  # every stage starts with a stride of 2: a 1x1 conv + BN shortcut
                names |= {f"{block}.downsample.0.weight"} | {f"{block}.downsample.1.{p}" for p in bn}
    return names


@pytest.mark.parametrize("blocks", [[3, 4, 14, 3], [3, 13, 30, 3]], ids=["r50", "r100"])
def test_an_arcface_torch_state_dict_loads_strictly_with_every_key_used(tmp_path, blocks):
    torch.manual_seed(0)
    made = IResNet(blocks, [4, 8, 8, 16], stem=4, embedding=16)  # the real layout, narrow
    state = made.state_dict()
    assert set(state) == _arcface_torch_names(blocks)
    torch.save(state, tmp_path / "backbone.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")  # saved from DDP
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "backbone.safetensors")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    for name in ("backbone.pth", "ddp.pth", "backbone.safetensors"):
        model = load_arcface(tmp_path / name)
        loaded = model.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(x), made.eval()(x))


def test_a_file_that_is_not_an_iresnet_is_one_sentence(tmp_path):
    state = IResNet([1, 1, 1, 1], [4, 4, 8, 8], stem=4, embedding=8).state_dict()
    cases = {
        "extra.pth": {**state, "layer1.0.extra.weight": torch.zeros(1)},
        "missing.pth": {k: v for k, v in state.items() if k != "layer2.0.bn3.running_var"},
        "other.pth": {"body.0.weight": torch.zeros(1)},
    }
    for name, tensors in cases.items():
        torch.save(tensors, tmp_path / name)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"model": object()}, tmp_path / "pickle.pth")  # needs code to load: refused
    for name in (*cases, "junk.pth", "pickle.pth", "absent.pth"):
        with pytest.raises(IDAnimatorError) as caught:
            load_arcface(tmp_path / name)
        message = str(caught.value)
        assert str(tmp_path / name) in message and "\n" not in message and message.endswith("."), message


def test_the_tiny_arcface_has_the_real_layout_and_tells_faces_apart(tmp_path, astronaut):
    path = build_tiny_arcface(tmp_path / "backbone.pth")
    state = torch.load(path, weights_only=True)
    assert set(state) == _arcface_torch_names([1, 1, 1, 1])
    model = load_arcface(path)
    photo = np.asarray(astronaut.resize((112, 112)))
    images = torch.from_numpy(np.stack([photo, photo[:, :, ::-1], photo[::-1]]).copy()).permute(0, 3, 1, 2)
    with torch.no_grad():
        embeddings = model.embed(images.float() / 127.5 - 1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] < 0.95 and similarity[0, 2] < 0.95  # not a constant: the loss has something to learn


# -- x0, the data loader's landmarks, gradients ---------------------------------------------------


def test_x0_from_the_true_noise_is_the_clean_latents(tiny_kit):
    parts = load_frozen_parts(tiny=True)
    scheduler = parts.noise_scheduler
    latents, noise = torch.randn(3, 4, 2, 8, 8), torch.randn(3, 4, 2, 8, 8)
    timesteps = torch.tensor([0, 400, 900])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(
        predicted_x0(noisy, noise, timesteps, scheduler.alphas_cumprod), latents, atol=2e-4, rtol=0
    )
    weights = timestep_weights(torch.tensor([0, 500, 999]), 1000, "one-minus-t-squared")
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.25, 1e-6]))
    assert timestep_weights(timesteps, 1000, "none").tolist() == [1.0, 1.0, 1.0]


def test_the_loader_finds_landmarks_on_the_real_frames_and_changes_no_other_draw(clip_dir, detector, tiny_kit):
    from idanimator.images import clip_image_processor

    extractor = clip_image_processor()
    plain, with_id = _dataset(clip_dir, extractor, id_frames=0), _dataset(clip_dir, extractor, id_frames=2)
    for position in range(3):
        a, b = plain[(0, position)], with_id[(0, position)]
        assert "id_landmarks" not in a
        assert all(torch.equal(a[k], b[k]) for k in ("frames", "faces")) and a["window"] == b["window"]
        assert b["id_frames"].shape == (2,) and b["id_reference"].shape == (1, 3, 112, 112)
        for slot, index in enumerate(b["id_frames"].tolist()):
            real = np.rint((b["frames"][index].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
            faces = detector.detect(real)
            assert bool(b["id_found"][slot]) == bool(faces)
            if faces:
                assert np.allclose(b["id_landmarks"][slot].numpy(), largest_face(faces).landmarks)


@pytest.fixture(scope="module")
def tiny_arcface(tmp_path_factory):
    return load_arcface(build_tiny_arcface(tmp_path_factory.mktemp("arcface") / "backbone.pth"))


def test_gradients_reach_the_adapter_and_nothing_frozen(clip_dir, tiny_kit, tiny_arcface):
    parts = load_frozen_parts(tiny=True)
    model = _model(parts)
    identity = IdentityLoss(tiny_arcface, "none", parts.noise_scheduler)
    batch = collate([_dataset(clip_dir, parts.feature_extractor)[(0, 0)]])
    assert batch["id_found"].any()
    _, term = step_losses(model, parts, batch, micro_step_generator(0, 0, 0), "cpu", torch.float32, identity)
    assert term.count == int(batch["id_found"].sum()) and term.loss.requires_grad
    term.loss.backward()
    trainable = {id(p) for p in model.adapter.parameters()}  # the adapter's modules sit inside the UNet
    frozen = [p for m in (*parts.modules().values(), tiny_arcface) for p in m.parameters() if id(p) not in trainable]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    grads = {name: p.grad for name, p in model.adapter.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(
        any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)) for part in ("resampler", "layers")
    )


def test_a_sample_without_its_face_or_a_face_in_its_frames_adds_nothing(clip_dir, tiny_kit, tiny_arcface):
    parts = load_frozen_parts(tiny=True)
    model = _model(parts)
    identity = IdentityLoss(tiny_arcface, "none", parts.noise_scheduler)
    batch = collate([_dataset(clip_dir, parts.feature_extractor)[(0, 0)]])
    for key, value in (("face_dropped", torch.tensor([True])), ("id_found", torch.zeros_like(batch["id_found"]))):
        _, term = step_losses(
            model, parts, {**batch, key: value}, micro_step_generator(0, 0, 0), "cpu", torch.float32, identity
        )
        assert term.count == 0 and term.loss.item() == 0 and not term.loss.requires_grad


def test_the_identity_term_falls_in_a_short_overfit_run(clip_dir, tiny_kit, tiny_arcface):
    """One clip, the same noise and timestep at every step: with the loss on, the identity term falls; trained
    on the diffusion loss alone, it does not (so the fall is the identity loss's doing)."""
    ends = {}
    for weight in (0.0, 1.0):
        parts = load_frozen_parts(tiny=True)
        model = _model(parts)
        identity = IdentityLoss(tiny_arcface, "none", parts.noise_scheduler)
        batch = collate([_dataset(clip_dir, parts.feature_extractor)[(0, 0)]])
        optimizer = torch.optim.AdamW(model.adapter.parameters(), lr=1e-2)
        terms = []
        for _ in range(10):
            generator = micro_step_generator(0, 1, 0)
            loss, term = step_losses(model, parts, batch, generator, "cpu", torch.float32, identity)
            (loss + weight * term.loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            terms.append(term.loss.item())
        ends[weight] = terms[-1]
        if weight:
            assert terms[-1] < 0.9 * terms[0], terms
    assert ends[1.0] < ends[0.0] - 0.05, ends


# -- the train command ---------------------------------------------------------------------------


def test_weight_0_is_the_run_without_the_loss_and_a_weight_changes_it(clip_dir, tmp_path, tiny_kit):
    runs = {
        "plain": [],
        "zero": ["--id-loss-weight", "0", "--id-loss-frames", "3", "--id-loss-timestep-weight", "none"],
        "on": ["--id-loss-weight", "1", "--id-loss-frames", "4", "--id-loss-timestep-weight", "none"],
    }
    adapters = {}
    for name, flags in runs.items():
        out = tmp_path / name
        assert main(["train", "--data", str(clip_dir), "--out", str(out), *TINY_RUN, "--max-steps", "2", *flags]) == 0
        adapters[name] = load_file(out / "adapter.safetensors")
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert any("id_loss" in r for r in log) == (name == "on")
        if name == "on":
            assert all(0 <= r["id_loss"] <= 2 and -1 <= r["id_similarity"] <= 1 for r in log if "id_loss" in r)
    assert adapters["zero"].keys() == adapters["plain"].keys()
    assert all(torch.equal(adapters["zero"][k], v) for k, v in adapters["plain"].items())  # bit for bit
    assert any(not torch.equal(adapters["on"][k], v) for k, v in adapters["plain"].items())


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--id-loss-weight", "1"], "error: --id-loss-weight needs --id-loss-model"),
        (["--id-loss-weight", "-1", "--tiny"], "error: --id-loss-weight must be 0 (off) or more"),
        (["--id-loss-timestep-weight", "linear"], "error: --id-loss-timestep-weight must be one of none, "),
        (["--id-loss-model", "nowhere.pth"], "error: --id-loss-model nowhere.pth does not exist"),
        (["--tiny", "--id-loss-weight", "1", "--id-loss-model", "JUNK"], "error: JUNK is not an arcface_torch iresnet"),
    ],
)
def test_bad_identity_loss_settings_are_one_sentence(clip_dir, tmp_path, capsys, flags, expected):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    flags = [str(junk) if f == "JUNK" else f for f in flags]
    assert main(["train", "--data", str(clip_dir), "--out", str(tmp_path / "run"), "--workers", "0", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected.replace("JUNK", str(junk))) and "\n" not in err, err


def test_the_loader_benchmark_runs(tmp_path):
    """benchmarks/id_loss.py in its smoke mode (its figures are not checked, only that they are numbers)."""
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "benchmarks/id_loss.py", "--smoke", "--json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert all(math.isfinite(result[k]) for k in ("loader_ratio", "detect_ms_per_frame", "plain_ms"))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # its clip's folder is removed
