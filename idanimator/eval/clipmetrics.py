"""CLIP ViT-B/32 metrics: CLIPScore (prompt following), CLIP-Temporal (smoothness), CLIPDist (copy-paste).

- CLIPScore: 100 x cosine between the prompt's CLIP text embedding (truncated to 77 tokens) and each of 16
  frames' image embeddings, averaged (ConsisID's ``logits_per_image`` with CLIP's learned scale of 100; we
  fix the 100 and feed RGB frames, where ConsisID's script passed OpenCV's BGR frames).
- CLIP-Temporal: mean cosine of consecutive frames' image embeddings over every frame of the video.
- CLIPDist: 1 - cosine between the reference photo's image embedding and each of the 16 frames', averaged:
  low means the video looks like the photo pasted in, high that it moved away from it.

The model is ``openai/clip-vit-base-patch32`` from the Hugging Face cache (downloaded when the Hub can be
reached) or a folder in the transformers layout given with ``--clip``. Images go through transformers' PIL
CLIP image processor, so torchvision (which breaks diffusers here) is never needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import IDAnimatorError, ModelUnavailableError
from ..registry import EVAL_CLIP as CLIP_SOURCE
from .reader import strided

CLIP_REPO = CLIP_SOURCE.repo_id
BATCH = 32


def check_clip_folder(path: str | Path) -> Path:
    """A user-given model folder must exist and hold a transformers config (a typo is a user error)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise IDAnimatorError(f"The CLIP model folder {path} does not exist.")
    if not (path / "config.json").is_file():
        raise IDAnimatorError(f"The folder {path} holds no config.json; give a CLIP model saved by transformers.")
    return path


def find_clip_model(path: str | Path | None = None) -> Path:
    """The folder of the CLIP model to use; ModelUnavailableError says why there is none."""
    if path is not None:
        return check_clip_folder(path)
    from ..weights import hub_reachable, is_cached, offline_mode, resolve

    if not is_cached(CLIP_SOURCE) and not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline_mode() else "the Hugging Face Hub cannot be reached"
        raise ModelUnavailableError(
            f"{CLIP_REPO} is not in the Hugging Face cache and {why}: download it where there is internet "
            f"(hf download {CLIP_REPO}) or pass --clip FOLDER"
        )
    try:
        return resolve(CLIP_SOURCE, what="CLIP model")
    except IDAnimatorError as exc:
        raise ModelUnavailableError(f"{CLIP_REPO} could not be downloaded ({exc})") from exc


def _features(output):
    """transformers 5 returns an output object whose pooler_output is the projected embedding; 4 a tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


class ClipScorer:
    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        folder = find_clip_model(path)
        try:
            from transformers import CLIPModel, CLIPTokenizer
            from transformers.utils import logging

            from ..images import clip_image_processor

            bars = logging.is_progress_bar_enabled()
            logging.disable_progress_bar()  # the evaluation's own progress bar is the one to watch
            try:
                self.model = CLIPModel.from_pretrained(folder).to(device).eval()
                self.tokenizer = CLIPTokenizer.from_pretrained(folder)
                self.processor = clip_image_processor(folder)
            finally:
                if bars:
                    logging.enable_progress_bar()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelUnavailableError(f"the CLIP model in {folder} could not be loaded ({first[:160]})") from exc
        self.device = device
        self.description = f"{CLIP_REPO} (Hugging Face cache)" if path is None else f"CLIP model from {folder}"

    def images(self, frames) -> np.ndarray:
        """Unit-length image embeddings, (n, d)."""
        import torch

        out = []
        for start in range(0, len(frames), BATCH):
            batch = [np.asarray(f, dtype=np.uint8) for f in frames[start : start + BATCH]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.no_grad():
                emb = _features(self.model.get_image_features(pixel_values=pixels)).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out)

    def text(self, prompt: str) -> np.ndarray:
        import torch

        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            emb = _features(self.model.get_text_features(**tokens.to(self.device))).float()
        return torch.nn.functional.normalize(emb, dim=-1)[0].cpu().numpy()

    def scores(self, frames: np.ndarray, reference: np.ndarray | None, prompt: str | None) -> dict[str, float | None]:
        """CLIPScore (None without a prompt), CLIP-Temporal and CLIPDist (None without a reference)."""
        every = self.images(frames)
        sampled = every[strided(len(frames))]
        temporal = float(np.mean(np.sum(every[1:] * every[:-1], axis=1))) if len(every) > 1 else 1.0
        score = float(100.0 * np.mean(sampled @ self.text(prompt))) if prompt else None
        dist = None
        if reference is not None:
            dist = float(np.mean(1.0 - sampled @ self.images([reference])[0]))
        return {"CLIPScore": score, "CLIP-Temporal": temporal, "CLIPDist": dist}
