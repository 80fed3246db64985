"""Style LoRAs on the backbone for one call, stacked on the face adapter and taken off again after it.

Each LoRA loads as its own PEFT adapter through diffusers (``lora_state_dict``, then ``load_lora_into_unet``;
kohya/A1111 and diffusers layouts alike) and the request's weights are set with ``set_adapters``. The face
adapter is untouched: its LoRA is fused into attn2's weights, which PEFT wraps but never changes, and its face
key/value layers live in the attention processors, which LoRA loading leaves in place (checked after loading).
Adapters other options loaded keep their weights. On exit our adapters are deleted, and when none is left
the PEFT wrappers are removed too, so the UNet and text encoder are the same modules as before.

The text encoder's part goes through PEFT directly, as diffusers' own text-encoder loader did before it
delegated to transformers' ``load_adapter``: transformers 5 refuses peft 0.21 there (it wants 0.22, which is
not released), so that path cannot load a text-encoder LoRA at all here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from ..adapter import spatial_cross_attention_names
from ..errors import InvalidRequestError
from .lorafiles import check_lora_file, find_lora

ADAPTER_PREFIX = "style"  # adapters are named style_0, style_1, ... (another name if taken)
_TEXT_PREFIX = "text_encoder."


@contextmanager
def style_loras(pipe, loras) -> Iterator[None]:
    """The style LoRAs (LoraSpecs) on ``pipe`` (the AnimateDiff pipeline) as PEFT adapters for the call, beside
    any adapter already active; removed after, error or not."""
    if not loras:
        yield
        return
    width = pipe.unet.config.cross_attention_dim
    files = [find_lora(spec.source) for spec in loras]  # every file is found and checked before loading
    for spec, path in zip(loras, files, strict=True):
        check_lora_file(path, spec.source, width)
    others = {name: adapter_weight(pipe, name) for name in pipe.get_active_adapters()}
    face = face_adapter_state(pipe.unet)
    names: list[str] = []
    try:
        for spec, path in zip(loras, files, strict=True):
            names.append(_free_name(pipe))
            load_lora(pipe, path, names[-1], spec.source)
        pipe.set_adapters([*others, *names], [*others.values(), *(spec.weight for spec in loras)])
        if face_adapter_state(pipe.unet) != face:
            raise InvalidRequestError("A LoRA changed the face adapter's layers; it cannot be used with ID-Animator.")
        yield
    finally:
        remove_loras(pipe, names, others)


def load_lora(pipe, path, name: str, source: str) -> None:
    """Load one LoRA file as adapter ``name`` on the pipeline's UNet and text encoder."""
    try:
        with warnings.catch_warnings():  # PEFT warns at every adapter after the first that there are others
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            layers = _load(pipe, path, name, source)
    except InvalidRequestError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # PEFT and diffusers reject misfits like this
        raise InvalidRequestError(f"The LoRA {source} does not fit this backbone ({str(exc)[:160]}).") from exc
    if not layers:
        raise InvalidRequestError(f"The LoRA {source} matches none of this backbone's layers; use an SD 1.5 LoRA.")


def _load(pipe, path, name: str, source: str) -> int:
    state, alphas, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True)
    if not all("lora" in key for key in state):
        raise InvalidRequestError(f"{source} is not a LoRA: some of its tensors are not LoRA weights.")
    if any(key.startswith("unet.") for key in state):
        pipe.load_lora_into_unet(
            state,
            network_alphas=alphas,
            unet=pipe.unet,
            adapter_name=name,
            metadata=metadata,
            _pipeline=pipe,
            low_cpu_mem_usage=False,
        )
    return _count_layers(pipe.unet, name) + _load_into_text_encoder(pipe.text_encoder, state, alphas, name)


def _load_into_text_encoder(text_encoder, state: dict, alphas: dict | None, name: str) -> int:
    """The text encoder's part of a LoRA (keys ``text_encoder.*``) as adapter ``name``; how many layers took it.

    Mirrors diffusers' ``_load_lora_into_text_encoder`` up to its ``load_adapter`` call, which is replaced by
    what that call does (inject the layers, load their weights, record the config the way transformers does,
    so diffusers' ``set_adapters`` and ``delete_adapters`` treat it like any other adapter).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    part = {key.removeprefix(_TEXT_PREFIX): value for key, value in state.items() if key.startswith(_TEXT_PREFIX)}
    if not part:
        return 0
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
        part = {key.removeprefix("text_model."): value for key, value in part.items()}
    ranks = {key: value.shape[1] for key, value in part.items() if key.endswith("lora_B.weight")}
    alphas = {key.removeprefix(_TEXT_PREFIX): v for key, v in (alphas or {}).items() if key.startswith(_TEXT_PREFIX)}
    config = _create_lora_config(part, alphas or None, None, ranks, is_unet=False)
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    text_encoder.peft_config = {**getattr(text_encoder, "peft_config", {}), name: config}
    text_encoder._hf_peft_config_loaded = True
    result = set_peft_model_state_dict(text_encoder, part, adapter_name=name)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    if unexpected:
        raise InvalidRequestError(f"The LoRA's text-encoder weight {unexpected[0]} fits no layer of this backbone.")
    return _count_layers(text_encoder, name)


def remove_loras(pipe, names: list[str], others: dict[str, float]) -> None:
    """Give the other adapters back their weights, delete ours, and take PEFT's wrappers off a model left with no
    adapter (also those a failed load left behind)."""
    if others:  # first, so ours are off when deleted (PEFT would otherwise switch on another adapter itself)
        pipe.set_adapters(list(others), list(others.values()))
    present = {name for names_ in pipe.get_list_adapters().values() for name in names_}
    ours = [name for name in names if name in present]
    if ours:
        with warnings.catch_warnings():  # PEFT then turns on a kept, inactive adapter (fast mode's, which turns
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")  # it off)
            pipe.delete_adapters(ours)
    for model in (pipe.unet, pipe.text_encoder):
        if not getattr(model, "peft_config", None) and _count_layers(model, None):
            _strip_peft(model)


def _strip_peft(model) -> None:
    from diffusers.utils import recurse_remove_peft_layers

    if hasattr(model, "unload_lora"):  # diffusers' models
        model.unload_lora()
        return
    recurse_remove_peft_layers(model)  # what diffusers' unload_lora_weights does to a text encoder
    model.__dict__.pop("peft_config", None)
    model._hf_peft_config_loaded = False


def adapter_weight(pipe, name: str) -> float:
    """The weight ``set_adapters`` last gave adapter ``name`` (read back from one of its layers; 1.0 if none)."""
    for model in (pipe.unet, pipe.text_encoder):
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and name in scaling and name in getattr(module, "lora_alpha", {}):
                rank = module.r[name]
                unit = module.lora_alpha[name] / (math.sqrt(rank) if module.use_rslora.get(name) else rank)
                return scaling[name] / unit
    return 1.0


def face_adapter_state(unet) -> list[tuple]:
    """What must not change while LoRAs come and go: each spatial attn2's processor (the very object), its face
    key/value layers (not wrapped, weights not written) and attn2's own face-LoRA-fused weights (which PEFT may
    wrap, but not write), by storage and in-place version."""
    processors = unet.attn_processors
    state = []
    for name in spatial_cross_attention_names(unet):
        proc = processors[name]
        attn = unet.get_submodule(name.removesuffix(".processor"))
        face = [*getattr(proc, "to_k_ip", []), *getattr(proc, "to_v_ip", [])]
        fused = [getattr(layer, "base_layer", layer) for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])]
        state.append(
            (
                id(proc),
                type(proc),
                *[(type(layer), layer.weight.data_ptr(), layer.weight._version) for layer in face],
                *[(layer.weight.data_ptr(), layer.weight._version) for layer in fused],
            )
        )
    return state


def _count_layers(model, name: str | None) -> int:
    """How many of the model's layers hold adapter ``name`` (None: how many are PEFT layers at all)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    return len(layers) if name is None else sum(name in getattr(layer, "lora_A", {}) for layer in layers)


def _free_name(pipe) -> str:
    taken = {name for names in pipe.get_list_adapters().values() for name in names}
    return next(f"{ADAPTER_PREFIX}_{i}" for i in range(len(taken) + 1) if f"{ADAPTER_PREFIX}_{i}" not in taken)
