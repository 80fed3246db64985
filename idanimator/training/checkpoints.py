"""Checkpoints of a training run: the adapter in both layouts, and the state an exact resume needs.

    OUT/checkpoints/step-000200/
        adapter.safetensors   our layout (``generate --adapter`` and ``convert-checkpoint`` read it)
        animator.ckpt         the release's layout A (what the release's own code loads)
        state.pt              step, data position, optimiser, LR schedule, gradient scaler
        rng-0.pt ...          each process's global random states (python, numpy, torch, CUDA)
        config.json           the run's settings (a resume checks them)

A checkpoint is written into a hidden sibling folder and renamed into place, so a crash never leaves a
half-written one under a step's name. Resuming restores the adapter, the optimiser, the LR schedule and
the random states, and the data stream restarts after the samples already seen: every other random draw
is a function of the seed and the step, so the resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..adapter import FaceAdapterWeights, load_face_adapter_weights, save_face_adapter_weights, save_official_checkpoint
from ..errors import IDAnimatorError
from ..files import ensure_folder
from .config import CHECKPOINTS, OFFICIAL_FILE

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_folder(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def partial_folder(folder: Path) -> Path:
    """Where a checkpoint is written before it is renamed into place (the same name for every process)."""
    return folder.parent / f".{folder.name}.partial"


def save_adapter(weights: FaceAdapterWeights, folder: Path) -> Path:
    """Both layouts into ``folder``; returns the official one's path."""
    save_face_adapter_weights(weights, folder / ADAPTER_FILE)
    return save_official_checkpoint(weights, folder / OFFICIAL_FILE)


def start_checkpoint(folder: Path) -> Path:
    """An empty partial folder for ``folder`` (main process only, before the others write into it)."""
    partial = partial_folder(folder)
    shutil.rmtree(partial, ignore_errors=True)
    ensure_folder(partial)
    return partial


def write_rng_state(partial: Path, process: int) -> None:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    key = torch.from_numpy(key.copy())
    numpy_state = {"kind": kind, "key": key, "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {
        "python": random.getstate(),
        "numpy": numpy_state,
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


def finish_checkpoint(partial: Path, folder: Path, weights: FaceAdapterWeights, state: dict, config_json: str) -> Path:
    """Write the adapter, the training state and the settings, then rename the partial folder into place."""
    save_adapter(weights, partial)
    torch.save(state, partial / STATE_FILE)
    (partial / CONFIG_FILE).write_text(config_json)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def checkpoints_in(out: Path) -> list[Path]:
    """The complete checkpoints under ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS
    found = [p for p in root.iterdir() if _STEP.match(p.name) and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=_step)


def find_resume(spec: str, out: Path) -> Path:
    """``--resume``: "latest" (the newest checkpoint under --out), a run's output folder or one checkpoint."""
    path = Path(out) if spec == "latest" else Path(spec).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise IDAnimatorError(f"There is no checkpoint in {path} to resume from (looked for {CHECKPOINTS}/step-*/).")
    return found[-1]


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
            raise IDAnimatorError(_damaged(path, folder))
    return load_face_adapter_weights(folder / ADAPTER_FILE), state, saved


def _damaged(path: Path, folder: Path) -> str:
    match = _STEP.match(folder.name)
    earlier = [c for c in checkpoints_in(folder.parent.parent) if match and _step(c) < int(match.group(1))]
    if earlier:
        return f"The checkpoint file {path} is damaged; resume from the one before it with --resume {earlier[-1]}."
    return f"The checkpoint file {path} is damaged and no earlier checkpoint exists; start again with another --out."


def _step(folder: Path) -> int:
    return int(_STEP.match(folder.name).group(1))
