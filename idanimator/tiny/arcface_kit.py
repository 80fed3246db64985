"""A tiny random ArcFace for tiny mode's identity loss, saved as arcface_torch saves its ``backbone.pth``.

The same state-dict names as the model zoo's iresnets (``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` ...
``fc``, ``features``, with BatchNorm's running statistics), one block per stage and narrow widths, so it loads
through exactly the code that loads a real IR-100 (:func:`idanimator.arcface.load_arcface`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arcface import IResNet
from ..files import atomic_path

ARCFACE_KIT_VERSION = 1
TINY_ARCFACE_BLOCKS = [1, 1, 1, 1]
TINY_ARCFACE_WIDTHS = [8, 8, 16, 16]
TINY_ARCFACE_EMBEDDING = 32


def tiny_arcface_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random iresnet's tensors. Its BatchNorm statistics are measured on random smooth images (as a trained
    network's fit its data), so every layer passes on differences between inputs instead of drowning them in
    its biases: different faces get clearly different embeddings."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = IResNet(TINY_ARCFACE_BLOCKS, TINY_ARCFACE_WIDTHS, stem=8, embedding=TINY_ARCFACE_EMBEDDING)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.momentum = None  # a plain average over the calibration batch
    images = torch.rand(32, 3, 7, 7, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(images, size=(112, 112), mode="bilinear", align_corners=False)
    model.train()
    with torch.no_grad():
        model(images)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.momentum = 0.1  # the default, as a model loaded from a file has
    return {k: v.clone() for k, v in model.state_dict().items()}


def default_tiny_arcface_path() -> Path:
    from .kit import default_tiny_dir

    tiny = default_tiny_dir()
    return tiny.parent / f"{tiny.name}-arcface-v{ARCFACE_KIT_VERSION}" / "backbone.pth"


def build_tiny_arcface(path: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write (once) the tiny ArcFace to ``path`` (default: beside the tiny kit) and return the path."""
    path = Path(path) if path is not None else default_tiny_arcface_path()
    if path.is_file():
        return path
    with atomic_path(path) as temp:
        torch.save(tiny_arcface_state_dict(seed), temp)
    return path
