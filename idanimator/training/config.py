"""Every training setting, its default and its check, defined once (the `train` command's flags are built
from :data:`OPTIONS`).

Defaults follow what is known of the release's training: AnimateDiff-style clips (16 frames, stride 4,
512x512) and IP-Adapter's optimiser and condition dropout (AdamW, lr 1e-4, weight decay 0.01; text, face
and both dropped 5 % of the time each).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..errors import IDAnimatorError, InvalidRequestError

MIXED_PRECISION = ("no", "fp16", "bf16")
ID_LOSS_TIMESTEP_WEIGHTS = ("none", "one-minus-t-squared")  # the identity loss's weighting of a step's timestep
MAX_FRAMES = 32  # the motion module's positional encoding holds 32 frames
# A run's output folder (here, not in checkpoints.py or loop.py, so the CLI checks it before importing torch).
CHECKPOINTS = "checkpoints"
OFFICIAL_FILE = "animator.ckpt"
LOG_FILE = "log.jsonl"
STATE_FILE = "state.pt"  # a checkpoint's training state (complete checkpoints have one)
CONFIG_FILE = "config.json"  # the run's settings, in OUT/ and in every checkpoint
VALIDATION_SAMPLES = 2  # held-out identities (validation faces) by default when --validate-every is on
STEP_FOLDER = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    init_adapter: str | None = None  # None: the tiny kit's adapter with --tiny, else a fresh adapter
    backbone: str | None = None  # a registry name, Hub id or path; None: the release's
    motion_adapter: str | None = None
    image_encoder: str | None = None
    frames: int = 16
    stride: int = 4  # source frames between two sampled frames (shortened for a clip too short for it)
    size: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    batch: int = 1  # clips per process and micro-step
    grad_accum: int = 1
    max_steps: int = 10000  # optimiser steps
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None  # None: accelerate's (its launcher's flag or config file, else "no")
    gradient_checkpointing: bool = False
    seed: int = 42
    save_every: int = 1000
    validate_every: int = 0  # 0: no validation videos
    validation_steps: int = 25  # denoising steps of a validation video
    # Identities (clips where the manifest has none) held out of training for the validation videos; None:
    # VALIDATION_SAMPLES with --validate-every, else 0 (resolved by validate(), so a run records a number).
    val_clips: int | None = None
    num_references: int = 1  # reference faces averaged per clip (as inference averages several photos)
    lora_rank: int = 128  # the release's; a file given to --init-adapter with a LoRA sets its own
    drop_text: float = 0.05
    drop_face: float = 0.05
    drop_both: float = 0.05
    # The identity-preserving loss (training/identity_loss.py): off until its weight is measured on a GPU.
    id_loss_weight: float = 0.0
    id_loss_model: str | None = None  # an arcface_torch iresnet backbone.pth; None: the tiny one with --tiny
    id_loss_frames: int = 2  # frames per clip decoded for it
    id_loss_timestep_weight: str = "one-minus-t-squared"
    workers: int = 4
    resume: str | None = None  # "latest" (in --out) or a checkpoint folder
    tiny: bool = False

    def validate(self) -> TrainConfig:
        """Return the checked config; a bad value or path raises one sentence naming it.

        Cheap (no torch): the CLI runs it before the heavy imports. ``data`` and ``out`` stay as the user gave
        them (``~`` expanded) so messages show them that way; :meth:`to_json` records them resolved.
        """
        _whole("--frames", self.frames, 1, MAX_FRAMES)
        _whole("--stride", self.stride, 1, 1000)
        _whole("--size", self.size, 64, 2048)
        if self.size % 8:
            raise InvalidRequestError(f"--size must be a multiple of 8 (the VAE's scale), not {self.size}.")
        for name in ("batch", "grad_accum", "max_steps", "save_every", "validation_steps"):
            _whole("--" + name.replace("_", "-"), getattr(self, name), 1, 10**9)
        for name in ("validate_every", "warmup_steps"):
            _whole("--" + name.replace("_", "-"), getattr(self, name), 0, 10**9)
        _whole("--workers", self.workers, 0, 256)
        _whole("--num-references", self.num_references, 1, 64)
        self._check_id_loss()
        _whole("--lora-rank", self.lora_rank, 1, 4096)
        _whole("--seed", self.seed, 0, 2**32 - 1)
        if not (math.isfinite(self.lr) and 0 < self.lr < 1):
            raise InvalidRequestError(f"--lr must be a learning rate between 0 and 1, not {self.lr}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidRequestError(f"--weight-decay must be 0 or more, not {self.weight_decay}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise InvalidRequestError(f"--max-grad-norm must be more than 0, not {self.max_grad_norm}.")
        drops = (self.drop_text, self.drop_face, self.drop_both)
        if any(not (0 <= p <= 1) for p in drops) or sum(drops) > 1:
            raise InvalidRequestError("The dropout rates must each be between 0 and 1, and add up to at most 1.")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise InvalidRequestError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}.")
        val_clips = self.val_clips
        if val_clips is None:
            val_clips = VALIDATION_SAMPLES if self.validate_every else 0
        _whole("--val-clips", val_clips, 0, 10**6)
        config = replace(self, data=Path(self.data).expanduser(), out=Path(self.out).expanduser(), val_clips=val_clips)
        config.check_paths()
        return config

    def _check_id_loss(self) -> None:
        if not (math.isfinite(self.id_loss_weight) and self.id_loss_weight >= 0):
            raise InvalidRequestError(f"--id-loss-weight must be 0 (off) or more, not {self.id_loss_weight}.")
        _whole("--id-loss-frames", self.id_loss_frames, 1, MAX_FRAMES)  # a clip of fewer frames uses them all
        if self.id_loss_timestep_weight not in ID_LOSS_TIMESTEP_WEIGHTS:
            choices = ", ".join(ID_LOSS_TIMESTEP_WEIGHTS)
            raise InvalidRequestError(f"--id-loss-timestep-weight must be one of {choices}.")
        if self.id_loss_weight > 0 and self.id_loss_model is None and not self.tiny:
            raise InvalidRequestError(
                "--id-loss-weight needs --id-loss-model: an ArcFace iresnet from insightface's arcface_torch "
                "(its backbone.pth, e.g. an IR-100)."
            )
        if self.id_loss_model is not None and not Path(self.id_loss_model).expanduser().is_file():
            problem = f"--id-loss-model {self.id_loss_model} does not exist"
            raise IDAnimatorError(f"{problem}; give an arcface_torch backbone.pth.")

    def check_paths(self) -> None:
        """--data is a folder; --out is a folder (or nothing yet) and holds no run unless --resume is given.
        (Whether --data holds a manifest is checked by the train command, and by :func:`.data.load_clips`.)"""
        data, out = Path(self.data), Path(self.out)
        if not data.is_dir():
            raise IDAnimatorError(f"The data set folder {data} does not exist; give the --out of `build-dataset`.")
        if out.exists() and not out.is_dir():
            raise IDAnimatorError(f"--out {out} is a file; give a folder for the run.")
        if self.resume not in (None, "latest") and not Path(self.resume).expanduser().exists():
            raise IDAnimatorError(f"--resume {self.resume} does not exist; give a run's --out folder or a checkpoint.")
        if self.resume is None and holds_run(out):
            raise IDAnimatorError(f"A run is already in {out}: add --resume or choose another --out.")

    @property
    def samples_per_step(self) -> int:
        """Clips one process reads per optimiser step."""
        return self.batch * self.grad_accum

    def to_json(self) -> str:
        values = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(values, indent=2, sort_keys=True)


# What a resumed run must share with the run that saved the checkpoint: the data stream and its random draws
# (the held-out validation clips included), the optimiser settings (the checkpoint's would silently win) and
# the models the adapter's shapes depend on. --max-steps may grow; precision may change.
SAME_ON_RESUME = (
    "tiny",
    "val_clips",
    "frames",
    "stride",
    "size",
    "batch",
    "grad_accum",
    "seed",
    "num_references",
    "drop_text",
    "drop_face",
    "drop_both",
    "lr",
    "weight_decay",
    "warmup_steps",
)


# Read only when a run starts: a resumed run keeps the checkpoint's adapter, so giving these is a conflict too.
CHECKPOINT_DECIDES = ("init_adapter", "lora_rank")


def resume_mismatch(saved: dict, config: TrainConfig, names=SAME_ON_RESUME) -> str | None:
    """Every setting of ``names`` that differs from the checkpoint's run, in one sentence; None when all agree.
    (A setting the saved run did not record is not compared.)"""
    differ = [name for name in names if name in saved and saved[name] != getattr(config, name)]
    if not differ:
        return None
    trained = " and ".join(_flag(name, saved[name]) for name in differ)
    given = " and ".join(_flag(name, getattr(config, name)) for name in differ)
    return (
        f"The checkpoint was trained with {trained}, this run has {given}; resume with the checkpoint's "
        "settings (leave these flags out to use them)."
    )


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {'(default)' if value is None else value}"


def checkpoints_in(out: Path) -> list[Path]:
    """The complete checkpoints under ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_FOLDER.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(STEP_FOLDER.match(Path(folder).name).group(1))


def find_resume(spec: str, out: Path) -> Path:
    """``--resume``: "latest" (the newest checkpoint under --out), a run's output folder or one checkpoint."""
    path = Path(out).expanduser() if spec == "latest" else Path(spec).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise IDAnimatorError(f"There is no checkpoint in {path} to resume from (looked for {CHECKPOINTS}/step-*/).")
    return found[-1]


def config_from_flags(args) -> TrainConfig:
    """The `train` command's checked settings: the flags given (an option left out is None), then, with
    --resume, the checkpoint's run's settings, then :class:`TrainConfig`'s defaults. A resumed run refuses, in
    one sentence naming them all, given flags that differ from what it must share with the checkpoint's run.
    Cheap (json, no torch): the CLI runs it before the heavy imports."""
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if given.get("resume") is None:
        if "data" not in given:
            raise InvalidRequestError("--data is required to start a run (the --out folder of `build-dataset`).")
        return TrainConfig(**given).validate()
    resume = given["resume"]
    if resume != "latest" and not Path(resume).expanduser().exists():
        raise IDAnimatorError(f"--resume {resume} does not exist; give a run's --out folder or a checkpoint.")
    saved = saved_config(find_resume(resume, given["out"]))
    # A damaged config.json is reported by the train command, with the checkpoint to go back to.
    saved = {} if saved is None else {k: v for k, v in saved.items() if k in names - {"out", "resume"}}
    saved.setdefault("val_clips", 0)  # runs saved before held-out validation clips trained on every clip
    if "data" in saved:
        saved["data"] = Path(saved["data"])
    elif "data" not in given:
        raise InvalidRequestError("--data is required: the checkpoint does not record its data set.")
    problem = resume_mismatch(saved, TrainConfig(**{**saved, **given}), (*SAME_ON_RESUME, *CHECKPOINT_DECIDES))
    if problem:
        raise IDAnimatorError(problem)
    return TrainConfig(**{**saved, **given}).validate()


def saved_config(folder: Path) -> dict | None:
    """A checkpoint's (or a run's) ``config.json``, or None when it is missing or unreadable."""
    try:
        saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a training run's results (a checkpoint, the final adapter or a step log), which a
    new run there would overwrite. A folder with only a ``config.json`` (a run stopped before its first step)
    does not count."""
    out = Path(out)
    checkpoints = out / CHECKPOINTS
    if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
        return True
    log = out / LOG_FILE
    return (out / OFFICIAL_FILE).exists() or (log.is_file() and log.stat().st_size > 0)


def _whole(flag: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{flag} must be a whole number from {low} to {high}, not {value!r}.")


# The `train` command's options besides --data, --out and --resume: (field, type, help); bool: an on switch.
# Defaults come from TrainConfig, or with --resume from the checkpoint's run (the flags' own default is None).
OPTIONS = (
    (
        "init_adapter",
        str,
        "ip-adapter-plus-face, an IP-Adapter-Plus-Face file, animator.ckpt or .safetensors "
        "(path or Hub file); default: a new adapter (the tiny kit's with --tiny)",
    ),
    ("backbone", str, "SD1.5 backbone: a registry name, Hub id or local folder/file (default: the release's)"),
    ("motion_adapter", str, "diffusers MotionAdapter folder or Hub id (default: AnimateDiff v2)"),
    ("image_encoder", str, "CLIP vision folder or Hub id (default: IP-Adapter's ViT-H/14)"),
    ("frames", int, "frames per training clip (at most 32)"),
    ("stride", int, "source frames between two sampled frames"),
    ("size", int, "square training size in pixels (resize, then centre crop)"),
    ("lr", float, "AdamW learning rate"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup_steps", int, "linear learning-rate warm-up, in optimiser steps"),
    ("batch", int, "clips per GPU and micro-step"),
    ("grad_accum", int, "micro-steps per optimiser step"),
    ("max_steps", int, "optimiser steps to train for (in all, a resumed run included)"),
    ("max_grad_norm", float, "gradient clipping norm"),
    ("seed", int, "decides every random draw: clip order, frames, references, dropout, noise"),
    ("save_every", int, "save a checkpoint every N steps (and at the end)"),
    ("validate_every", int, "make validation videos every N steps (0: never)"),
    ("validation_steps", int, "denoising steps of a validation video"),
    (
        "val_clips",
        int,
        "identities (clips, without identities in the manifest) held out of training for the validation videos; "
        f"default: {VALIDATION_SAMPLES} with --validate-every, else 0",
    ),
    ("num_references", int, "reference faces averaged per clip"),
    ("lora_rank", int, "rank of a new LoRA (an --init-adapter with a LoRA keeps its own)"),
    ("drop_text", float, "share of clips trained without their caption"),
    ("drop_face", float, "share of clips trained without their face (zeros into CLIP, as at inference)"),
    ("drop_both", float, "share of clips trained without either"),
    (
        "id_loss_weight",
        float,
        "weight of the identity-preserving loss, 1 - cos of ArcFace embeddings of the reference and the predicted "
        "clean frames (default: 0, off)",
    ),
    ("id_loss_model", str, "the identity loss's ArcFace: an arcface_torch iresnet backbone.pth (--tiny: a tiny one)"),
    ("id_loss_frames", int, "frames per clip the identity loss decodes (their landmarks are found by the data loader)"),
    ("id_loss_timestep_weight", str, "the identity loss's weight per timestep: none or one-minus-t-squared"),
    ("workers", int, "data-loading processes per GPU"),
    (
        "mixed_precision",
        str,
        "no, fp16 (CUDA only) or bf16; the adapter's weights stay float32. Default: accelerate's (`accelerate "
        "launch --mixed_precision` or its config file), else no",
    ),
    ("gradient_checkpointing", bool, "recompute activations in the backward pass: less memory, slower"),
    ("tiny", bool, "the tiny random model kit (offline smoke test)"),
)
