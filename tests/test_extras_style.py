"""Style LoRAs, FreeInit and long videos (FreeNoise) on the tiny kit: each changes the video, and each leaves
the cached pipeline exactly as it found it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from idanimator.errors import GenerationCancelled, InvalidRequestError, WeightsUnavailableError
from idanimator.extras import freeinit, longvideo, loras
from idanimator.request import GenerationRequest, LoraSpec
from idanimator.tiny.lora_kit import save_sdxl_lora, save_tiny_lora


@pytest.fixture(scope="module")
def crops(tiny_pipe, astronaut_path, second_face):
    return tiny_pipe.prepare_faces([astronaut_path, second_face])


@pytest.fixture(scope="module")
def settings():
    return GenerationRequest(
        prompt="a man walking on the moon", num_frames=8, num_inference_steps=2, height=64, width=64, seed=7
    ).validate()


@pytest.fixture(scope="module")
def lora_files(tiny_kit, tmp_path_factory):
    """Tiny LoRAs for the kit's backbone, in the layouts real files come in."""
    root = tmp_path_factory.mktemp("loras")
    base = tiny_kit["base"]
    return {
        "diffusers": save_tiny_lora(base, root / "diffusers" / "pytorch_lora_weights.safetensors", seed=0),
        "kohya": save_tiny_lora(base, root / "kohya.safetensors", layout="kohya", seed=1),
        "kohya-text-only": save_tiny_lora(base, root / "text.safetensors", layout="kohya", unet=False, seed=2),
        "sdxl": save_sdxl_lora(root / "sdxl.safetensors"),
    }


def _modules(pipe) -> list[tuple[str, type]]:
    return [(name, type(m)) for model in (pipe.unet, pipe.text_encoder) for name, m in model.named_modules()]


@pytest.fixture(scope="module")
def clean_modules(tiny_pipe):
    return _modules(tiny_pipe.pipe)


@pytest.fixture(autouse=True)
def pipeline_is_left_clean(tiny_pipe, clean_modules):
    """After every test, whatever it asked for: the very same module tree, no adapter, FreeInit and FreeNoise off."""
    yield
    pipe = tiny_pipe.pipe
    assert _modules(pipe) == clean_modules
    assert not any(pipe.get_list_adapters().values())
    assert not pipe.free_init_enabled and not pipe.free_noise_enabled
    assert "_free_init_initial_noise" not in pipe.__dict__


def run(pipeline, crops, settings, extras=None, **overrides):
    """The latents of a request with ``extras`` (the options' request fields) and ``overrides``."""
    return pipeline.denoise(crops[:1], settings.replace(**(extras or {}), **overrides)).latents


@pytest.fixture(scope="module")
def generated(tiny_pipe, crops, settings):
    """Latents of the tiny video with some extras, made once per module (plain ones are always made afresh)."""
    made = {}

    def generated(extras: dict):
        if repr(extras) not in made:
            made[repr(extras)] = run(tiny_pipe, crops, settings, extras)
        return made[repr(extras)]

    return generated


def with_loras(*specs) -> dict:
    return {"loras": tuple(LoraSpec(str(source), weight) for source, weight in specs)}


def differ(a, b) -> float:
    return (a - b).abs().mean().item()


# -- style LoRAs -----------------------------------------------------------------------------------------


def test_a_lora_changes_the_video_more_with_a_bigger_weight_and_leaves_no_trace(tiny_pipe, crops, settings, lora_files):
    plain = run(tiny_pipe, crops, settings)
    half = run(tiny_pipe, crops, settings, with_loras((lora_files["diffusers"], 0.5)))
    full = run(tiny_pipe, crops, settings, with_loras((lora_files["diffusers"], 1.0)))
    after = run(tiny_pipe, crops, settings)
    assert differ(half, plain) > 1e-3
    assert differ(full, plain) > 1.5 * differ(half, plain)
    assert torch.equal(after, plain)


def test_a_kohya_lora_changes_the_unet_and_the_text_encoder(tiny_pipe, crops, settings, lora_files, generated):
    pipe = tiny_pipe.pipe

    def text_features():
        return pipe.encode_prompt("a man", pipe.device, 1, False)[0]

    plain, plain_text = run(tiny_pipe, crops, settings), text_features()
    assert differ(generated(with_loras((lora_files["kohya"], 1.0))), plain) > 1e-3
    text_only = with_loras((lora_files["kohya-text-only"], 1.0))
    with loras.style_loras(pipe, text_only["loras"]):
        assert differ(text_features(), plain_text) > 1e-3
        assert not any(pipe.get_list_adapters().get("unet", []))
    assert torch.equal(text_features(), plain_text)
    assert differ(run(tiny_pipe, crops, settings, text_only), plain) > 1e-3


def test_two_loras_stack(lora_files, generated):
    one = generated(with_loras((lora_files["diffusers"], 1.0)))
    other = generated(with_loras((lora_files["kohya"], 1.0)))
    both = generated(with_loras((lora_files["diffusers"], 1.0), (lora_files["kohya"], 1.0)))
    assert min(differ(both, one), differ(both, other), differ(one, other)) > 1e-3


def test_the_face_adapter_stays_under_the_loras(tiny_pipe, settings, lora_files):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from idanimator.adapter import spatial_cross_attention_names

    unet = tiny_pipe.pipe.unet
    before = loras.face_adapter_state(unet)
    extras = with_loras((lora_files["diffusers"], 1.0), (lora_files["kohya"], 0.5))
    with loras.style_loras(tiny_pipe.pipe, extras["loras"]):
        processors = unet.attn_processors
        names = spatial_cross_attention_names(unet)
        assert names and all(isinstance(processors[name], IPAdapterAttnProcessor2_0) for name in names)
        attn2 = unet.get_submodule(names[0].removesuffix(".processor"))
        assert hasattr(attn2.to_k, "base_layer")  # the style LoRA sits on the face-fused weights ...
        assert loras.face_adapter_state(unet) == before  # ... which, like the face layers, are unchanged
        assert loras.adapter_weight(tiny_pipe.pipe, "style_1") == pytest.approx(0.5)


def test_the_face_check_sees_a_face_layer_taken_over(tiny_pipe):
    """diffusers' loader cannot reach the face layers (see below); the check after loading would catch it if it did."""
    from peft import LoraConfig, inject_adapter_in_model

    from idanimator.adapter import spatial_cross_attention_names

    unet = tiny_pipe.pipe.unet
    before = loras.face_adapter_state(unet)
    face_key = spatial_cross_attention_names(unet)[0] + ".to_k_ip.0"
    inject_adapter_in_model(LoraConfig(r=2, target_modules=[face_key]), unet, adapter_name="intruder")
    try:
        assert loras.face_adapter_state(unet) != before
    finally:
        loras.remove_loras(tiny_pipe.pipe, ["intruder"], {})
    assert loras.face_adapter_state(unet) == before


def test_a_lora_aimed_at_the_face_layers_is_refused_and_removed(tiny_pipe, crops, settings, lora_files, tmp_path):
    from safetensors.torch import save_file

    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.0"
    path = tmp_path / "face.safetensors"
    save_file({f"{layer}.lora.down.weight": torch.ones(2, 32), f"{layer}.lora.up.weight": torch.ones(32, 2)}, path)
    with pytest.raises(InvalidRequestError, match="does not fit this backbone"):  # after the first one loaded
        run(tiny_pipe, crops, settings, with_loras((lora_files["diffusers"], 1.0), (path, 1.0)))


def _junk(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "source, error, words",
    [
        ("missing", InvalidRequestError, "does not exist"),
        ("someone/style", WeightsUnavailableError, "not in the local Hugging Face cache"),
        ("someone/style/style.safetensors", WeightsUnavailableError, "not in the local Hugging Face cache"),
        ("sdxl", InvalidRequestError, "is an SDXL LoRA; this model is SD 1.5."),
        ("whole-model", InvalidRequestError, "is not a LoRA"),
        ("junk", InvalidRequestError, "not a readable .safetensors file"),
        ("pickle", InvalidRequestError, "is not a .safetensors file"),
    ],
)
def test_a_bad_lora_gets_one_sentence(tiny_pipe, crops, settings, tiny_kit, lora_files, tmp_path, source, error, words):
    sources = {
        "missing": tmp_path / "nowhere" / "style.safetensors",
        "sdxl": lora_files["sdxl"],
        "whole-model": tiny_kit["single_file"],
        "junk": _junk(tmp_path, "junk.safetensors", b"not a safetensors file"),
        "pickle": _junk(tmp_path, "style.ckpt", b"\x80\x04K\x01."),
    }
    with pytest.raises(error, match=words) as caught:
        run(tiny_pipe, crops, settings, with_loras((lora_files["diffusers"], 1.0), (sources.get(source, source), 1.0)))
    assert "\n" not in str(caught.value)


def test_a_hub_lora_in_the_local_cache_is_used_offline(tiny_pipe, crops, settings, lora_files, generated):
    from huggingface_hub import constants

    from idanimator.extras.lorafiles import find_lora

    repo = Path(constants.HF_HUB_CACHE) / "models--someone--tiny-style"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(lora_files["diffusers"].read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert find_lora("someone/tiny-style/pytorch_lora_weights.safetensors") == find_lora("someone/tiny-style")
    local = generated(with_loras((lora_files["diffusers"], 1.0)))
    assert torch.equal(run(tiny_pipe, crops, settings, with_loras(("someone/tiny-style", 1.0))), local)


# -- FreeInit --------------------------------------------------------------------------------------------


def test_free_init_reruns_the_loop_with_the_face_and_reports_steady_progress(tiny_pipe, crops, settings, generated):
    seen = []
    plain = generated({})
    steadied = tiny_pipe.denoise(
        crops[:1], settings.replace(free_init=True), callback=lambda s, t, _: seen.append((s, t))
    )
    assert differ(steadied.latents, plain) > 1e-3
    assert len(seen) == settings.num_inference_steps * freeinit.ITERATIONS
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[0][0] == 0
    assert {t for _, t in seen} == {settings.num_inference_steps} and seen[-1][0] == settings.num_inference_steps - 1
    other_face = tiny_pipe.denoise(crops[1:], settings.replace(free_init=True)).latents
    assert differ(other_face, steadied.latents) > 1e-3
    assert torch.equal(run(tiny_pipe, crops, settings), plain)


def test_free_init_can_be_stopped(tiny_pipe, crops, settings):
    asked = []
    with pytest.raises(GenerationCancelled):
        tiny_pipe.denoise(
            crops[:1], settings.replace(free_init=True), should_stop=lambda: asked.append(1) or len(asked) > 4
        )
    assert len(asked) == 5  # once before the run, then at every step: 2 of the first pass, 2 of the second, 1


# -- long videos -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_settings(settings):
    return settings.replace(
        num_frames=40, num_inference_steps=1
    )  # over the motion module's 32 (validate() allows 32 today)


@pytest.fixture(scope="module")
def long_video(tiny_pipe, crops, long_settings):
    """A 40-frame video's latents, and the rows (hidden states, text, face tokens) each face attention saw."""
    from idanimator.adapter import spatial_cross_attention_names

    unet = tiny_pipe.pipe.unet
    rows = []

    def record(module, args, kwargs):
        text, faces = kwargs["encoder_hidden_states"]
        rows.append((args[0].shape[0], text.shape[0], faces[0].shape[0]))

    layers = [unet.get_submodule(n.removesuffix(".processor")) for n in spatial_cross_attention_names(unet)]
    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        latents = tiny_pipe.denoise(crops[:1], long_settings).latents
    finally:
        for hook in hooks:
            hook.remove()
    return latents, rows, len(layers)


def test_a_long_video_sees_the_face_in_every_frame(tiny_pipe, crops, long_settings, long_video):
    latents, rows, layers = long_video
    assert latents.shape[2] == 40
    assert all(hidden == text == face for hidden, text, face in rows)  # split in chunks, the face rows with them
    assert (
        sum(hidden for hidden, _, _ in rows) == layers * long_settings.num_inference_steps * 2 * 40
    )  # all frames, with CFG
    other = tiny_pipe.denoise(crops[1:], long_settings).latents
    assert differ(other[:, :, 32:], latents[:, :, 32:]) > 1e-3


def test_long_videos_split_inference_computes_what_one_batch_does(
    tiny_pipe, crops, long_settings, long_video, monkeypatch
):
    monkeypatch.setattr(longvideo, "TEMPORAL_SPLIT", 10**6)
    monkeypatch.setattr(longvideo, "SPATIAL_SPLIT", 10**6)
    whole = tiny_pipe.denoise(crops[:1], long_settings).latents
    torch.testing.assert_close(long_video[0], whole, atol=1e-4, rtol=1e-4)


def test_free_noise_windows_only_the_temporal_blocks_and_comes_off(tiny_pipe, long_settings):
    from diffusers.models.attention import FreeNoiseTransformerBlock

    from idanimator.models import PerFrameGroupNorm

    unet = tiny_pipe.pipe.unet
    norms = [name for name, m in unet.named_modules() if type(m) is PerFrameGroupNorm]
    with longvideo.long_video(tiny_pipe.pipe, long_settings.num_frames):
        assert [name for name, m in unet.named_modules() if type(m) is PerFrameGroupNorm] == norms
        assert any(isinstance(m, FreeNoiseTransformerBlock) for m in unet.modules())
        assert any(isinstance(m, longvideo.FaceSplitInference) for m in unet.modules())
    with longvideo.long_video(tiny_pipe.pipe, 32):
        assert not tiny_pipe.pipe.free_noise_enabled  # up to the window: nothing to do


def test_a_long_video_decodes_a_chunk_at_a_time(tiny_pipe, crops, settings):
    latents = tiny_pipe.denoise(crops[:1], settings.replace(num_frames=12)).latents
    chunks = list(longvideo.decode_in_chunks(tiny_pipe, latents, chunk=5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    whole = tiny_pipe.decode(latents)
    torch.testing.assert_close(torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(whole))


def test_the_time_estimate_counts_steps_guidance_passes_pixels_and_windows():
    base = GenerationRequest(prompt="x", num_frames=16, num_inference_steps=10, guidance_scale=8, height=512, width=512)
    one = longvideo.estimate_seconds(base, 0.5)
    assert one == pytest.approx(0.5 * 10 * 2 * 16)
    assert longvideo.estimate_seconds(base.replace(guidance_scale=1), 0.5) == pytest.approx(one / 2)
    assert longvideo.estimate_seconds(base.replace(free_init=True), 0.5) == pytest.approx(one * 3)
    assert longvideo.estimate_seconds(base.replace(height=256), 0.5) == pytest.approx(one / 2)
    long = longvideo.estimate_seconds(base.replace(num_frames=128), 0.5)
    windows = len(range(0, 128 - 16 + 1, 4))  # 29 windows of 16 frames: most frames are in 4 of them
    assert long == pytest.approx(one / 16 * (128 * 0.9 + windows * 16 * 0.1))
