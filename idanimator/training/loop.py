"""The training loop on accelerate: ``python -m idanimator train`` (or ``accelerate launch -m idanimator train``).

Read top to bottom: cheap checks (dataset, resume folder, initial adapter), the frozen parts, the trainable
adapter, optimiser and LR schedule through ``accelerator.prepare``, an optional resume, then the loop:
micro-steps under ``accelerator.accumulate``, and after each optimiser step logging (TensorBoard through
accelerate's tracker, ``OUT/log.jsonl``, a tqdm bar), checkpoints and validation videos.

Each process reads its own share of the clip stream (:class:`~.data.ClipStream`); the data loader is not
prepared by accelerate, so the stream, and with it every sample, depends only on the seed and the step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IDAnimatorError
from ..files import ensure_folder
from . import checkpoints as ckpt
from .config import LOG_FILE, TrainConfig, resume_mismatch
from .data import ClipDataset, ClipStream, Dropout, collate, load_clips, stride_note
from .init import read_initial_adapter
from .modules import FaceAdapterTrainingModel, TrainableFaceAdapter
from .objective import diffusion_loss, micro_step_generator
from .parts import load_frozen_parts

TRACKER_RUN = "train"


@dataclass
class TrainResult:
    step: int
    adapter: Path  # the final animator.ckpt
    loss: float | None  # the last step's


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _settings_for(config: TrainConfig):
    """Validation generation settings: the training size (tiny sizes in tiny mode), the run's seed."""
    from ..settings import GenerationSettings

    size = 64 if config.tiny else config.size
    frames = min(config.frames, 8) if config.tiny else config.frames

    def settings(prompt: str) -> GenerationSettings:
        return GenerationSettings(
            prompt=prompt, num_frames=frames, steps=config.validation_steps, height=size, width=size, seed=config.seed
        ).validate()

    return settings


def build_dataset(config: TrainConfig, clips, feature_extractor) -> ClipDataset:
    return ClipDataset(
        clips,
        frames=config.frames,
        stride=config.stride,
        size=config.size,
        num_references=config.num_references,
        dropout=Dropout(config.drop_text, config.drop_face, config.drop_both),
        seed=config.seed,
        feature_extractor=feature_extractor,
    )


def train(config: TrainConfig, say=print) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_constant_schedule_with_warmup
    from tqdm.auto import tqdm

    config = config.validate()
    # Cheap checks first: a bad dataset, resume folder or initial adapter is reported before any model loads.
    clips, skipped = load_clips(config.data, config.frames)
    resume_from = ckpt.find_resume(config.resume, config.out) if config.resume else None
    if resume_from is not None:  # the checkpoint holds the whole adapter: --init-adapter is not read
        resumed_weights, resumed_state, resumed_config = ckpt.read_checkpoint(resume_from)
        problem = resume_mismatch(resumed_config, config)
        if problem:
            raise IDAnimatorError(problem)
    else:
        initial = read_initial_adapter(config.init_adapter, _tiny_adapter(config))

    out = config.out.resolve()  # paths as given are for messages; accelerate and TensorBoard get absolute ones
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    main = accelerator.is_main_process
    say = say if main else (lambda line: None)
    if main:
        ensure_folder(config.out)
        (config.out / "config.json").write_text(config.to_json())
    for note in (skipped, stride_note(clips, config.frames, config.stride)):
        if note:
            say(f"note: {note}")
    start = initial.description if resume_from is None else f"{resume_from} (step {resumed_state['step']})"
    say(f"training on {len(clips)} clips; starting from {start}")

    parts = load_frozen_parts(
        config.backbone, motion_adapter=config.motion_adapter, image_encoder=config.image_encoder, tiny=config.tiny
    )
    dtype, device = _weight_dtype(config.mixed_precision), accelerator.device
    if resume_from is not None:
        weights = resumed_weights
    else:
        weights = initial.complete(parts.unet, parts.image_encoder.config.hidden_size, config.lora_rank, config.seed)
    adapter = TrainableFaceAdapter.from_weights(weights, parts.unet)
    parts.freeze(device, dtype)
    if config.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    model = FaceAdapterTrainingModel(parts.unet, adapter.to(device))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # accelerate steps a prepared schedule once per process per optimiser step: count warm-up likewise.
    schedule = get_constant_schedule_with_warmup(optimizer, config.warmup_steps * accelerator.num_processes)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)

    step = 0
    if resume_from is not None:
        step = _restore(accelerator, optimizer, schedule, resume_from, resumed_state)
    loader = _loader(config, clips, parts.feature_extractor, accelerator, start=step * config.samples_per_step)
    validator = None
    if config.validate_every and main:
        from .validation import Validator, pick_samples

        validator = Validator(parts, pick_samples(clips), config.out, _settings_for(config), say)

    hyperparameters = {k: v for k, v in json.loads(config.to_json()).items() if v is not None}
    accelerator.init_trackers(TRACKER_RUN, config=hyperparameters)
    log = _Log(config.out / LOG_FILE, step) if main else None
    progress = tqdm(total=config.max_steps, initial=step, desc="training", disable=not main, dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, loss_value = [], None
    batches = iter(loader)
    while step < config.max_steps:
        batch = next(batches)
        micro = step * config.grad_accum + len(losses)
        generator = micro_step_generator(config.seed, micro, accelerator.process_index)
        with accelerator.accumulate(model):
            loss = diffusion_loss(model, parts, batch, generator, device, dtype)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if not accelerator.sync_gradients:
            continue
        step += 1
        loss_value = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
        losses = []
        if not math.isfinite(loss_value):
            raise IDAnimatorError(f"The loss became {loss_value} at step {step}; lower --lr or use bf16 over fp16.")
        lr = schedule.get_last_lr()[0]
        accelerator.log({"train/loss": loss_value, "train/lr": lr}, step=step)
        if main:
            log.write({"step": step, "loss": loss_value, "lr": lr})
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if step % config.save_every == 0 or step == config.max_steps:
            _save(accelerator, model, optimizer, schedule, config, step)
        if config.validate_every and step % config.validate_every == 0:
            if validator is not None:  # the main process makes the videos; the others wait for it
                with accelerator.autocast():
                    scores = validator.run(accelerator.unwrap_model(model).unet, step, dtype)
                accelerator.log({f"validation/{k}": v for k, v in scores.items()}, step=step)
                log.write({"step": step, "validation": scores})
            accelerator.wait_for_everyone()
    progress.close()

    adapter_path = config.out / ckpt.OFFICIAL_FILE
    if main:  # the run's result beside its checkpoints (the resumed weights when nothing was left to train)
        ckpt.save_adapter(accelerator.unwrap_model(model).adapter.to_weights(), config.out)
    accelerator.end_training()
    say(f"step {step}: loss {'n/a' if loss_value is None else format(loss_value, '.4g')}; wrote {adapter_path}")
    return TrainResult(step=step, adapter=adapter_path, loss=loss_value)


def _restore(accelerator, optimizer, schedule, folder: Path, state: dict) -> int:
    """Put a checkpoint's optimiser, LR schedule, gradient scaler and random states back; returns its step.
    (The adapter was built from the checkpoint's weights.)"""
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(folder, accelerator.process_index)
    return state["step"]


def _loader(config: TrainConfig, clips, feature_extractor, accelerator, start: int):
    """This process's share of the clip stream, after the ``start`` samples it has already read."""
    rank, world = accelerator.process_index, accelerator.num_processes
    return torch.utils.data.DataLoader(
        build_dataset(config, clips, feature_extractor),
        batch_size=config.batch,
        sampler=ClipStream(len(clips), config.seed, rank=rank, world=world, start=start),
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=accelerator.device.type == "cuda",
    )


def _tiny_adapter(config: TrainConfig) -> Path | None:
    if not config.tiny or config.init_adapter is not None:
        return None
    from ..testing.kit import build_tiny_kit, default_tiny_dir

    return build_tiny_kit(default_tiny_dir())["face_adapter"]


def _save(accelerator, model, optimizer, schedule, config: TrainConfig, step: int) -> Path:
    """A checkpoint of this step (every process writes its random states; the main process the rest)."""
    folder = ckpt.checkpoint_folder(config.out, step)
    partial = ckpt.partial_folder(folder)
    if accelerator.is_main_process:
        ckpt.start_checkpoint(folder)
    accelerator.wait_for_everyone()
    ckpt.write_rng_state(partial, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "samples_per_process": step * config.samples_per_step,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": schedule.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        weights = accelerator.unwrap_model(model).adapter.to_weights()
        ckpt.finish_checkpoint(partial, folder, weights, state, config.to_json())
    accelerator.wait_for_everyone()
    return folder


class _Log:
    """``OUT/log.jsonl``: one JSON object per step; a resumed run first drops the lines after its step."""

    def __init__(self, path: Path, step: int):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
