"""The fast mode (AnimateLCM) on the tiny kit: its motion weights, LoRA and LCM scheduler for one call, then the
cached pipeline computing exactly what it did; the face still decides the video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idanimator.errors import CheckpointError, GenerationCancelled, InvalidRequestError, WeightsUnavailableError
from idanimator.extras import fast
from idanimator.pipeline import IDAnimatorPipeline

SETTINGS = dict(num_frames=4, num_inference_steps=2, height=64, width=64, seed=7)
FAST = {"fast": True}


@pytest.fixture(scope="module")
def fast_kit(tiny_kit):
    from idanimator.tiny.fast_kit import build_fast_kit

    return build_fast_kit(kit=tiny_kit)


def with_fast_weights(pipeline, source) -> IDAnimatorPipeline:
    """A pipeline on ``pipeline``'s modules whose fast mode takes AnimateLCM from ``source``."""
    return IDAnimatorPipeline(
        pipeline.pipe,
        dtype=pipeline.dtype,
        detector=pipeline.detector,
        face_cache=pipeline.face_cache,
        fast_weights=fast.AnimateLCMWeights(source),
    )


@pytest.fixture(scope="module")
def pipe(tiny_pipe, fast_kit):
    """The session's tiny pipeline's modules, with the tiny AnimateLCM; its LoRA is taken off after."""
    yield with_fast_weights(tiny_pipe, fast_kit["folder"])
    fast.remove_lcm_lora(tiny_pipe.pipe.unet)


@pytest.fixture(scope="module")
def crops(tiny_pipe, astronaut_path, second_face):
    return tiny_pipe.prepare_faces([astronaut_path, second_face])


def generate(pipe, crops, **overrides) -> np.ndarray:
    return pipe(crops[:1], "a man walking on the moon", **{**SETTINGS, **overrides}, output_type="np").frames[0]


def base_tensors(unet) -> dict[str, torch.Tensor]:
    """The UNet's own tensors, by name, whether or not PEFT layers wrap them."""
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def snapshot(pipe) -> dict:
    unet = pipe.pipe.unet
    return {
        "scheduler": pipe.pipe.scheduler,
        "tensors": {k: (v.data_ptr(), v.clone()) for k, v in base_tensors(unet).items()},
        "processors": dict(unet.attn_processors),
        "active": fast.active_adapters(unet),
    }


def assert_unchanged(pipe, before: dict) -> None:
    """The same scheduler, processors and active adapters, and every tensor the same object with the same value."""
    after = snapshot(pipe)
    assert after["scheduler"] is before["scheduler"]
    assert after["processors"] == before["processors"]
    assert after["active"] == before["active"] and fast.ADAPTER not in after["active"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (pointer, value) in before["tensors"].items():
        assert after["tensors"][name][0] == pointer, name
        assert torch.equal(after["tensors"][name][1], value), name


def test_fast_mode_runs_lcm_with_animatelcm_motion_and_lora_and_changes_the_video(pipe, crops):
    weights = pipe.fast_weights.get()
    name = "mid_block.motion_modules.0.proj_out.weight"
    seen = []

    def inside(step, total, latents):
        unet = pipe.pipe.unet
        lora = [m for m in unet.modules() if hasattr(m, "lora_A") and fast.ADAPTER in m.lora_A]
        seen.append(
            (
                type(pipe.pipe.scheduler).__name__,
                len(lora),
                all(m.active_adapters == [fast.ADAPTER] for m in lora),
                torch.equal(unet.get_parameter(name), weights.motion[name]),
            )
        )

    plain = generate(pipe, crops)
    quick = generate(pipe, crops, **FAST, callback=inside)
    assert seen == [("LCMScheduler", weights.lora_layers, True, True)] * SETTINGS["num_inference_steps"]
    assert weights.lora_layers == 72  # every attention layer of the kit's 6 transformer blocks, attn2's included
    assert np.abs(plain - quick).max() > 1e-2
    assert np.array_equal(quick, generate(pipe, crops, **FAST))  # reproducible


@pytest.mark.parametrize("part", ["motion_weights", "lcm_lora", "lcm_scheduler"])
def test_each_part_of_the_fast_mode_changes_the_video(pipe, crops, part, monkeypatch):
    """A fast request with one part left out gives another video than the whole fast mode."""
    from contextlib import nullcontext

    whole = generate(pipe, crops, **FAST)
    monkeypatch.setattr(fast, part, lambda *args: nullcontext())
    assert np.abs(whole - generate(pipe, crops, **FAST)).max() > 1e-3


def test_the_pipeline_computes_bit_for_bit_the_same_after_a_fast_request(pipe, crops):
    fast.remove_lcm_lora(pipe.pipe.unet)
    modules = [type(m) for m in pipe.pipe.unet.modules()]
    before, plain = snapshot(pipe), generate(pipe, crops)
    generate(pipe, crops, **FAST)
    assert np.array_equal(plain, generate(pipe, crops))
    assert_unchanged(pipe, before)
    # The LoRA stays loaded (inactive) for the next fast request; taking it off gives back the UNet's own layers.
    kept = {id(m.lora_A[fast.ADAPTER].weight) for m in pipe.pipe.unet.modules() if hasattr(m, "lora_A")}
    generate(pipe, crops, **FAST)
    assert kept == {id(m.lora_A[fast.ADAPTER].weight) for m in pipe.pipe.unet.modules() if hasattr(m, "lora_A")}
    fast.remove_lcm_lora(pipe.pipe.unet)
    assert [type(m) for m in pipe.pipe.unet.modules()] == modules
    assert getattr(pipe.pipe.unet, "peft_config", None) is None
    assert np.array_equal(plain, generate(pipe, crops))


def test_a_fast_request_that_is_stopped_leaves_the_pipeline_as_it_was(pipe, crops):
    generate(pipe, crops, **FAST)  # the LoRA is loaded: what stays is compared
    before, plain = snapshot(pipe), generate(pipe, crops)
    steps = []
    with pytest.raises(GenerationCancelled):
        generate(pipe, crops, **FAST, callback=lambda *a: steps.append(a[0]), should_stop=lambda: bool(steps))
    assert steps == [0]
    assert_unchanged(pipe, before)
    assert np.array_equal(plain, generate(pipe, crops))


def test_the_face_still_decides_the_video_in_fast_mode(pipe, crops):
    one = generate(pipe, crops[:1], **FAST)
    other = generate(pipe, crops[1:], **FAST)
    assert np.abs(one - other).max() > 1e-3
    assert np.abs(one - generate(pipe, crops[:1], id_scale=0.0, **FAST)).max() > 1e-3


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on a second adapter
def test_a_style_lora_keeps_its_weight_beside_the_fast_lora_and_leaving_never_turns_the_fast_one_on(
    pipe, crops, fast_kit
):
    """As the style LoRAs' step does: its own adapter at its own weight, taken off after its request."""
    unet = pipe.pipe.unet
    quick, plain = generate(pipe, crops, **FAST), generate(pipe, crops)
    pipe.pipe.load_lora_weights(str(fast_kit["lora"]), adapter_name="style")
    pipe.pipe.set_adapters(["style"], [0.5])
    styled = generate(pipe, crops)
    scales = {id(m): m.scaling["style"] for m in unet.modules() if hasattr(m, "scaling")}
    inside = []
    generate(pipe, crops, **FAST, callback=lambda *a: inside.append(fast.active_adapters(unet)))
    assert inside[0] == ["style", fast.ADAPTER]
    assert fast.active_adapters(unet) == ["style"]
    assert scales == {id(m): m.scaling["style"] for m in unet.modules() if hasattr(m, "scaling")}
    assert np.array_equal(styled, generate(pipe, crops))
    # Deleting the active adapter makes PEFT activate another one: ours, here. The next request turns it off.
    with pytest.warns(UserWarning, match=f"Setting active adapter to {fast.ADAPTER}"):
        pipe.pipe.delete_adapters("style")
    assert np.array_equal(plain, generate(pipe, crops))
    # Another step unloading every LoRA takes ours too: the next fast request loads it again.
    pipe.pipe.unload_lora_weights()
    assert np.array_equal(quick, generate(pipe, crops, **FAST))


@pytest.mark.filterwarnings("ignore:Adapter style_0 was active")  # PEFT, as the style step deletes its adapter
def test_fast_mode_with_a_style_lora_applies_both_and_leaves_both_off(pipe, crops, tiny_kit, tmp_path):
    """Through the request path, with the style LoRAs' own step."""
    from idanimator.request import LoraSpec
    from idanimator.tiny.lora_kit import save_tiny_lora

    style = (LoraSpec(str(save_tiny_lora(tiny_kit["base"], tmp_path / "style.safetensors")), 0.7),)
    plain, quick = generate(pipe, crops), generate(pipe, crops, **FAST)
    both = generate(pipe, crops, fast=True, loras=style)
    assert np.abs(both - quick).max() > 1e-3
    generate(pipe, crops, loras=style)
    assert fast.active_adapters(pipe.pipe.unet) == []
    assert np.array_equal(plain, generate(pipe, crops))
    assert np.array_equal(quick, generate(pipe, crops, **FAST))


def test_model_offload_gives_the_same_fast_video_and_stays_as_it_was(pipe, crops, monkeypatch):
    """Loading a LoRA takes diffusers' offload hooks off and puts them back with diffusers' default device, which
    on a machine without an accelerator is the CPU, which it refuses: the CPU is named as a device here."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    from idanimator.pipeline import IDAnimatorPipeline

    monkeypatch.setattr(pipeline_utils, "get_device", lambda: torch.device("cpu"))
    offloaded = IDAnimatorPipeline.from_pretrained(
        tiny=True, device="cpu", detector=pipe.detector, fast_weights=pipe.fast_weights.source
    )
    offloaded.pipe.enable_model_cpu_offload(device="cpu")
    plain = generate(offloaded, crops)
    assert np.array_equal(generate(offloaded, crops, **FAST), generate(pipe, crops, **FAST))
    assert np.array_equal(plain, generate(offloaded, crops))
    assert np.array_equal(plain, generate(pipe, crops))


def test_under_sequential_offload_the_motion_swap_goes_through_accelerates_store(pipe, crops):
    """Sequential offload keeps the weights in accelerate's CPU store and leaves the modules empty; diffusers will
    not offload onto the CPU, so the UNet is offloaded with accelerate's ``cpu_offload``, as that method does."""
    from accelerate import cpu_offload

    from idanimator.pipeline import IDAnimatorPipeline

    weights = pipe.fast_weights.get()
    with fast.motion_weights(pipe.pipe.unet, weights):
        expected = generate(pipe, crops)
    offloaded = IDAnimatorPipeline.from_pretrained(tiny=True, device="cpu", detector=pipe.detector)
    cpu_offload(offloaded.pipe.unet, execution_device=torch.device("cpu"))
    assert fast._offloaded_store(offloaded.pipe.unet) is not None
    plain = generate(offloaded, crops)
    with fast.motion_weights(offloaded.pipe.unet, weights):
        assert np.array_equal(expected, generate(offloaded, crops))
    assert np.array_equal(plain, generate(offloaded, crops))
    assert np.abs(plain - expected).max() > 1e-3


def test_missing_animatelcm_weights_are_one_sentence_and_change_nothing(pipe, crops, fast_kit, tmp_path):
    """The test session is offline with an empty Hugging Face cache."""
    before = snapshot(pipe)
    empty = tmp_path / "animatelcm"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    cases = [(None, "not downloaded"), (tmp_path / "nowhere", "does not exist"), (empty, fast.LORA_FILE)]
    for where, words in cases:
        with pytest.raises(WeightsUnavailableError) as error:
            generate(with_fast_weights(pipe, where), crops, **FAST)
        message = str(error.value)
        assert words in message and "AnimateLCM" in message
        assert message.endswith(".") and "\n" not in message and ". " not in message
    assert_unchanged(pipe, before)


def test_a_motion_module_that_does_not_fit_is_refused_and_changes_nothing(pipe, crops, fast_kit, tmp_path):
    import shutil

    from diffusers import MotionAdapter

    other = tmp_path / "other"
    config = {**MotionAdapter.load_config(fast_kit["folder"]), "motion_max_seq_length": 24}
    MotionAdapter.from_config(config).save_pretrained(other)
    shutil.copy(fast_kit["lora"], other / fast.LORA_FILE)
    before = snapshot(pipe)
    with pytest.raises(CheckpointError, match=r"does not fit this model's motion modules \(.*pos_embed"):
        generate(with_fast_weights(pipe, other), crops, **FAST)
    assert_unchanged(pipe, before)


def test_more_steps_than_lcm_can_take_are_refused(pipe, crops):
    with pytest.raises(InvalidRequestError, match="at most 50 steps"):
        generate(pipe, crops, num_inference_steps=51, **FAST)


def test_the_tiny_animatelcm_has_the_real_layouts(fast_kit, tiny_kit):
    from diffusers import MotionAdapter
    from safetensors.torch import load_file

    lora = load_file(fast_kit["lora"])
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora
    )
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in lora
    ours = MotionAdapter.from_pretrained(fast_kit["folder"])
    standard = MotionAdapter.from_pretrained(tiny_kit["motion_adapter"])
    assert ours.config == {**standard.config, "_name_or_path": ours.config["_name_or_path"]}
    mine, theirs = ours.state_dict(), standard.state_dict()
    assert mine.keys() == theirs.keys()
    name = "mid_block.motion_modules.0.proj_out.weight"
    assert not torch.equal(mine[name], theirs[name])
    weights = fast.AnimateLCMWeights(fast_kit["folder"])
    assert weights.get() is weights.get()  # loaded once, kept by its owner (a service or a pipeline)
    weights.clear()
    assert weights._loaded is None
