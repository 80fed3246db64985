"""The `train` command: random-reference training of the face adapter on accelerate.

``python -m idanimator train --data DATA --out OUT`` (or ``accelerate launch -m idanimator train ...``). One
script, read top to bottom: the run's files, the frozen models, the loss, the loop (``train``), checkpoint
saving and resuming, and ``log_validation``. The settings are :class:`~.config.TrainConfig` (every flag with
its default and check, in its own module so the CLI checks them before torch is imported); the data are
:mod:`.dataset`'s clips and the trainable adapter :mod:`.adapter_training`'s.

Only the face adapter learns (the resampler, the face key/value and the rank-128 LoRA of every spatial
cross-attention); the motion UNet, the VAE and both CLIP encoders stay frozen. Each process reads its own
share of the clip stream (:class:`~.dataset.ClipStream`); the data loader is not prepared by accelerate, so
the stream, and with it every sample, depends only on the seed and the step. Every other random draw of a
micro-step (the VAE's latent sample, the noise, the timesteps) comes from a generator seeded with the run's
seed and the micro-step's number: a resumed run continues exactly as the uninterrupted one.

    OUT/config.json                    the run's settings
    OUT/log.jsonl, OUT/logs/           a line per step (loss, learning rate, validation scores); TensorBoard
    OUT/checkpoints/step-000200/       adapter.safetensors (ours), animator.ckpt (the release's layout A),
                                       state.pt (step, data position, optimiser, LR schedule, gradient scaler),
                                       rng-0.pt ... (each process's random states), config.json
    OUT/validation/step-000200/        NAME.mp4 per validation face, scores.json
    OUT/adapter.safetensors, OUT/animator.ckpt   the result
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..adapter import FaceAdapterWeights, load_face_adapter_weights, save_face_adapter_weights, save_official_checkpoint
from ..errors import IDAnimatorError
from ..files import ensure_folder
from ..images import clip_image_processor
from ..models import build_motion_unet, load_named_backbone, load_shared_parts, release_scheduler
from ..tiny import load_options
from .adapter_training import FaceAdapterTrainingModel, TrainableFaceAdapter, read_initial_adapter
from .config import (
    CHECKPOINTS,
    CONFIG_FILE,
    LOG_FILE,
    OFFICIAL_FILE,
    STATE_FILE,
    STEP_FOLDER,
    VALIDATION_SAMPLES,
    TrainConfig,
    checkpoint_step,
    checkpoints_in,
    find_resume,
    resume_mismatch,
)
from .dataset import (
    ClipDataset,
    ClipStream,
    Dropout,
    TrainingClip,
    clip_input,
    collate,
    hold_out,
    load_clips,
    stride_note,
)
from .identity_loss import IdentityLoss, IdentityTerm, identity_record

ADAPTER_FILE = "adapter.safetensors"
TRACKER_RUN = "train"
VALIDATION_FPS = 9  # the release's export rate
VALIDATION_PROMPT = "a person"  # for a clip without a caption


@dataclass
class TrainResult:
    step: int
    adapter: Path  # the final animator.ckpt
    loss: float | None  # the last step's


# -- the frozen models -----------------------------------------------------------------------------


@dataclass
class FrozenParts:
    """The frozen models of a run, loaded by the same code as inference's (:mod:`idanimator.models`): the motion
    UNet is the inference one (SD1.5 backbone + AnimateDiff motion modules with per-frame norms) without a face
    adapter; the noise schedule is the one the inference pipeline samples with (the release's DDIM betas, linear
    0.00085-0.012 over 1000 steps, which AnimateDiff's motion modules were trained with), read as a DDPM
    schedule for adding noise."""

    unet: torch.nn.Module  # UNetMotionModel, no face adapter yet
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_encoder: torch.nn.Module
    feature_extractor: object  # CLIP's image preprocessing, as the inference pipeline's
    noise_scheduler: object  # DDPMScheduler
    tiny_adapter: Path | None = None  # the tiny kit's face adapter (tiny mode's default start)

    def modules(self) -> dict[str, torch.nn.Module]:
        names = ("unet", "vae", "text_encoder", "image_encoder")
        return {name: getattr(self, name) for name in names}

    def freeze(self, device, dtype: torch.dtype) -> None:
        """No gradients, eval mode, placed and cast (before the adapter is attached: it stays float32)."""
        for module in self.modules().values():
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
        self.vae.enable_slicing()  # encode a clip's frames one at a time: the same latents, far less memory


def load_frozen_parts(
    backbone: str | None = None,
    *,
    motion_adapter: str | None = None,
    image_encoder: str | None = None,
    tiny: bool = False,
) -> FrozenParts:
    """Resolve (download if needed) and load every frozen part, in float32 on the CPU."""
    from diffusers import DDPMScheduler

    options = load_options(tiny=tiny, device="cpu", motion_adapter=motion_adapter, image_encoder=image_encoder)
    shared = load_shared_parts(options, face_adapter=False)  # the face adapter is what this run trains
    parts = load_named_backbone(shared, backbone)
    return FrozenParts(
        unet=build_motion_unet(parts, shared.motion_adapter, face=None),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        image_encoder=shared.image_encoder,
        feature_extractor=clip_image_processor(),
        noise_scheduler=DDPMScheduler.from_config(release_scheduler().config),
        tiny_adapter=Path(options.face_adapter) if tiny else None,
    )


# -- the loss: noise-prediction MSE over a clip's video latents (epsilon parameterisation) ---------


def micro_step_generator(seed: int, micro_step: int, process: int) -> torch.Generator:
    """A CPU generator for one micro-step of one process (CPU, so every device draws the same numbers)."""
    state = np.random.SeedSequence([seed, micro_step, process]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def encode_conditions(parts: FrozenParts, batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(text states [B, 77, width], face features [B, references, tokens, clip width]): CLIP's text encoder on
    the captions (a dropped caption is ""), CLIP's image encoder's penultimate states of the reference faces (a
    dropped face arrives as all-zeros normalised pixels, exactly inference's unconditional input)."""
    tokens = parts.tokenizer(
        batch["caption"],
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    text = parts.text_encoder(tokens)[0]
    faces = batch["faces"].to(device=device, dtype=dtype)
    hidden = parts.image_encoder(faces.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    return text, hidden.unflatten(0, faces.shape[:2])


@torch.no_grad()
def encode_video(vae, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, F, 3, H, W] in [-1, 1] -> scaled latents [B, 4, F, H/8, W/8] (a sample of the VAE's posterior)."""
    batch, count = frames.shape[:2]
    posterior = vae.encode(frames.flatten(0, 1)).latent_dist
    latents = posterior.sample(generator=generator) * vae.config.scaling_factor
    return latents.unflatten(0, (batch, count)).transpose(1, 2)


def diffusion_loss(model, parts: FrozenParts, batch: dict, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """The loss of one micro-batch; gradients reach only the adapter inside ``model``. Latents, noise and
    timesteps come from ``generator``, so a micro-step's randomness is fixed by the run's seed and its number."""
    return step_losses(model, parts, batch, generator, device, dtype, None)[0]


def step_losses(
    model, parts: FrozenParts, batch: dict, generator: torch.Generator, device, dtype, identity: IdentityLoss | None
) -> tuple[torch.Tensor, IdentityTerm | None]:
    """:func:`diffusion_loss`, and with ``identity`` (--id-loss-weight > 0) the identity term of the same
    prediction (it draws nothing from ``generator``: with the loss off, a run is what it was without it)."""
    latents = encode_video(parts.vae, batch["frames"].to(device=device, dtype=dtype), generator)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = parts.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    text, faces = encode_conditions(parts, batch, device, dtype)
    prediction = model(noisy, timesteps, text, faces)
    mse = F.mse_loss(prediction.float(), noise.float())
    # -- the identity-preserving loss (identity_loss.py): ArcFace on the decoded x0 estimate of K frames --
    return mse, None if identity is None else identity(parts.vae, noisy, prediction, timesteps, batch)


def load_identity_loss(config: TrainConfig) -> IdentityLoss | None:
    """The identity loss's frozen ArcFace (--id-loss-model; with --tiny and none given, the tiny kit's), on
    the CPU; None when --id-loss-weight is 0. A bad file is one sentence, before any other model loads."""
    if config.id_loss_weight == 0:
        return None
    from ..arcface import load_arcface

    path = config.id_loss_model
    if path is None:  # validate() allows this only with --tiny
        from ..tiny.arcface_kit import build_tiny_arcface

        path = build_tiny_arcface()
    return IdentityLoss(load_arcface(path), config.id_loss_timestep_weight)


# -- the loop --------------------------------------------------------------------------------------


def train(config: TrainConfig, say=print) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object
    from diffusers.optimization import get_constant_schedule_with_warmup
    from tqdm.auto import tqdm

    config = config.validate()
    # Cheap checks first: a bad dataset, resume folder, initial adapter or precision is reported before any model
    # loads. The validation clips are held out of the training clips (whole identities, so their faces are unseen).
    precision = check_mixed_precision(config.mixed_precision)
    clips, skipped = load_clips(config.data, config.frames)
    clips, held_out = hold_out(clips, config.val_clips, config.seed)
    resume_from = find_resume(config.resume, config.out) if config.resume else None
    if resume_from is not None:  # the checkpoint holds the whole adapter: --init-adapter is not read
        resumed_weights, resumed_state, resumed_config = read_checkpoint(resume_from)
        problem = resume_mismatch(resumed_config, config)
        if problem:
            raise IDAnimatorError(problem)
    else:
        initial = read_initial_adapter(config.init_adapter, _tiny_adapter(config))
    identity = load_identity_loss(config)

    out = config.out.resolve()  # paths as given are for messages; accelerate and TensorBoard get absolute ones
    # Several processes from a launcher (torchrun, accelerate launch) on a machine without GPUs are CPU ranks
    # (gloo): accelerate would otherwise make each a lone rank 0, training its own copy into the same --out.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=precision,
        cpu=launched > 1 and not torch.cuda.is_available(),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if "WORLD_SIZE" in os.environ and accelerator.num_processes != launched:
        raise IDAnimatorError(
            f"The launcher started {launched} processes but accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}), so each would train alone; launch on GPUs, or set "
            "ACCELERATE_USE_CPU=1 for CPU processes."
        )
    main = accelerator.is_main_process
    say = say if main else (lambda line: None)
    if main:
        ensure_folder(config.out)
        (config.out / CONFIG_FILE).write_text(config.to_json())
    for note in (skipped, stride_note(clips, config.frames, config.stride)):
        if note:
            say(f"note: {note}")
    start = initial.description if resume_from is None else f"{resume_from} (step {resumed_state['step']})"
    say(
        f"training on {_count(len(clips), 'clip')} in {_count(accelerator.num_processes, 'process', 'es')} "
        f"({accelerator.distributed_type.value}, mixed precision {accelerator.mixed_precision}); starting from {start}"
    )
    say(f"validation: {validation_note(config, clips, held_out)}")

    # The models: frozen parts, the trainable adapter on the motion UNet, the optimiser and its schedule.
    parts = load_frozen_parts(
        config.backbone, motion_adapter=config.motion_adapter, image_encoder=config.image_encoder, tiny=config.tiny
    )
    dtype, device = _weight_dtype(accelerator.mixed_precision), accelerator.device
    if resume_from is not None:
        weights = resumed_weights
    else:
        weights = initial.complete(parts.unet, parts.image_encoder.config.hidden_size, config.lora_rank, config.seed)
    adapter = TrainableFaceAdapter.from_weights(weights, parts.unet)
    parts.freeze(device, dtype)
    if config.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    model = FaceAdapterTrainingModel(parts.unet, adapter.to(device))
    if identity is not None:
        identity.attach(parts.noise_scheduler, device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # accelerate steps a prepared schedule once per process per optimiser step: count warm-up likewise.
    schedule = get_constant_schedule_with_warmup(optimizer, config.warmup_steps * accelerator.num_processes)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)

    step = 0
    if resume_from is not None:  # the optimiser, LR schedule, gradient scaler and random states of the checkpoint
        optimizer.load_state_dict(resumed_state["optimizer"])
        schedule.load_state_dict(resumed_state["lr_scheduler"])
        if accelerator.scaler is not None and resumed_state.get("scaler"):
            accelerator.scaler.load_state_dict(resumed_state["scaler"])
        restore_rng_state(resume_from, accelerator.process_index)
        step = resumed_state["step"]
    # This process's share of the clip stream, after the samples it has already read.
    loader = torch.utils.data.DataLoader(
        build_dataset(config, clips, parts.feature_extractor),
        batch_size=config.batch,
        sampler=ClipStream(
            len(clips),
            config.seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            start=step * config.samples_per_step,
        ),
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=accelerator.device.type == "cuda",
    )
    validation = None
    if config.validate_every and main:  # a face per held-out identity (--val-clips 0: the first training clips')
        validation = Validation(pick_samples(held_out or clips, config.val_clips or VALIDATION_SAMPLES))

    hyperparameters = {k: v for k, v in json.loads(config.to_json()).items() if v is not None}
    accelerator.init_trackers(TRACKER_RUN, config=hyperparameters)
    log = StepLog(config.out / LOG_FILE, step) if main else None
    progress = tqdm(total=config.max_steps, initial=step, desc="training", disable=not main, dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, loss_value, trained_on, id_sums = [], None, [], []
    batches = iter(loader)
    while step < config.max_steps:
        batch = next(batches)
        micro = step * config.grad_accum + len(losses)
        generator = micro_step_generator(config.seed, micro, accelerator.process_index)
        with accelerator.accumulate(model):
            loss, id_term = step_losses(model, parts, batch, generator, device, dtype, identity)
            if id_term is not None:  # the identity-preserving loss, weighted (--id-loss-weight)
                id_sums.append(id_term.sums())
            accelerator.backward(loss if id_term is None else loss + config.id_loss_weight * id_term.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        trained_on.extend(batch["clip_id"])
        if not accelerator.sync_gradients:
            continue
        step += 1
        loss_value = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
        clip_ids = gather_object(trained_on)  # every process's clips of the step, in process order
        losses, trained_on = [], []
        if not math.isfinite(loss_value):
            raise IDAnimatorError(f"The loss became {loss_value} at step {step}; lower --lr or use bf16 over fp16.")
        id_record = {}  # the identity term over the step's frames with a face, in every process
        if identity is not None:
            id_record = identity_record(accelerator.gather(torch.stack(id_sums).sum(0)[None]).sum(0))
            id_sums = []
            if not math.isfinite(id_record.get("id_loss", 0.0)):
                raise IDAnimatorError(f"The identity loss became {id_record['id_loss']} at step {step}; lower --lr.")
        lr = schedule.get_last_lr()[0]
        id_logs = {f"train/{k}": v for k, v in id_record.items()}
        accelerator.log({"train/loss": loss_value, "train/lr": lr, **id_logs}, step=step)
        if main:
            log.write({"step": step, "loss": loss_value, **id_record, "lr": lr, "clips": clip_ids})
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if step % config.save_every == 0 or step == config.max_steps:
            save_checkpoint(accelerator, model, optimizer, schedule, config, step)
        if config.validate_every and step % config.validate_every == 0:
            if validation is not None:  # the main process makes the videos; the others wait for it
                with accelerator.autocast():
                    unet = accelerator.unwrap_model(model).unet
                    scores = log_validation(validation, parts, unet, config, step, dtype, say)
                accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=step)
                log.write({"step": step, "validation": scores})
            accelerator.wait_for_everyone()
    progress.close()

    adapter_path = config.out / OFFICIAL_FILE
    if main:  # the run's result beside its checkpoints (the resumed weights when nothing was left to train)
        save_adapter(accelerator.unwrap_model(model).adapter.to_weights(), config.out)
    accelerator.end_training()
    say(f"step {step}: loss {'n/a' if loss_value is None else format(loss_value, '.4g')}; wrote {adapter_path}")
    return TrainResult(step=step, adapter=adapter_path, loss=loss_value)


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def check_mixed_precision(flag: str | None) -> str | None:
    """The precision to hand accelerate: the flag, or (None) accelerate's own choice, which `accelerate launch`
    passes from its --mixed_precision or config file. One that cannot run here is refused in a sentence."""
    wanted = flag or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    source = "--mixed-precision" if flag else "accelerate's setting (its launch flag or config file)"
    if wanted == "fp16" and not torch.cuda.is_available():
        raise IDAnimatorError(
            f"{source} asks for fp16, which needs a CUDA GPU and this machine has none; "
            "give --mixed-precision bf16 or no."
        )
    if wanted == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise IDAnimatorError(f"{source} asks for bf16, which this GPU cannot run; give --mixed-precision fp16 or no.")
    return flag


def _count(number: int, noun: str, plural: str = "s") -> str:
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun[:-1] + 'ies' if noun.endswith('y') else noun + plural}"


def validation_note(config: TrainConfig, clips: list[TrainingClip], held_out: list[TrainingClip]) -> str:
    """What the validation videos show, said once at the start of a run."""
    if held_out:
        keys = {clip.identity or clip.clip_id for clip in held_out}
        names = ", ".join(clip.clip_id for clip in held_out[:5]) + (" ..." if len(held_out) > 5 else "")
        when = "" if config.validate_every else " (no validation videos: --validate-every 0)"
        return (
            f"{_count(len(held_out), 'clip')} of {_count(len(keys), 'identity')} held out of training ({names}); "
            f"the validation videos use their faces and captions, unseen in training{when}"
        )
    if config.validate_every:
        return "--val-clips 0: the validation faces and prompts are training clips', so they show fitting only"
    return "none (--validate-every 0)"


def _tiny_adapter(config: TrainConfig) -> Path | None:
    """Tiny mode's default start: the tiny kit's face adapter (built on first use)."""
    if not config.tiny or config.init_adapter is not None:
        return None
    from ..tiny import build_tiny_kit, default_tiny_dir

    return build_tiny_kit(default_tiny_dir())["face_adapter"]


def build_dataset(config: TrainConfig, clips: list[TrainingClip], feature_extractor) -> ClipDataset:
    return ClipDataset(
        clips,
        frames=config.frames,
        stride=config.stride,
        size=config.size,
        num_references=config.num_references,
        dropout=Dropout(config.drop_text, config.drop_face, config.drop_both),
        seed=config.seed,
        feature_extractor=feature_extractor,
        id_frames=config.id_loss_frames if config.id_loss_weight > 0 else 0,  # landmarks for the identity loss
    )


class StepLog:
    """``OUT/log.jsonl``: one JSON object per step; a resumed run first drops the lines after its step."""

    def __init__(self, path: Path, step: int):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# -- checkpoints: saving, and finding and reading one to resume from -------------------------------
# A checkpoint is written into a hidden sibling folder and renamed into place, so a crash never leaves a
# half-written one under a step's name. Resuming restores the adapter, the optimiser, the LR schedule and the
# random states, and the data stream restarts after the samples already seen.


def save_checkpoint(accelerator, model, optimizer, schedule, config: TrainConfig, step: int) -> Path:
    """OUT/checkpoints/step-N/ (every process writes its random states; the main process the rest)."""
    folder = Path(config.out) / CHECKPOINTS / f"step-{step:06d}"
    partial = folder.parent / f".{folder.name}.partial"  # the same name for every process
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        ensure_folder(partial)
    accelerator.wait_for_everyone()
    write_rng_state(partial, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "samples_per_process": step * config.samples_per_step,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": schedule.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        save_adapter(accelerator.unwrap_model(model).adapter.to_weights(), partial)
        torch.save(state, partial / STATE_FILE)
        (partial / CONFIG_FILE).write_text(config.to_json())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    accelerator.wait_for_everyone()
    return folder


def save_adapter(weights: FaceAdapterWeights, folder: Path) -> Path:
    """Both layouts into ``folder``; returns the official one's path."""
    save_face_adapter_weights(weights, folder / ADAPTER_FILE)
    return save_official_checkpoint(weights, folder / OFFICIAL_FILE)


def write_rng_state(partial: Path, process: int) -> None:
    """This process's global random states (python, numpy, torch, CUDA) as ``rng-P.pt``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "key": torch.from_numpy(key.copy()), "pos": pos, "has_gauss": has_gauss}
    state = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, partial / f"rng-{process}.pt")


def restore_rng_state(folder: Path, process: int) -> None:
    path = folder / f"rng-{process}.pt"
    if not path.is_file():  # e.g. resumed on more processes than saved: those start from the seed's draws
        return
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# checkpoints_in and find_resume are in .config: the CLI finds a run's checkpoint before torch is imported.


def read_checkpoint(folder: Path) -> tuple[FaceAdapterWeights, dict, dict]:
    """(adapter weights, training state, the saved run's settings); a damaged file is one sentence naming it
    and, when there is one, the earlier checkpoint to resume from."""
    for name in (STATE_FILE, CONFIG_FILE):
        path = folder / name
        try:
            if name == STATE_FILE:
                state = torch.load(path, map_location="cpu", weights_only=True)
                ok = isinstance(state, dict) and {"step", "optimizer", "lr_scheduler"} <= state.keys()
            else:
                saved = json.loads(path.read_text())
                ok = isinstance(saved, dict)
        except Exception:  # torch.load raises many kinds (zip, pickle, EOF) with long texts: the file is what matters
            ok = False
        if not ok:
            match = STEP_FOLDER.match(folder.name)
            found = checkpoints_in(folder.parent.parent)
            earlier = [c for c in found if match and checkpoint_step(c) < int(match.group(1))]
            if earlier:
                how = f"; resume from the one before it with --resume {earlier[-1]}."
            else:
                how = " and no earlier checkpoint exists; start again with another --out."
            raise IDAnimatorError(f"The checkpoint file {path} is damaged{how}")
    return load_face_adapter_weights(folder / ADAPTER_FILE), state, saved


# -- validation videos -----------------------------------------------------------------------------
# Fixed faces and prompts (the first face of the first clips of different identities, their captions) and the
# run's seed: the same videos at every validation, so they show what training changed. They are made by the
# inference pipeline on the training UNet itself (its LoRA computed beside the frozen weights, which equals
# the fused LoRA of inference) and scored with the `eval` metrics whose models are at hand (motion always;
# face similarity when a face embedder loads).


@dataclass
class ValidationSample:
    name: str
    face: Image.Image  # the CLIP input (224 x 224)
    reference: np.ndarray  # the aligned crop as RGB, for face similarity
    prompt: str


@dataclass
class Validation:
    """The samples, and what every validation reuses: the pipeline and the identity scorer, made at the first."""

    samples: list[ValidationSample]
    pipe: object | None = None  # IDAnimatorPipeline on the training UNet
    identity: object | None = None  # eval's identity scorer; None when no face embedder loads
    scorers_loaded: bool = False


def pick_samples(clips: list[TrainingClip], count: int = VALIDATION_SAMPLES) -> list[ValidationSample]:
    chosen, identities = [], set()
    for clip in clips:
        key = clip.identity or clip.clip_id
        if key in identities:
            continue
        identities.add(key)
        aligned = Image.open(clip.faces[0].path).convert("RGB")
        prompt = clip.caption or VALIDATION_PROMPT
        chosen.append(ValidationSample(clip.clip_id, clip_input(aligned), np.asarray(aligned), prompt))
        if len(chosen) == count:
            break
    return chosen


def log_validation(
    validation: Validation, parts: FrozenParts, unet, config: TrainConfig, step: int, dtype, say
) -> dict[str, float]:
    """Generate, write (``OUT/validation/step-N/NAME.mp4``, ``scores.json``) and score every sample; returns
    the mean of each score. At the training size (tiny sizes in tiny mode) and the run's seed."""
    from ..eval.motion import motion_scores
    from ..request import GenerationRequest
    from ..video import write_mp4

    if validation.pipe is None:
        from ..models import BackboneParts, assemble_pipeline
        from ..pipeline import IDAnimatorPipeline

        backbone = BackboneParts(None, parts.vae, parts.text_encoder, parts.tokenizer)
        pipe = assemble_pipeline(backbone, unet, parts.image_encoder)
        pipe.set_progress_bar_config(disable=True)
        validation.pipe = IDAnimatorPipeline(pipe, dtype=dtype)
    if not validation.scorers_loaded:  # warnings are said once
        from ..eval.runner import EvalOptions, load_models

        options = EvalOptions(metrics=("FaceSim-Arc", "FaceSim-dlib"), detector="auto")
        models = load_models(options, "cpu", lambda line: say(f"validation: {line}"))
        identity = models.identity if models.identity is not None and models.identity.embedders else None
        validation.identity, validation.scorers_loaded = identity, True
    pipe, identity = validation.pipe, validation.identity
    folder = ensure_folder(Path(config.out) / "validation" / f"step-{step:06d}")
    size = 64 if config.tiny else config.size
    frames = min(config.frames, 8) if config.tiny else config.frames
    rows = {}
    try:
        for sample in validation.samples:
            request = GenerationRequest(
                prompt=sample.prompt,
                num_frames=frames,
                num_inference_steps=config.validation_steps,
                height=size,
                width=size,
                seed=config.seed,
                fps=VALIDATION_FPS,
            ).validate()
            with torch.no_grad():
                result = pipe.denoise([sample.face], request)
                video = pipe.decode(result.latents)
            write_mp4(video, folder / f"{sample.name}.mp4", fps=request.fps)
            pixels = np.clip(np.rint(video * 255), 0, 255).astype(np.uint8)
            scores = motion_scores(pixels, request.fps)
            if identity is not None:
                reference = identity.reference(sample.reference)
                if reference is not None:
                    scores.update(identity.score_video(pixels, reference).scores)
            rows[sample.name] = {"prompt": sample.prompt, **scores}
    finally:
        pipe.pipe.set_ip_adapter_scale(1.0)  # training runs the face attention at full scale
    (folder / "scores.json").write_text(json.dumps(rows, indent=2))
    keys = sorted({k for row in rows.values() for k, v in row.items() if isinstance(v, float)})
    return {k: float(np.mean([row[k] for row in rows.values() if k in row])) for k in keys}
