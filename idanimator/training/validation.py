"""Validation videos during training: fixed faces and prompts, generated with the model being trained.

The faces are the first face of the first clips of different identities, the prompts their captions, and
the seed the run's: the same videos at every validation, so they show what training changed. They are made
by the inference pipeline on the training UNet itself (its LoRA computed beside the frozen weights, which
equals the fused LoRA of inference), written as ``OUT/validation/step-N/NAME.mp4``, and scored with the
``eval`` metrics whose models are at hand (motion always; face similarity when a face embedder loads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import ensure_folder
from .data import Clip, clip_input

SAMPLES = 2
FPS = 9  # the release's export rate
DEFAULT_PROMPT = "a person"


@dataclass
class ValidationSample:
    name: str
    face: Image.Image  # the CLIP input (224 x 224)
    reference: np.ndarray  # the aligned crop as RGB, for face similarity
    prompt: str


def pick_samples(clips: list[Clip], count: int = SAMPLES) -> list[ValidationSample]:
    chosen, identities = [], set()
    for clip in clips:
        key = clip.identity or clip.clip_id
        if key in identities:
            continue
        identities.add(key)
        aligned = Image.open(clip.faces[0].path).convert("RGB")
        prompt = clip.caption or DEFAULT_PROMPT
        chosen.append(ValidationSample(clip.clip_id, clip_input(aligned), np.asarray(aligned), prompt))
        if len(chosen) == count:
            break
    return chosen


class Validator:
    """Makes and scores the validation videos (on the main process)."""

    def __init__(self, parts, samples: list[ValidationSample], out: Path, settings, say):
        self.parts, self.samples, self.out, self.settings, self.say = parts, samples, Path(out), settings, say
        self._pipe = None
        self._scorers = None

    def pipeline(self, unet, dtype):
        if self._pipe is None:
            from ..models import BackboneParts, assemble_pipeline
            from ..pipeline import IDAnimatorPipeline

            p = self.parts
            pipe = assemble_pipeline(BackboneParts(None, p.vae, p.text_encoder, p.tokenizer), unet, p.image_encoder)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = IDAnimatorPipeline(pipe, dtype=dtype)
        return self._pipe

    def scorers(self):
        """The identity scorer (or None) from the eval models that load here; warnings are said once."""
        if self._scorers is None:
            from ..eval.runner import EvalOptions, load_models

            options = EvalOptions(metrics=("FaceSim-Arc", "FaceSim-dlib"), detector="auto")
            models = load_models(options, "cpu", lambda line: self.say(f"validation: {line}"))
            identity = models.identity if models.identity is not None and models.identity.embedders else None
            self._scorers = {"identity": identity}
        return self._scorers["identity"]

    def run(self, unet, step: int, dtype) -> dict[str, float]:
        """Generate, write and score every sample; returns the mean of each score."""
        import torch

        from ..eval.motion import motion_scores
        from ..video import write_mp4

        pipe = self.pipeline(unet, dtype)
        folder = ensure_folder(self.out / "validation" / f"step-{step:06d}")
        identity = self.scorers()
        rows = {}
        try:
            for sample in self.samples:
                settings = self.settings(sample.prompt)
                with torch.no_grad():
                    result = pipe.denoise([sample.face], settings)
                    frames = pipe.decode(result.latents)
                write_mp4(frames, folder / f"{sample.name}.mp4", fps=FPS)
                video = np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)
                scores = motion_scores(video, FPS)
                if identity is not None:
                    reference = identity.reference(sample.reference)
                    if reference is not None:
                        scores.update(identity.score_video(video, reference).scores)
                rows[sample.name] = {"prompt": sample.prompt, **scores}
        finally:
            pipe.pipe.set_ip_adapter_scale(1.0)  # training runs the face attention at full scale
        (folder / "scores.json").write_text(json.dumps(rows, indent=2))
        keys = sorted({k for row in rows.values() for k, v in row.items() if isinstance(v, float)})
        return {k: float(np.mean([row[k] for row in rows.values() if k in row])) for k in keys}
