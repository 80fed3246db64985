"""build-dataset: real videos with a moving face and a shot cut, a corrupt file, labels, and a stand-in HTTP
captioning service; everything through the CLI, checked by reading what it wrote back."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idanimator.cli import main
from idanimator.data.manifest import read_manifest

FPS = 8
SIDE = 320
# insightface's ArcFace template (112 px), where norm_crop puts the eyes, nose and mouth corners
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
MANIFEST_KEYS = [
    "clip_id",
    "video",
    "start_frame",
    "end_frame",
    "fps",
    "width",
    "height",
    "identity",
    "caption_attribute",
    "caption_action",
    "caption",
    "faces",
    "face_frames",
]


def astronaut_shot(frames: int) -> list[np.ndarray]:
    """The astronaut's face, the camera panning slowly across it."""
    from skimage import data

    image = data.astronaut()
    return [image[20 + 2 * i : 20 + 2 * i + SIDE, 60 + 3 * i : 60 + 3 * i + SIDE] for i in range(frames)]


def cat_shot(frames: int) -> list[np.ndarray]:
    """Another scene, with no human face: the chelsea cat, panning."""
    from skimage import data

    image = np.asarray(Image.fromarray(data.chelsea()).resize((SIDE + 3 * frames, SIDE)))
    return [image[:, 3 * i : 3 * i + SIDE] for i in range(frames)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from idanimator.video import write_mp4

    folder = tmp_path_factory.mktemp("videos")
    write_mp4(astronaut_shot(24), folder / "astronaut.mp4", fps=FPS)
    write_mp4(astronaut_shot(20) + cat_shot(20), folder / "two_shots.mp4", fps=FPS)
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    return folder


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.json"
    entry = {"appearance": ["female", "young", "short_hair"], "action": ["talk", "smile"], "emotion": "happy"}
    path.write_text(json.dumps({"astronaut": entry | {"identity": "eileen"}}))
    return path


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["build-dataset", "--no-progress", "--detector", "retinaface", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(videos, labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    code, stdout, stderr = run_cli("--videos", videos, "--out", out, "--labels", labels, "--faces-per-clip", 3)
    assert code == 0, stderr
    return out, stdout, stderr


def test_the_manifest_has_one_record_per_clip_with_the_agreed_keys(built, videos):
    out, stdout, _ = built
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [list(json.loads(line)) for line in lines] == [MANIFEST_KEYS] * 2
    records = {r.clip_id: r for r in read_manifest(out)}
    assert sorted(records) == ["astronaut--000", "two_shots--000"]  # the cat shot has no face: dropped
    first = records["astronaut--000"]
    assert (first.start_frame, first.end_frame, first.fps, first.width, first.height) == (0, 24, 8.0, SIDE, SIDE)
    assert first.video_path == (videos / "astronaut.mp4").resolve()  # outside OUT: stored relative to it
    assert first.video == Path(os.path.relpath(videos.resolve() / "astronaut.mp4", out.resolve())).as_posix()
    assert all(path.is_file() for path in first.face_paths)
    assert stdout.startswith("2 new clips, 0 already done, from 3 videos (1 skipped)")


def test_template_captions_come_from_the_labels(built):
    records = {r.clip_id: r for r in read_manifest(built[0])}
    labelled, unlabelled = records["astronaut--000"], records["two_shots--000"]
    assert labelled.caption_attribute == "a young woman with short hair"
    assert labelled.caption_action == "a person talking and smiling, looking happy"
    assert labelled.caption == "a young woman with short hair talking and smiling, looking happy"
    assert labelled.identity == "eileen"
    assert (unlabelled.caption, unlabelled.identity) == ("a person in a video", "two_shots")


def test_the_face_pool_holds_faces_aligned_exactly_as_at_inference(built, detector):
    from idanimator.data.decode import read_frames
    from idanimator.face import crop_face

    for record in read_manifest(built[0]):
        assert len(record.faces) == 3 and len(set(record.face_frames)) == 3
        assert all(record.start_frame <= f < record.end_frame for f in record.face_frames)
        frames = dict(read_frames(record.video_path, record.face_frames))
        for path, index in zip(record.face_paths, record.face_frames, strict=True):
            saved = Image.open(path)
            assert path.name == f"{index:06d}.png" and saved.size == (224, 224)
            # the very crop inference makes of that frame, pixel for pixel
            assert np.array_equal(np.asarray(saved), np.asarray(crop_face(frames[index], detector).image))
            # and a real face, with its eyes, nose and mouth on the ArcFace template (within the small detector's
            # landmark error, about 8 of these 224 pixels)
            faces = detector.detect(np.asarray(saved))
            assert len(faces) == 1
            assert np.linalg.norm(faces[0].landmarks - 2 * ARCFACE_TEMPLATE, axis=1).mean() < 16


def test_a_corrupt_video_is_one_warning_and_left_out(built):
    out, _, stderr = built
    warnings = [line for line in stderr.splitlines() if "broken.mp4" in line]
    assert warnings == [
        "warning: skipped broken.mp4: The file broken.mp4 could not be read as a video (corrupt or truncated)."
    ]
    assert "broken" not in (out / "manifest.jsonl").read_text()
    assert "note: two_shots.mp4: clip two_shots--001: no usable face" in stderr  # the cat shot, said once


def test_a_second_run_does_no_work_and_touches_no_file(built, videos, labels):
    out = built[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, _ = run_cli("--videos", videos, "--out", out, "--labels", labels, "--faces-per-clip", 3)
    assert code == 0
    assert stdout.startswith("0 new clips, 2 already done, from 3 videos (1 skipped)")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_an_interrupted_run_redoes_only_the_unfinished_clip(built, videos, labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupted")  # beside the original: the same relative path to the videos
    shutil.copytree(built[0], out, dirs_exist_ok=True)
    (out / "videos" / "two_shots.json").unlink()  # as if killed after astronaut's record, before two_shots'
    (out / "clips" / "two_shots--000.json").unlink()
    kept = (out / "clips" / "astronaut--000.json").stat().st_mtime_ns
    code, stdout, _ = run_cli("--videos", videos, "--out", out, "--labels", labels, "--faces-per-clip", 3)
    assert code == 0 and stdout.startswith("1 new clips, 1 already done")
    assert (out / "clips" / "astronaut--000.json").stat().st_mtime_ns == kept
    assert (out / "manifest.jsonl").read_text() == (built[0] / "manifest.jsonl").read_text()


def test_other_settings_rebuild_the_clips_instead_of_mixing_old_and_new(built, videos, labels, tmp_path):
    out = tmp_path / "dataset"
    shutil.copytree(built[0], out)
    code, stdout, _ = run_cli("--videos", videos, "--out", out, "--labels", labels, "--faces-per-clip", 2)
    assert code == 0 and stdout.startswith("2 new clips, 0 already done")
    for record in read_manifest(out):
        assert len(record.faces) == 2
        assert sorted(p.name for p in (out / "faces" / record.clip_id).iterdir()) == [
            Path(f).name for f in record.faces
        ]


def test_chosen_frames_are_the_same_whether_ffmpeg_or_python_picks_them(videos, monkeypatch):
    from idanimator import video
    from idanimator.data import decode

    wanted = [0, 7, 19, 20, 39]
    picked_by_ffmpeg = list(decode.read_frames(videos / "two_shots.mp4", wanted))
    monkeypatch.setattr(video, "_MAX_SELECTED", 2)  # a long list: every frame is decoded, Python picks
    picked_here = list(decode.read_frames(videos / "two_shots.mp4", wanted))
    assert [i for i, _ in picked_by_ffmpeg] == [i for i, _ in picked_here] == wanted
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(picked_by_ffmpeg, picked_here, strict=True))
    with pytest.raises(decode.UnreadableVideoError, match="ended before frame 40"):
        list(decode.read_frames(videos / "two_shots.mp4", [3, 40]))


def test_the_shot_cutter_finds_the_cut_and_only_it(videos):
    from idanimator.data.decode import read_thumbnails
    from idanimator.data.shots import Clip, find_cuts, frame_distances, split_into_clips

    _, thumbnails = read_thumbnails(videos / "two_shots.mp4", 64)
    assert find_cuts(frame_distances(thumbnails)) == [20]
    _, thumbnails = read_thumbnails(videos / "astronaut.mp4", 64)
    assert find_cuts(frame_distances(thumbnails)) == []  # a panning camera is not a cut
    assert split_into_clips(40, [20, 35], min_frames=16) == [Clip(0, 20)]  # the 5-frame shot is too short


def test_face_frames_are_random_but_reproducible_and_spread_over_the_clip():
    from idanimator.data.facepool import candidate_frames
    from idanimator.data.shots import Clip

    clip = Clip(100, 200)
    frames = candidate_frames(clip, 5, "0:a--000")
    assert frames == candidate_frames(clip, 5, "0:a--000")
    assert frames != candidate_frames(clip, 5, "0:b--000")
    assert sorted(f // 10 for f in frames) == list(range(10, 20))  # one in each tenth of the clip


def test_blurred_and_faceless_frames_are_turned_down(detector):
    import cv2

    from idanimator.data.facepool import FaceFilter, judge_frame

    frame = astronaut_shot(1)[0]
    crop, reason = judge_frame(frame, detector, FaceFilter())
    assert crop is not None and reason == ""
    assert judge_frame(cv2.GaussianBlur(frame, (15, 15), 0), detector, FaceFilter())[1] == "blurry"
    assert judge_frame(cat_shot(1)[0], detector, FaceFilter()) == (None, "no face")


def test_celebvhq_and_csv_labels_are_read(tmp_path):
    from idanimator.data.captions import action_caption, attribute_caption, gerund
    from idanimator.data.labels import read_labels

    actions = ["talk", "smile", "nod", "sing", "head wagging", "close eyes", "eat", "open"]
    assert [gerund(a) for a in actions] == [
        "talking", "smiling", "nodding", "singing", "head wagging", "closing eyes", "eating", "opening"
    ]  # fmt: skip

    celebvhq = {
        "meta_info": {
            "appearance_mapping": ["blurry", "male", "young", "eyeglasses"],
            "action_mapping": ["talk", "nod"],
        },
        "clips": {
            "abc_1": {
                "attributes": {
                    "appearance": [1, 0, 1, 1],
                    "action": [0, 1],
                    "emotion": {"sep_flag": False, "labels": "surprise"},
                }
            }
        },
    }
    (tmp_path / "info.json").write_text(json.dumps(celebvhq))
    labels = read_labels(tmp_path / "info.json")["abc_1"]
    assert attribute_caption(labels) == "a young woman with eyeglasses"  # "blurry" describes the footage
    assert action_caption(labels) == "a person nodding, looking surprised"
    (tmp_path / "labels.csv").write_text("name,appearance,action,identity\nclip.mp4,male;bald,shake_head,bob\n")
    labels = read_labels(tmp_path / "labels.csv")["clip"]
    assert (attribute_caption(labels), action_caption(labels), labels.identity) == (
        "a bald man",
        "a person shaking head",
        "bob",
    )


def test_bad_back_ends_and_labels_are_one_line_before_any_work(videos, tmp_path):
    out = tmp_path / "never"
    for flag, value, named in (
        ("--captioner", "no-such-captioner", "no-such-captioner"),
        ("--captioner", "nobody/no-such-model", "not in the Hugging Face cache"),
        ("--rewriter", "gpt", "gpt"),
        ("--captioner", "ftp://example.com/v1", "ftp://example.com/v1"),
        ("--labels", tmp_path / "missing.json", "missing.json"),
    ):
        code, stdout, stderr = run_cli("--videos", videos, "--out", out, flag, value)
        assert code == 1 and stdout == ""
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and named in stderr
    assert not out.exists()
    code, _, stderr = run_cli("--videos", videos, "--out", out, "--faces-per-clip", 0)
    assert code == 1 and "--faces-per-clip" in stderr


class _StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible service as a remote captioner would be: lists a model, answers chat completions."""

    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        assert self.path == "/v1/models"
        self._reply({"object": "list", "data": [{"id": "stand-in-vlm", "object": "model"}]})

    def do_POST(self):
        assert self.path == "/v1/chat/completions"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        content = body["messages"][0]["content"]
        text = content[0]["text"]
        images = [part for part in content if part["type"] == "image_url"]
        if text.startswith("Merge"):
            answer = "MERGED " + " + ".join(line.split(": ", 1)[1] for line in text.splitlines()[1:])
        elif text.startswith("Describe the main person"):
            answer = f"a woman with short brown hair ({len(images)} image)"
        else:
            answer = f"a person turning their head ({len(images)} images)"
        self._reply(
            {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
            }
        )


@pytest.fixture
def stand_in_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    _StandIn.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_openai_compatible_service_captions_and_rewrites(videos, tmp_path, stand_in_service, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "dataset"
    only = out / "raw"  # videos kept inside the data set's folder are named relative to it
    only.mkdir(parents=True)
    os.link(videos / "astronaut.mp4", only / "astronaut.mp4")
    code, stdout, stderr = run_cli(
        "--videos", only, "--out", out, "--captioner", stand_in_service, "--rewriter", stand_in_service + "/v1"
    )
    assert code == 0, stderr
    (record,) = read_manifest(out)
    assert record.caption_attribute == "a woman with short brown hair (1 image)"
    assert record.caption_action == "a person turning their head (4 images)"
    assert record.caption == "MERGED a woman with short brown hair (1 image) + a person turning their head (4 images)"
    assert record.video == "raw/astronaut.mp4" and record.video_path == (only / "astronaut.mp4").resolve()
    requests = _StandIn.requests
    assert len(requests) == 3 and {r["auth"] for r in requests} == {"Bearer sk-test"}
    assert {r["body"]["model"] for r in requests} == {"stand-in-vlm"}
    image_url = requests[0]["body"]["messages"][0]["content"][1]["image_url"]["url"]
    assert image_url.startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(image_url.split(",", 1)[1])))
    assert sent.size == (SIDE, SIDE)  # the whole frame with the face, for the person's look


def test_an_unreachable_service_is_one_line(videos, tmp_path):
    from tests.helpers import free_port

    code, _, stderr = run_cli(
        "--videos", videos, "--out", tmp_path / "o", "--captioner", f"http://127.0.0.1:{free_port()}/v1"
    )
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "cannot be reached" in stderr


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory) -> Path:
    """A tiny random BLIP captioner on disk whose output bias makes it say only "smiling"."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "smiling"]
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    text = small | {"vocab_size": len(words), "encoder_hidden_size": 32, "bos_token_id": 2, "sep_token_id": 3}
    config = BlipConfig(
        text_config=text | {"pad_token_id": 0, "eos_token_id": 3},
        vision_config=small | {"image_size": 32, "patch_size": 16},
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias.fill_(-30.0)
        bias[words.index("smiling")] = 30.0
    model.save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


def test_a_transformers_captioner_describes_the_person(videos, labels, tmp_path, tiny_captioner):
    only = tmp_path / "videos"
    only.mkdir()
    os.link(videos / "astronaut.mp4", only / "astronaut.mp4")
    code, _, stderr = run_cli(
        "--videos", only, "--out", tmp_path / "out", "--labels", labels, "--captioner", tiny_captioner
    )
    assert code == 0, stderr
    (record,) = read_manifest(tmp_path / "out")
    assert set(record.caption_attribute.split()) == {"smiling"}  # the model's words, not the labels'
    assert record.caption_action == "a person talking and smiling, looking happy"  # an image model: the labels


def _build_process(videos: Path, out: Path, *more: str) -> subprocess.Popen:
    argv = ["build-dataset", "--no-progress", "--detector", "retinaface", "--faces-per-clip", "3", "--workers", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "idanimator", *argv, "--videos", str(videos), "--out", str(out), *more],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until_locked(lock: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``process`` holds its flock on ``lock`` (read from /proc/locks, so the test never takes it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if lock.exists():
            inode = f":{lock.stat().st_ino} "
            if any("FLOCK" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
                return
        time.sleep(0.02)
    raise AssertionError(f"the first run never locked {lock} (exit status {process.poll()})")


@pytest.fixture(scope="module")
def six_videos(tmp_path_factory) -> Path:
    from idanimator.video import write_mp4

    folder = tmp_path_factory.mktemp("six")
    for n in range(6):
        write_mp4(astronaut_shot(24 + 2 * n), folder / f"person{n}.mp4", fps=FPS)
    return folder


def test_a_second_run_into_the_same_out_is_refused_while_the_first_finishes_whole(six_videos, tmp_path):
    out = tmp_path / "dataset"
    first = _build_process(six_videos, out)
    try:
        _wait_until_locked(out / ".build-dataset.lock", first)
        first.send_signal(signal.SIGSTOP)  # paused, lock held: the second run meets it however slow its start
        second = _build_process(six_videos, out)
        _, err = second.communicate(timeout=120)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 1
        busy = f"Another build-dataset run is writing into {out}; wait for it to finish or choose another --out."
        assert err == f"error: {busy}\n"  # one line, at once, while the first goes on
        stdout, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert stdout.startswith("6 new clips, 0 already done, from 6 videos;")
    records = read_manifest(out)
    assert [r.clip_id for r in records] == [f"person{n}--000" for n in range(6)]
    assert all(path.is_file() for r in records for path in r.face_paths)


def test_a_killed_run_leaves_no_lock_behind(six_videos, tmp_path):
    out = tmp_path / "dataset"
    first = _build_process(six_videos, out)
    try:
        _wait_until_locked(out / ".build-dataset.lock", first)
    finally:
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops its lock
        first.wait(timeout=60)
    code, stdout, stderr = run_cli("--videos", six_videos, "--out", out, "--faces-per-clip", 3)
    assert code == 0, stderr
    assert len(read_manifest(out)) == 6


# -- issue 20: keys, CelebV-HQ's own labels, relative video paths, shards -------------------------------


def test_two_videos_whose_names_clean_to_one_key_stay_two(tmp_path):
    from idanimator.video import write_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(astronaut_shot(24), videos / "a b.mp4", fps=FPS)
    write_mp4(astronaut_shot(18), videos / "a_b.mp4", fps=FPS)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("--videos", videos, "--out", out, "--faces-per-clip", 2)
    assert code == 0, stderr
    assert stdout.startswith("2 new clips, 0 already done, from 2 videos;")
    records = read_manifest(out)
    assert sorted(Path(r.video).name for r in records) == ["a b.mp4", "a_b.mp4"]  # one clip each, none twice
    assert {r.num_frames for r in records} == {24, 18}
    assert len({r.clip_id for r in records}) == 2 and len(list((out / "faces").iterdir())) == 2
    assert {r.identity for r in records} == {"a b", "a_b"}
    code, stdout, _ = run_cli("--videos", videos, "--out", out, "--faces-per-clip", 2)
    assert stdout.startswith("0 new clips, 2 already done")  # a re-run redoes neither
    # stable: a key depends on its own path only, readable where cleaning changed nothing
    from idanimator.data.layout import video_key

    assert video_key("a_b.mp4") == "a_b" and video_key("talks/ann.mp4") == "talks__ann"
    keys = [video_key(p) for p in ("a b.mp4", "a_b.mp4", "a.mp4", "a.mov", "a/b.mp4", "a__b.mp4", "a_/b.mp4")]
    assert len(set(keys)) == len(keys) and keys[0].startswith("a_b-")


CELEBA_APPEARANCE = (
    "Blurry Male Young Chubby Pale_Skin Rosy_Cheeks Oval_Face Receding_Hairline Bald Bangs Black_Hair Blond_Hair "
    "Gray_Hair Brown_Hair Straight_Hair Wavy_Hair Long_Hair Arched_Eyebrows Bushy_Eyebrows Bags_Under_Eyes "
    "Eyeglasses Sunglasses Narrow_Eyes Big_Nose Pointy_Nose High_Cheekbones Big_Lips Double_Chin No_Beard "
    "5_o_Clock_Shadow Goatee Mustache Sideburns Heavy_Makeup Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Wearing_Mask"
).split()
CELEBV_ACTIONS = (
    "blow chew close_eyes cough cry drink eat frown gaze glare head_wagging kiss laugh listen_to_music look_around "
    "make_a_face nod play_instrument read shake_head shout sigh sing sleep smile smoke sneer sneeze sniff talk turn "
    "weep whisper wink yawn"
).split()


def _flags(names: list[str], on: set[str]) -> list[int]:
    return [int(name in on) for name in names]


def test_celebvhq_info_in_its_documented_form_gives_the_right_captions(tmp_path):
    """celebvhq_info.json exactly as the CelebV-HQ README documents it: capitalised appearance names, 0/1
    vectors in the mappings' order, one emotion or (sep_flag) a list of timed ones, ytb_id/duration/bbox/version."""
    from idanimator.data.captions import action_caption, attribute_caption
    from idanimator.data.labels import read_labels

    info = {
        "meta_info": {"appearance_mapping": CELEBA_APPEARANCE, "action_mapping": CELEBV_ACTIONS},
        "clips": {
            "M2Ohb0FAaJU_1": {
                "ytb_id": "M2Ohb0FAaJU",
                "duration": {"start_sec": 81.62, "end_sec": 86.17},
                "bbox": {"top": 0.0, "bottom": 0.8815, "left": 0.1964, "right": 0.6922},
                "attributes": {
                    "appearance": _flags(
                        CELEBA_APPEARANCE, {"Young", "Long_Hair", "Wavy_Hair", "Brown_Hair", "No_Beard", "Wearing_Hat"}
                    ),
                    "action": _flags(CELEBV_ACTIONS, {"talk", "smile"}),
                    "emotion": {"sep_flag": False, "labels": "neutral"},
                },
                "version": "v0.1",
            },
            "_0tf2n3rlJU_0": {
                "ytb_id": "_0tf2n3rlJU",
                "duration": {"start_sec": 52.72, "end_sec": 56.1},
                "bbox": {"top": 0.0, "bottom": 0.8407, "left": 0.5271, "right": 1.0},
                "attributes": {
                    "appearance": _flags(CELEBA_APPEARANCE, {"Blurry", "Male", "Eyeglasses", "5_o_Clock_Shadow"}),
                    "action": _flags(CELEBV_ACTIONS, {"shake_head"}),
                    "emotion": {
                        "sep_flag": True,
                        "labels": [
                            {"emotion": "neutral", "start_sec": 0, "end_sec": 0.28},
                            {"emotion": "happy", "start_sec": 1.28, "end_sec": 3.28},
                        ],
                    },
                },
                "version": "v0.1",
            },
        },
    }
    (tmp_path / "celebvhq_info.json").write_text(json.dumps(info))
    labels = read_labels(tmp_path / "celebvhq_info.json")
    woman, man = labels["M2Ohb0FAaJU_1"], labels["_0tf2n3rlJU_0"]
    assert attribute_caption(woman) == "a young woman with long wavy brown hair, wearing a hat"
    assert action_caption(woman) == "a person smiling and talking"  # in the mapping's order; neutral says nothing
    assert attribute_caption(man) == "a man with eyeglasses and stubble"
    assert action_caption(man) == "a person shaking head, looking happy"


def test_a_data_set_moved_with_its_videos_still_finds_them(built, videos, labels, tmp_path):
    project = tmp_path / "project"
    (project / "videos").mkdir(parents=True)
    for video in videos.iterdir():  # the same files (size and time): nothing is decoded again
        os.link(video, project / "videos" / video.name)
    shutil.copytree(built[0], project / "data")
    args = ("--out", project / "data", "--labels", labels, "--faces-per-clip", 3)
    code, stdout, _ = run_cli("--videos", project / "videos", *args)
    assert code == 0 and stdout.startswith("0 new clips, 2 already done")  # the videos moved: paths updated
    assert {r.video for r in read_manifest(project / "data")} == {"../videos/astronaut.mp4", "../videos/two_shots.mp4"}
    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    project.rename(moved)
    records = read_manifest(moved / "data")
    assert all(r.video_path.is_file() and r.video_path.is_relative_to(moved) for r in records)
    assert all(path.is_file() for r in records for path in r.face_paths)
    before = {p: p.stat().st_mtime_ns for p in (moved / "data").rglob("*")}
    code, stdout, _ = run_cli("--videos", moved / "videos", "--out", moved / "data", *args[2:])
    assert code == 0 and stdout.startswith("0 new clips, 2 already done")
    assert {p: p.stat().st_mtime_ns for p in (moved / "data").rglob("*")} == before  # and nothing to rewrite


def test_an_older_data_set_with_absolute_paths_still_reads_and_is_not_rebuilt(built, videos, labels, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(built[0], out)
    for record in [*(out / "videos").glob("*.json"), *(out / "clips").glob("*.json")]:  # as written before
        data = json.loads(record.read_text())
        absolute = str((videos / (data["stamp"]["video"])).resolve())
        data["stamp"]["video"] = absolute
        if "video" in data:
            data["video"] = absolute
        record.write_text(json.dumps(data))
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for line in lines:
        line["video"] = os.path.normpath(built[0].resolve() / line["video"])
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert all(r.video_path.is_absolute() and r.video_path.is_file() for r in read_manifest(out))
    code, stdout, _ = run_cli("--videos", videos, "--out", out, "--labels", labels, "--faces-per-clip", 3)
    assert code == 0 and stdout.startswith("0 new clips, 2 already done")
    now, then = read_manifest(out), read_manifest(built[0])  # the same clips, their videos now named relatively
    assert [r.as_dict() | {"video": ""} for r in now] == [r.as_dict() | {"video": ""} for r in then]
    assert [r.video_path for r in now] == [r.video_path for r in then] and now[0].video.startswith("../")


@pytest.mark.parametrize("shard", ["3/2", "x", "0/0", "2/2", "-1/2", "1/"])
def test_a_bad_shard_is_one_sentence(videos, tmp_path, shard):
    code, stdout, stderr = run_cli("--videos", videos, "--out", tmp_path / "never", f"--shard={shard}")
    assert code == 1 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("error: --shard must be I/N") and repr(shard) in stderr
    assert not (tmp_path / "never").exists()


def test_two_shards_and_a_final_pass_make_the_data_set_one_run_makes(six_videos, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    code, _, stderr = run_cli("--videos", six_videos, "--out", whole, "--faces-per-clip", 3, "--workers", 1)
    assert code == 0, stderr
    first = _build_process(six_videos, sharded, "--shard", "0/2")
    second = _build_process(six_videos, sharded, "--shard", "1/2")
    try:
        _wait_until_locked(sharded / ".build-dataset.shard-0-of-2.lock", first)
        first.send_signal(signal.SIGSTOP)  # shard 0 holds its locks while shard 1 works beside it
        out_second, err = second.communicate(timeout=300)
        assert second.returncode == 0, err
        assert out_second == (
            "3 new clips, 0 already done, from 3 of 6 videos (shard 1/2); "
            "the manifest is written by a run without --shard once every shard has finished\n"
        )
        assert not (sharded / "manifest.jsonl").exists()
        code, _, stderr = run_cli("--videos", six_videos, "--out", sharded, "--faces-per-clip", 3)
        assert code == 1 and stderr == (
            f"error: Shard 0/2 of build-dataset is still writing into {sharded}; "
            "run it without --shard once every shard has finished.\n"
        )
        code, _, stderr = run_cli("--videos", six_videos, "--out", sharded, "--faces-per-clip", 3, "--shard", "0/2")
        assert code == 1 and stderr.startswith(f"error: Shard 0/2 is already being built into {sharded};")
        first.send_signal(signal.SIGCONT)
        out_first, err = first.communicate(timeout=300)
    finally:
        first.kill()
        second.kill()
    assert first.returncode == 0, err
    assert out_first.startswith("3 new clips, 0 already done, from 3 of 6 videos (shard 0/2);")
    code, stdout, stderr = run_cli("--videos", six_videos, "--out", sharded, "--faces-per-clip", 3, "--workers", 1)
    assert code == 0, stderr
    assert stdout.startswith("0 new clips, 6 already done, from 6 videos;")  # the final pass only assembles
    assert (sharded / "manifest.jsonl").read_text() == (whole / "manifest.jsonl").read_text()
    faces = sorted(p.relative_to(whole) for p in (whole / "faces").rglob("*.png"))
    assert faces == sorted(p.relative_to(sharded) for p in (sharded / "faces").rglob("*.png")) and len(faces) == 18
    assert all((whole / face).read_bytes() == (sharded / face).read_bytes() for face in faces)
