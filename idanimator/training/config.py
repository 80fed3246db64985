"""Every training setting, its default and its check, defined once (the `train` command's flags are built
from :data:`OPTIONS`).

Defaults follow what is known of the release's training: AnimateDiff-style clips (16 frames, stride 4,
512x512) and IP-Adapter's optimiser and condition dropout (AdamW, lr 1e-4, weight decay 0.01; text, face
and both dropped 5 % of the time each).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..errors import IDAnimatorError, InvalidRequestError

MIXED_PRECISION = ("no", "fp16", "bf16")
MAX_FRAMES = 32  # the motion module's positional encoding holds 32 frames
# A run's output folder (here, not in checkpoints.py or loop.py, so the CLI checks it before importing torch).
CHECKPOINTS = "checkpoints"
OFFICIAL_FILE = "animator.ckpt"
LOG_FILE = "log.jsonl"


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
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    save_every: int = 1000
    validate_every: int = 0  # 0: no validation videos
    validation_steps: int = 25  # denoising steps of a validation video
    num_references: int = 1  # reference faces averaged per clip (as inference averages several photos)
    lora_rank: int = 128  # the release's; a file given to --init-adapter with a LoRA sets its own
    drop_text: float = 0.05
    drop_face: float = 0.05
    drop_both: float = 0.05
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
        if self.mixed_precision not in MIXED_PRECISION:
            raise InvalidRequestError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}.")
        config = replace(self, data=Path(self.data).expanduser(), out=Path(self.out).expanduser())
        config.check_paths()
        return config

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

    @classmethod
    def from_namespace(cls, args) -> TrainConfig:
        """The settings named like this class's fields, read from parsed arguments."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


# What a resumed run must share with the run that saved the checkpoint: the data stream and its random draws,
# and the optimiser settings (the checkpoint's would silently win). --max-steps may grow; precision may change.
SAME_ON_RESUME = (
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


def resume_mismatch(saved: dict, config: TrainConfig) -> str | None:
    """The first setting that differs from the checkpoint's run, as a sentence; None when all agree."""
    for name in SAME_ON_RESUME:
        if name in saved and saved[name] != getattr(config, name):
            flag = "--" + name.replace("_", "-")
            return (
                f"The checkpoint was trained with {flag} {saved[name]}, this run has {getattr(config, name)}; "
                "resume with the same settings."
            )
    return None


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
# Defaults come from TrainConfig.
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
    ("num_references", int, "reference faces averaged per clip"),
    ("lora_rank", int, "rank of a new LoRA (an --init-adapter with a LoRA keeps its own)"),
    ("drop_text", float, "share of clips trained without their caption"),
    ("drop_face", float, "share of clips trained without their face (zeros into CLIP, as at inference)"),
    ("drop_both", float, "share of clips trained without either"),
    ("workers", int, "data-loading processes per GPU"),
    ("mixed_precision", str, "no, fp16 or bf16 (the adapter's weights stay float32)"),
    ("gradient_checkpointing", bool, "recompute activations in the backward pass: less memory, slower"),
    ("tiny", bool, "the tiny random model kit (offline smoke test)"),
)
