"""Exporting a diffusers SD1.5 folder as an original-layout single file, and loading it back offline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from idanimator.errors import CheckpointError
from idanimator.tiny.single_file import convert_unet_to_ldm, convert_vae_to_ldm, export_single_file

COMPONENTS = ("unet", "vae", "text_encoder")


def _from_single_file(path, base):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(base), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


@pytest.fixture(scope="module")
def original(tiny_kit):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_kit["base"]), local_files_only=True)
    return {name: getattr(pipe, name).state_dict() for name in COMPONENTS}


def _assert_components(pipe, expected):
    for name in COMPONENTS:
        loaded = getattr(pipe, name).state_dict()
        assert loaded.keys() == expected[name].keys(), name
        differ = [k for k, v in expected[name].items() if not torch.equal(loaded[k], v)]
        assert not differ, f"{name}: {differ[:5]}"


def test_round_trip_is_exact(tiny_kit, original, tmp_path):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path = export_single_file(tiny_kit["base"], tmp_path / "nested" / "tiny.safetensors")
    assert path == tmp_path / "nested" / "tiny.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temporary file left behind

    checkpoint = load_file(str(path))
    assert {k.split(".")[0] for k in checkpoint} == {"model", "first_stage_model", "cond_stage_model"}
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in checkpoint
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    _assert_components(_from_single_file(path, tiny_kit["base"]), original)


def test_weights_come_from_the_file(tiny_kit, original, tmp_path):
    """from_single_file falls back to the config folder for a component it does not recognise, and leaves
    unmapped parameters as they were, so shift every weight in the file and check that all of it shows."""
    path = export_single_file(tiny_kit["base"], tmp_path / "tiny.safetensors")
    shifted = tmp_path / "shifted.safetensors"
    save_file({k: v + 1 for k, v in load_file(str(path)).items()}, str(shifted))

    pipe = _from_single_file(shifted, tiny_kit["base"])
    params = {name: {n for n, _ in getattr(pipe, name).named_parameters()} for name in COMPONENTS}
    expected = {
        name: {k: v + 1 if k in params[name] else v for k, v in state.items()} for name, state in original.items()
    }
    _assert_components(pipe, expected)


def _sd15_shaped():
    """Narrow models with SD1.5's block structure (4 UNet levels, 2 layers each, cross-attention in
    the first three down blocks and the last three up blocks; the SD VAE's 4 levels of 2 layers)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=4,
    )
    return unet, vae


def test_sd15_layout_matches_diffusers_conversion():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae = _sd15_shaped()
    unet_state, vae_state = unet.state_dict(), vae.state_dict()

    ldm_unet = convert_unet_to_ldm(unet_state, dict(unet.config))
    # Landmarks of the SD1.5 original layout.
    for key in (
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.9.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.0.skip_connection.weight",
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
    ):
        assert key in ldm_unet, key
    assert not any(k.startswith(("input_blocks.12", "output_blocks.12", "output_blocks.11.2")) for k in ldm_unet)

    ldm_vae = convert_vae_to_ldm(vae_state, dict(vae.config))
    for key in (
        "encoder.down.2.block.1.conv2.weight",
        "encoder.down.2.downsample.conv.weight",
        "decoder.up.3.block.2.norm1.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.mid.attn_1.proj_out.weight",
    ):
        assert key in ldm_vae, key

    # diffusers' own LDM -> diffusers conversion undoes ours exactly.
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm_unet.items()}, unet.config)
    assert back.keys() == unet_state.keys()
    assert all(torch.equal(back[k], v) for k, v in unet_state.items())
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm_vae.items()}, vae.config)
    assert back.keys() == vae_state.keys()
    assert all(torch.equal(back[k], v) for k, v in vae_state.items())


def test_unknown_weights_are_refused():
    unet, _ = _sd15_shaped()
    state = dict(unet.state_dict())
    state["add_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="add_embedding"):
        convert_unet_to_ldm(state, dict(unet.config))
