"""The fast mode: AnimateLCM (Wang et al. 2024) on the face-adapter pipeline, for one call.

AnimateLCM distils AnimateDiff into a consistency model that needs 4-8 steps at guidance 1-2 rather than 30 DDIM
steps at guidance 8. diffusers' recipe: the MotionAdapter of ``wangfuyun/AnimateLCM``, its spatial LoRA
``AnimateLCM_sd15_t2v_lora.safetensors`` at weight 0.8, and ``LCMScheduler.from_config(ddim_config,
beta_schedule="linear")``. All three go onto the cached pipeline for the call and come off after, error or not:

* Motion weights: each motion-module tensor of the UNet is pointed at AnimateLCM's (``param.data`` swapped, no
  copy) and pointed back after. The modules themselves (our per-frame motion norms) stay; the standard motion
  tensors, which every backbone's UNet shares, are never written. AnimateLCM's tensors are kept, once placed, on the
  UNet's device and in its dtype (0.9 GB in float16 at SD1.5 size), so a swap costs nothing.
* LoRA: a PEFT adapter named ``animatelcm``, made active beside whatever adapters are active (a style LoRA keeps
  its scale) and inactive after. The face adapter's own LoRA is fused into attn2's weights and stays under it; the
  face processors are not touched. Loaded on the first fast request and kept, inactive, for the next (inactive PEFT
  layers compute exactly what their base layers do); :func:`remove_lcm_lora` takes it off.
* Scheduler: LCMScheduler from the pipeline's DDIM configuration, for the call only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import registry
from ..errors import CheckpointError, InvalidRequestError, WeightsUnavailableError
from ..weights import describe, hub_reachable, is_cached, resolve

ADAPTER = "animatelcm"  # the PEFT adapter's name (the style LoRAs use their own)
LCM_LORA_WEIGHT = 0.8  # diffusers' AnimateLCM recipe (its steps and guidance: settings.FAST_STEPS, FAST_GUIDANCE)
MAX_STEPS = 50  # LCMScheduler's original_inference_steps: it cannot take more
LORA_FILE = registry.ANIMATELCM_LORA  # beside the motion adapter, as in the Hub repository


@dataclass
class FastWeights:
    """AnimateLCM's motion-module tensors and its spatial LoRA (diffusers' layout), loaded once."""

    source: Path
    motion: dict[str, torch.Tensor]  # MotionAdapter state dict (names as in the motion UNet), float32 on the CPU
    lora: dict[str, torch.Tensor]  # from the pipeline's ``lora_state_dict``: ``unet.*`` keys
    network_alphas: dict[str, float] | None
    _placed: tuple[tuple, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def lora_layers(self) -> int:
        """How many UNet layers the LoRA adapts."""
        return sum(key.endswith(("down.weight", "lora_A.weight")) for key in self.lora)

    def motion_like(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The motion tensors on ``tensor``'s device and in its dtype (one placement is kept)."""
        where = (tensor.device, tensor.dtype)
        if self._placed is None or self._placed[0] != where:
            self._placed = None  # free the old placement first
            self._placed = (where, {k: v.to(device=where[0], dtype=where[1]) for k, v in self.motion.items()})
        return self._placed[1]


class AnimateLCMWeights:
    """Where the fast mode's AnimateLCM comes from (a local folder in the repository's layout, a function that
    builds one, or None: the registry's Hub folder, downloaded if needed), and its tensors once loaded. The
    service owns one and gives it to every pipeline it builds; :meth:`clear` frees the tensors."""

    def __init__(self, source: str | Path | Callable[[], Path] | None = None):
        self.source = source
        self._loaded: FastWeights | None = None

    def get(self) -> FastWeights:
        if self._loaded is None:
            source = self.source() if callable(self.source) else self.source
            self._loaded = load_fast_weights(source)
        return self._loaded

    def clear(self) -> None:
        """Drop the loaded tensors (CPU and device copies), e.g. to recover memory."""
        self._loaded = None


def load_fast_weights(source: str | Path | None = None) -> FastWeights:
    """AnimateLCM from a local folder (the repository's layout) or the registry's Hub folder (downloaded if
    needed), read anew (:class:`AnimateLCMWeights` keeps it)."""
    return _load(_resolve(source))


def _resolve(source: str | Path | None) -> Path:
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise WeightsUnavailableError(f"The AnimateLCM folder {path} for fast mode does not exist.")
        return path
    hub = registry.ANIMATELCM
    if not is_cached(hub) and not hub_reachable():
        raise WeightsUnavailableError(
            f"Fast mode needs the AnimateLCM weights ({describe(hub)}), which are not downloaded and the Hugging Face "
            "Hub cannot be reached: download them while connected, or turn fast mode off."
        )
    return resolve(hub, what="AnimateLCM weights for fast mode")


def _load(path: Path) -> FastWeights:
    from diffusers import AnimateDiffPipeline

    from ..models import load_motion_adapter

    lora = path / LORA_FILE
    for needed in (path / "config.json", lora):
        if not needed.is_file():
            raise WeightsUnavailableError(
                f"The AnimateLCM folder {path} has no {needed.name}: it needs the motion adapter (config.json, "
                f"diffusion_pytorch_model.safetensors) and {LORA_FILE}, as in {describe(registry.ANIMATELCM)}."
            )
    motion = load_motion_adapter(path).state_dict()
    try:
        state, alphas = AnimateDiffPipeline.lora_state_dict(str(lora))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"The AnimateLCM LoRA {lora} could not be read ({type(exc).__name__}); it may be incomplete: "
            "download it again."
        ) from exc
    state = {k: v for k, v in state.items() if k.startswith("unet.")}
    if not state:
        raise CheckpointError(f"The AnimateLCM LoRA {lora} holds no UNet layers.")
    return FastWeights(source=path, motion=motion, lora=state, network_alphas=alphas or None)


@contextmanager
def fast_mode(pipe, request, weights: AnimateLCMWeights) -> Iterator[None]:
    """AnimateLCM's motion weights, LoRA and scheduler on ``pipe`` (the AnimateDiff pipeline) for the call, when
    ``request.fast``."""
    if not request.fast:  # the kept LoRA stays off, also when a style LoRA's removal made PEFT turn it on
        deactivate_lcm_lora(pipe.unet)
        try:
            yield
        finally:
            deactivate_lcm_lora(pipe.unet)
        return
    if request.num_inference_steps > MAX_STEPS:
        asked = request.num_inference_steps
        raise InvalidRequestError(f"Fast mode takes at most {MAX_STEPS} steps (4-8 suit it), not {asked}.")
    loaded = weights.get()
    with ExitStack() as stack:
        stack.enter_context(motion_weights(pipe.unet, loaded))
        stack.enter_context(lcm_lora(pipe, loaded))
        stack.enter_context(lcm_scheduler(pipe))
        yield


# -- the three parts ----------------------------------------------------------------------------


@contextmanager
def lcm_scheduler(pipe) -> Iterator[None]:
    from diffusers import LCMScheduler

    original = pipe.scheduler
    pipe.scheduler = LCMScheduler.from_config(original.config, beta_schedule="linear")
    try:
        yield
    finally:
        pipe.scheduler = original


@contextmanager
def motion_weights(unet, weights: FastWeights) -> Iterator[None]:
    """The UNet's motion modules compute with AnimateLCM's tensors inside the block."""
    slots = _MotionSlots(unet)
    slots.check(weights.motion)
    original = slots.swap(weights.motion_like(slots.example()))
    try:
        yield
    finally:
        _MotionSlots(unet).swap(*original)  # looked up again: loading a LoRA may re-create offload's weight store


class _MotionSlots:
    """Where the UNet's motion-module tensors live: the parameters and buffers themselves or, under sequential CPU
    offload, accelerate's CPU store that the (empty, meta) modules are filled from at each use."""

    def __init__(self, unet):
        self.store = _offloaded_store(unet)
        tensors = {**dict(unet.named_parameters()), **dict(unet.named_buffers())}
        self.tensors = {k: v for k, v in tensors.items() if "motion_modules." in k}

    def example(self) -> torch.Tensor:
        name = next(iter(self.tensors))
        return self.store[name] if self.store is not None else self.tensors[name].data

    def check(self, motion: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.tensors) - set(motion)), sorted(set(motion) - set(self.tensors))
        wrong = [k for k in set(motion) & set(self.tensors) if motion[k].shape != self.tensors[k].shape]
        if missing or unexpected or wrong:
            if missing:
                what = f"it has no {missing[0]}"
            elif unexpected:
                what = f"this model has no {unexpected[0]}"
            else:
                what = f"{wrong[0]} is {tuple(motion[wrong[0]].shape)}, not {tuple(self.tensors[wrong[0]].shape)}"
            raise CheckpointError(f"The AnimateLCM motion module does not fit this model's motion modules ({what}).")

    def swap(self, store: dict[str, torch.Tensor], modules: dict[str, torch.Tensor] | None = None) -> tuple:
        """Point the motion tensors at these (no copy): the store's entries at ``store``'s and the modules' own at
        ``modules``' (the same by default; under sequential offload the modules hold only their buffers). Returns
        what they held, in the same form, to swap back."""
        held_store, held_modules = {}, {}
        if self.store is not None:
            for name, tensor in store.items():
                held_store[name], self.store[name] = self.store[name], tensor
        for name, tensor in (store if modules is None else modules).items():
            own = self.tensors[name]
            if own.device.type != "meta":
                held_modules[name], own.data = own.data, tensor.to(own.device)
        return held_store, held_modules


def _offloaded_store(unet) -> dict | None:
    """accelerate's CPU weight store under sequential offload (``enable_sequential_cpu_offload``), else None."""
    from accelerate.utils import PrefixedDataset

    for module in unet.modules():
        hook = getattr(module, "_hf_hook", None)
        for each in getattr(hook, "hooks", (hook,)):
            store = getattr(each, "weights_map", None)
            while isinstance(store, PrefixedDataset):
                store = store.dataset
            if getattr(each, "offload", False) and isinstance(store, dict):
                return store
    return None


@contextmanager
def lcm_lora(pipe, weights: FastWeights) -> Iterator[None]:
    """AnimateLCM's LoRA active at LCM_LORA_WEIGHT beside the adapters already active (a style LoRA keeps its scale);
    inactive again after. Loaded on first use and then kept, inactive, between fast requests: putting PEFT layers on
    an SD1.5 UNet and taking them off costs seconds of Python (benchmarks/RESULTS.md), and inactive PEFT layers
    compute exactly what their base layers do."""
    unet = pipe.unet
    before = [name for name in active_adapters(unet) if name != ADAPTER]
    if _loaded_source(unet) != weights.source:
        remove_lcm_lora(unet)
        _load_lcm_lora(pipe, weights)
    try:
        for layer in _tuner_layers(unet):
            layer.set_adapter([*before, ADAPTER], inference_mode=True)
            layer.set_scale(ADAPTER, LCM_LORA_WEIGHT)
        yield
    finally:
        for layer in _tuner_layers(unet):
            layer.set_adapter(before, inference_mode=True)


def _load_lcm_lora(pipe, weights: FastWeights) -> None:
    unet = pipe.unet
    try:
        with warnings.catch_warnings():  # PEFT warns whenever a second adapter joins one already there
            warnings.filterwarnings("ignore", message=".*multiple adapters")
            pipe.load_lora_into_unet(
                dict(weights.lora),
                network_alphas=weights.network_alphas,
                unet=unet,
                adapter_name=ADAPTER,
                _pipeline=pipe,
            )
        applied = sum(ADAPTER in getattr(layer, "lora_A", {}) for layer in _tuner_layers(unet))
        if applied != weights.lora_layers:  # diffusers only warns about keys it could not place
            raise CheckpointError(
                f"Only {applied} of the {weights.lora_layers} layers of the AnimateLCM LoRA fit this model."
            )
    except (ValueError, RuntimeError, KeyError, CheckpointError) as exc:
        remove_lcm_lora(unet)
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"The AnimateLCM LoRA in {weights.source} does not fit this model ({type(exc).__name__}: {str(exc)[:200]})."
        ) from exc
    unet._animatelcm_source = weights.source


def _loaded_source(unet) -> Path | None:
    """Where the AnimateLCM LoRA on the UNet came from (None when it is not there, e.g. unloaded by another)."""
    return getattr(unet, "_animatelcm_source", None) if ADAPTER in (getattr(unet, "peft_config", None) or {}) else None


def remove_lcm_lora(unet) -> None:
    """Take AnimateLCM's LoRA off the UNet (and the PEFT layers, when no other adapter is left)."""
    if ADAPTER in (getattr(unet, "peft_config", None) or {}) or any(
        ADAPTER in getattr(layer, "lora_A", {}) for layer in _tuner_layers(unet)
    ):
        unet.delete_adapters(ADAPTER)
    if not getattr(unet, "peft_config", None) and _tuner_layers(unet):
        unet.unload_lora()
    unet._animatelcm_source = None


def deactivate_lcm_lora(unet) -> None:
    """Make sure AnimateLCM's kept LoRA is not active: PEFT activates a remaining adapter when the active one is
    deleted, so a style LoRA taken off after a request could leave it on."""
    if _loaded_source(unet) is None:
        return
    for layer in _tuner_layers(unet):
        if ADAPTER in layer.active_adapters:
            layer.set_adapter([name for name in layer.active_adapters if name != ADAPTER], inference_mode=True)


def active_adapters(unet) -> list[str]:
    """The UNet's active PEFT adapters (none without PEFT layers)."""
    return next((list(layer.active_adapters) for layer in _tuner_layers(unet)), [])


def _tuner_layers(unet) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
