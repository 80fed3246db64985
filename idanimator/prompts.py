"""Prompt defaults of the ID-Animator release, and fitting prompts to CLIP's 77-token window."""

from __future__ import annotations

import unicodedata

# The demo appends these; they are on by default and can be switched off per call.
PROMPT_SUFFIX = " 8k uhd, high quality, medium shot"
NEGATIVE_PROMPT_SUFFIX = " long shots, full body"

DEFAULT_NEGATIVE_PROMPT = (
    "(deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, anime), "
    "text, cropped, out of frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, "
    "mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, "
    "dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, "
    "malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers, "
    "long neck, UnrealisticDream"
)


def clean_text(text: str) -> str:
    """Drop control characters (keeping ordinary spaces) and collapse whitespace; emoji and all scripts stay."""
    kept = "".join(" " if ch in "\t\n\r" else ch for ch in text if ch in "\t\n\r" or unicodedata.category(ch)[0] != "C")
    return " ".join(kept.split())


def exceeds_tokens(text: str, tokenizer) -> bool:
    """Whether the text encoder will see only the start of ``text``.

    The text itself is never cut here: the pipeline's tokenizer truncates at the token level
    (``truncation=True, max_length=77``), exactly as in the release. Cutting the text by decoding tokens and
    encoding them again would change it (with CLIP's vocabulary a word cut in two comes back as another token).
    """
    limit = tokenizer.model_max_length - 2  # the start and end tokens
    # One token more than fits tells whether it fits, without tokenizing a huge text in full.
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit + 1).input_ids
    return len(ids) > limit
