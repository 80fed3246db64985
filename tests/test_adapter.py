"""The face adapter: the official checkpoint layouts, strict loading, and equivalence with the release's math."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from idanimator.adapter import (
    FaceAdapterWeights,
    build_resampler,
    checkpoint_index,
    face_adapter_layers,
    install_face_adapter,
    load_face_adapter_weights,
    resampler_from_diffusers,
    resampler_to_diffusers,
    save_face_adapter_weights,
    spatial_cross_attention_names,
)
from idanimator.errors import CheckpointError
from idanimator.models import PerFrameGroupNorm, use_per_frame_motion_norms


@pytest.fixture(scope="module")
def official(tiny_kit) -> FaceAdapterWeights:
    return load_face_adapter_weights(tiny_kit["face_adapter"])


def fresh_motion_unet(tiny_kit) -> UNetMotionModel:
    unet2d = UNet2DConditionModel.from_pretrained(tiny_kit["base"], subfolder="unet")
    return UNetMotionModel.from_unet2d(unet2d, MotionAdapter.from_pretrained(tiny_kit["motion_adapter"]))


def test_official_layout_a_is_what_the_kit_writes(tiny_kit):
    raw = torch.load(tiny_kit["face_adapter"], weights_only=True)
    assert set(raw) == {"image_proj", "face_adapter"}
    assert "1.to_q_lora.down.weight" in raw["face_adapter"]
    assert "layers.0.0.to_kv.weight" in raw["image_proj"]


def test_layout_b_with_ddp_prefix_loads_the_same_tensors(official, tmp_path):
    state = {f"module.image_proj_model.{k}": v for k, v in official.image_proj.items()}
    state.update({f"module.adapter_modules.{k}": v for k, v in official.face_adapter.items()})
    torch.save({"state_dict": state}, tmp_path / "b.ckpt")
    loaded = load_face_adapter_weights(tmp_path / "b.ckpt")
    for mine, theirs in ((loaded.image_proj, official.image_proj), (loaded.face_adapter, official.face_adapter)):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_layout_b_without_prefix_loads(official, tmp_path):
    state = {f"image_proj_model.{k}": v for k, v in official.image_proj.items()}
    state.update({f"adapter_modules.{k}": v for k, v in official.face_adapter.items()})
    torch.save({"state_dict": state}, tmp_path / "b.ckpt")
    assert load_face_adapter_weights(tmp_path / "b.ckpt").num_parameters() == official.num_parameters()


def test_missing_tensor_is_named(official, tmp_path):
    face = dict(official.face_adapter)
    del face["3.to_v_face.weight"]
    torch.save({"image_proj": official.image_proj, "face_adapter": face}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"3\.to_v_face\.weight"):
        load_face_adapter_weights(tmp_path / "m.ckpt")


def test_missing_resampler_tensor_is_named(official, tiny_kit, tmp_path):
    proj = dict(official.image_proj)
    del proj["norm_out.weight"]
    torch.save({"image_proj": proj, "face_adapter": official.face_adapter}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="Missing tensor 'image_proj.norm_out.weight'"):
        load_face_adapter_weights(tmp_path / "m.ckpt")
    proj = dict(official.image_proj)
    del proj["layers.1.0.norm1.weight"]  # found when the resampler is built
    torch.save({"image_proj": proj, "face_adapter": official.face_adapter}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="layers.1.ln0.weight"):
        install_face_adapter(fresh_motion_unet(tiny_kit), load_face_adapter_weights(tmp_path / "m.ckpt"))


def test_extra_tensor_is_named(official, tmp_path):
    face = dict(official.face_adapter, **{"1.to_q_face.weight": torch.zeros(2, 2)})
    torch.save({"image_proj": official.image_proj, "face_adapter": face}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"1\.to_q_face\.weight"):
        load_face_adapter_weights(tmp_path / "x.ckpt")


def test_extra_top_level_key_is_named(official, tmp_path):
    state = {f"image_proj_model.{k}": v for k, v in official.image_proj.items()}
    state["text_encoder.bias"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="text_encoder.bias"):
        load_face_adapter_weights(tmp_path / "x.ckpt")


def test_adapter_for_another_unet_is_refused(official, tiny_kit):
    face = dict(official.face_adapter)
    face.update({k.replace("1.", "99.", 1): v for k, v in official.face_adapter.items() if k.startswith("1.")})
    with pytest.raises(CheckpointError, match="does not fit"):
        install_face_adapter(fresh_motion_unet(tiny_kit), FaceAdapterWeights(official.image_proj, face))


def test_the_checkpoint_numbers_cross_attentions_1_3_5_in_the_unets_order(official, tiny_kit):
    unet = fresh_motion_unet(tiny_kit)
    names = spatial_cross_attention_names(unet)
    assert [checkpoint_index(j) for j in range(3)] == [1, 3, 5]
    layers = face_adapter_layers(unet, official)
    assert list(layers) == list(range(1, 2 * len(names), 2))
    assert list(layers.values()) == names


def test_an_adapter_missing_a_layer_names_it(official, tiny_kit):
    face = {k: v for k, v in official.face_adapter.items() if not k.startswith("3.")}
    with pytest.raises(CheckpointError, match="layer 3 is missing"):
        face_adapter_layers(fresh_motion_unet(tiny_kit), FaceAdapterWeights(official.image_proj, face))


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"image_proj": _Exploit(), "face_adapter": {}}, f)
    with pytest.raises(CheckpointError, match="unsafe"):
        load_face_adapter_weights(path)
    assert "must never run" not in capsys.readouterr().out


def test_truncated_checkpoint_is_reported(tiny_kit, tmp_path):
    data = tiny_kit["face_adapter"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_face_adapter_weights(tmp_path / "cut.ckpt")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, this is a text file\n", "is not a PyTorch checkpoint"),
        (bytes(range(256)) * 20, "is not a PyTorch checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints_are_one_sentence_naming_the_file(tmp_path, content, message):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_face_adapter_weights(path)
    assert "junk.ckpt" in str(caught.value) and "code" not in str(caught.value)


def test_an_adapter_without_face_attention_is_incomplete(official, tmp_path):
    torch.save({"image_proj": official.image_proj, "face_adapter": {}}, tmp_path / "half.ckpt")
    with pytest.raises(CheckpointError, match="no face attention tensors"):
        load_face_adapter_weights(tmp_path / "half.ckpt")
    torch.save(
        {"image_proj": {"latents": official.image_proj["latents"]}, "face_adapter": official.face_adapter},
        tmp_path / "resampler.ckpt",
    )
    with pytest.raises(CheckpointError, match="Missing tensor 'image_proj.proj_in.weight'"):
        load_face_adapter_weights(tmp_path / "resampler.ckpt")


def test_convert_and_generate_report_a_junk_adapter_in_one_line(tmp_path, astronaut_path, capsys):
    from idanimator.cli import main

    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    for argv in (
        ["convert-checkpoint", str(junk), str(tmp_path / "out.safetensors")],
        [
            "generate",
            "--tiny",
            "--adapter",
            str(junk),
            "--face",
            str(astronaut_path),
            "--prompt",
            "a person",
            "--frames",
            "2",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            str(tmp_path / "o.gif"),
        ],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {junk} is not a PyTorch checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_safetensors_round_trip(official, tmp_path):
    path = save_face_adapter_weights(official, tmp_path / "adapter.safetensors")
    again = load_face_adapter_weights(path)
    assert all(torch.equal(again.face_adapter[k], v) for k, v in official.face_adapter.items())
    assert all(torch.equal(again.image_proj[k], v) for k, v in official.image_proj.items())


def test_resampler_key_mapping_round_trips(official):
    assert resampler_from_diffusers(resampler_to_diffusers(official.image_proj)).keys() == official.image_proj.keys()


def test_cross_attention_order_is_down_up_mid_and_skips_motion_modules(tiny_kit):
    unet = fresh_motion_unet(tiny_kit)
    names = spatial_cross_attention_names(unet)
    assert names[0].startswith("down_blocks.0.attentions.0.")
    assert names[-1].startswith("mid_block.attentions.0.")
    assert any(n.startswith("up_blocks.") for n in names)
    assert not any("motion_modules" in n for n in names)
    assert any("motion_modules" in n and n.endswith("attn2.processor") for n in unet.attn_processors)


def test_every_tensor_is_applied_and_motion_modules_untouched(official, tiny_kit):
    unet = fresh_motion_unet(tiny_kit)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    used = install_face_adapter(unet, official)
    assert used == len(official.image_proj) + len(official.face_adapter)
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the LoRA was not fused"
    assert all(".attn2.to_" in k and "motion_modules" not in k for k in changed)
    assert not any(k.endswith("bias") for k in changed)
    assert all(
        torch.equal(unet.attn_processors[name].to_k_ip[0].weight, official.face_adapter[f"{index}.to_k_face.weight"])
        for index, name in face_adapter_layers(unet).items()
    )


def test_installing_twice_is_refused(official, tiny_kit):
    unet = fresh_motion_unet(tiny_kit)
    install_face_adapter(unet, official)
    with pytest.raises(CheckpointError, match="already"):
        install_face_adapter(unet, official)


# -- equivalence with the release's modules, re-derived from its published math ------------------


def release_resampler(x: torch.Tensor, sd: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """The release's Perceiver resampler written out with plain tensor ops on its own keys."""
    ln = torch.nn.functional.layer_norm
    latents = sd["latents"].expand(x.shape[0], -1, -1)
    x = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        dim = latents.shape[-1]
        xn = ln(x, (dim,), sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        lat = ln(latents, (dim,), sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = lat @ sd[p + "0.to_q.weight"].T
        k, v = (torch.cat([xn, lat], dim=1) @ sd[p + "0.to_kv.weight"].T).chunk(2, dim=-1)

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1)
        out = (weight @ v).transpose(1, 2).reshape(latents.shape)
        latents = out @ sd[p + "0.to_out.weight"].T + latents
        h = ln(latents, (dim,), sd[p + "1.0.weight"], sd[p + "1.0.bias"]) @ sd[p + "1.1.weight"].T
        latents = torch.nn.functional.gelu(h) @ sd[p + "1.3.weight"].T + latents
    out = latents @ sd["proj_out.weight"].T + sd["proj_out.bias"]
    return ln(out, (out.shape[-1],), sd["norm_out.weight"], sd["norm_out.bias"])


def test_resampler_matches_the_release(official):
    x = torch.randn(2, 50, official.image_proj["proj_in.weight"].shape[1])
    heads = official.image_proj["layers.0.0.to_q.weight"].shape[0] // 64
    with torch.no_grad():
        ours = build_resampler(official.image_proj)(x)
        theirs = release_resampler(x, official.image_proj, heads)
    assert ours.shape == (2, official.num_tokens, official.image_proj["proj_out.weight"].shape[0])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def release_lora_face_attention(attn, sd, index, hidden, text_len, scale):
    """The release's LoRAFaceAttnProcessor: LoRA on q/k/v/out, text attention + scale * face attention."""

    def lora(name, t):
        return t @ sd[f"{index}.{name}.down.weight"].T @ sd[f"{index}.{name}.up.weight"].T

    text, face = hidden[:, :text_len], hidden[:, text_len:]

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    def attend(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    def forward(x):
        q = attn.to_q(x) + lora("to_q_lora", x)
        k = attn.to_k(text) + lora("to_k_lora", text)
        v = attn.to_v(text) + lora("to_v_lora", text)
        out = attend(q, k, v)
        out = out + scale * attend(
            q, face @ sd[f"{index}.to_k_face.weight"].T, face @ sd[f"{index}.to_v_face.weight"].T
        )
        return attn.to_out[0](out) + lora("to_out_lora", out)

    return forward


def release_face_layers(tiny_kit) -> dict[int, str]:
    """The release's numbering of its face processors: the position in its UNet's `attn_processors` (SD1.5
    layout: attn1/attn2 alternating, down blocks, up blocks, then the mid block; motion modules not counted).
    A plain 2-D UNet of the kit has exactly that processor list."""
    unet2d = UNet2DConditionModel.from_pretrained(tiny_kit["base"], subfolder="unet")
    return {
        i: n.removesuffix(".processor")
        for i, n in enumerate(unet2d.attn_processors)
        if not n.endswith("attn1.processor")
    }


def test_fused_lora_and_face_attention_match_the_release(official, tiny_kit):
    layers = release_face_layers(tiny_kit)
    assert sorted(layers) == sorted({int(k.split(".")[0]) for k in official.face_adapter})
    assert all(name.endswith("attn2") for name in layers.values())
    reference = fresh_motion_unet(tiny_kit)
    unet = fresh_motion_unet(tiny_kit)
    install_face_adapter(unet, official, scale=0.7)
    generator = torch.Generator().manual_seed(0)
    for index, name in layers.items():
        attn_ref = reference.get_submodule(name)
        attn = unet.get_submodule(name)
        x = torch.randn(2, 16, attn.to_q.in_features, generator=generator)
        text = torch.randn(2, 7, attn.to_k.in_features, generator=generator)
        face = torch.randn(2, official.num_tokens, attn.to_k.in_features, generator=generator)
        with torch.no_grad():
            ours = attn(x, encoder_hidden_states=(text, [face]))
            theirs = release_lora_face_attention(
                attn_ref, official.face_adapter, index, torch.cat([text, face], 1), 7, 0.7
            )(x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=lambda m, n=name, i=index: f"{n} ({i}): {m}")


def test_id_scale_reaches_every_face_attention_and_nothing_else(tiny_pipe):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = tiny_pipe.pipe.unet
    tiny_pipe.pipe.set_ip_adapter_scale(0.25)  # what denoise() calls with the request's ID scale
    face = set(spatial_cross_attention_names(unet))
    for name, processor in unet.attn_processors.items():
        if name in face:
            assert processor.scale == [0.25]
        else:
            assert not isinstance(processor, IPAdapterAttnProcessor2_0), name


def test_motion_norms_run_per_frame(tiny_kit):
    unet = fresh_motion_unet(tiny_kit)
    count = use_per_frame_motion_norms(unet)
    assert count == sum(1 for m in unet.modules() if isinstance(m, PerFrameGroupNorm)) > 0
    norm = next(m for m in unet.modules() if isinstance(m, PerFrameGroupNorm))
    x = torch.randn(1, norm.num_channels, 4, 3, 3)
    y = norm(x)
    # Each frame is normalised alone: changing frame 3 leaves frame 0 unchanged.
    x2 = x.clone()
    x2[:, :, 3] *= 10
    torch.testing.assert_close(norm(x2)[:, :, 0], y[:, :, 0])
    per_frame = torch.nn.functional.group_norm(x[:, :, 1], norm.num_groups, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y[:, :, 1], per_frame)
