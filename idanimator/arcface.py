"""ArcFace face recognition in PyTorch, and a differentiable crop onto its 5-point template.

The network is insightface's ``arcface_torch`` iresnet (IR-18/34/50/100/200, basic blocks; the model zoo's
``backbone.pth`` files): a 3x3 stem with PReLU, four stages of improved residual blocks (BN, conv, BN, PReLU,
strided conv, BN, plus a shortcut) that each halve the 112-pixel input, then BN, flatten, a linear layer and a
BatchNorm1d to the embedding (512 for the model zoo). It is written here to load those files' state-dict names
strictly (``conv1``, ``bn1``, ``prelu``, ``layerN.i.{bn1,conv1,bn2,prelu,conv2,bn3,downsample}``, ``bn2``,
``fc``, ``features``); the number of blocks per stage, the widths and the embedding size are read from the
tensors, so the same code loads a real IR-100 and the tiny kit's random one. Input: RGB in [-1, 1]
(``(pixels / 255 - 0.5) / 0.5``, as arcface_torch's own inference), 112 x 112, aligned on the template.

Only weights are read (``torch.load(weights_only=True)`` or safetensors): no pickled code runs. The model zoo's
weights are licensed for non-commercial research only.

:func:`warp_to_template` is insightface's ``norm_crop`` (a least-squares similarity transform from the 5
landmarks to the template, bilinear sampling, black outside the image) written with ``affine_grid`` and
``grid_sample``, so gradients flow back to the pixels; the landmarks are given (found on real frames, never
on generated ones).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import IDAnimatorError
from .weights import read_state_dict

ARCFACE_SIZE = 112
# insightface's ArcFace template: where the left eye, right eye, nose tip and mouth corners of a 112 x 112
# aligned face lie (x, y), in pixels ("left" = the image's left).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")
_STAGES = 4


class IBlock(nn.Module):
    """arcface_torch's IBasicBlock: bn1-conv1-bn2-prelu-conv2(stride)-bn3, plus the input (through a strided
    1x1 conv + BN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """The iresnet with ``blocks[i]`` blocks of width ``widths[i]`` in stage i (IR-50: blocks 3, 4, 14, 3;
    IR-100: 3, 13, 30, 3; widths 64, 128, 256, 512 after a 64-wide stem)."""

    def __init__(self, blocks: list[int], widths: list[int], stem: int = 64, embedding: int = 512):
        super().__init__()
        if len(blocks) != _STAGES or len(widths) != _STAGES:
            raise ValueError("an iresnet has four stages")
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        cin = stem
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True), start=1):
            units = [IBlock(cin if i == 0 else width, width, 2 if i == 0 else 1) for i in range(count)]
            self.add_module(f"layer{stage}", nn.Sequential(*units))
            cin = width
        side = ARCFACE_SIZE // 2**_STAGES  # 7
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * side * side, embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 112, 112] RGB in [-1, 1] -> [N, embedding] (not normalised)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings (cosine similarity is then a dot product)."""
        return F.normalize(self(x).float(), dim=-1)


def iresnet_from_state_dict(state: dict[str, torch.Tensor]) -> IResNet:
    """The iresnet these weights belong to, with them loaded strictly (every tensor used, none missing)."""
    counts = [0] * _STAGES
    for key in state:
        if m := _BLOCK.match(key):
            stage, index = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], index + 1)
    if not all(counts) or "conv1.weight" not in state or "fc.weight" not in state:
        raise ValueError("no conv1 / layer1-4 / fc tensors, as an arcface_torch iresnet has")
    widths = [int(state[f"layer{s}.0.conv1.weight"].shape[0]) for s in range(1, _STAGES + 1)]
    stem = int(state["conv1.weight"].shape[0])
    embedding = int(state["fc.weight"].shape[0])
    model = IResNet(counts, widths, stem=stem, embedding=embedding)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0].rstrip(":. ")
        raise ValueError(f"the tensors do not fit an iresnet ({first})") from exc
    return model.eval()


def load_arcface(path: str | Path) -> IResNet:
    """An arcface_torch iresnet from its ``backbone.pth`` (or a .safetensors of the same tensors), frozen and
    in eval mode; a missing or unsuitable file is one sentence naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise IDAnimatorError(f"The ArcFace weights {path} do not exist; give an arcface_torch backbone.pth.")
    try:
        model = iresnet_from_state_dict(read_state_dict(path))
    except ValueError as exc:
        raise IDAnimatorError(f"{path} is not an arcface_torch iresnet backbone ({exc}).") from exc
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:  # not a weights file
        raise IDAnimatorError(
            f"{path} is not an arcface_torch iresnet backbone (torch cannot read it as weights: {type(exc).__name__})."
        ) from exc
    return model.requires_grad_(False)


# -- the crop onto the template -------------------------------------------------------------------


def similarity_to_template(landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that best maps the 5 landmarks onto the template
    of a ``size``-pixel crop in the least-squares sense (Umeyama's closed form, as scikit-image's
    SimilarityTransform that insightface's ``estimate_norm`` uses)."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(covariance)
    d = np.ones(2)
    if np.linalg.det(covariance) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    variance = (src_c**2).sum() / len(src)
    scale = (s * d).sum() / variance if variance > 0 else 1.0
    shift = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, shift[:, None]], axis=1)


def _sampling_theta(matrix: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """``affine_grid``'s theta (align_corners=True: -1 and 1 are the centres of the first and last pixel) that
    samples, for each pixel of the crop, the image point ``matrix`` sends there."""
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    to_normalised = lambda w, h: np.array([[2 / (w - 1), 0, -1], [0, 2 / (h - 1), -1], [0, 0, 1]])  # noqa: E731
    theta = to_normalised(width, height) @ np.linalg.inv(forward) @ np.linalg.inv(to_normalised(size, size))
    return theta[:2]


def warp_to_template(images: torch.Tensor, landmarks, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """[N, C, H, W] images -> [N, C, size, size] faces on the ArcFace template, differentiable in ``images``.

    ``landmarks``: [N, 5, 2] (x, y) pixels in the images' coordinates (pixel i's centre at i, as OpenCV),
    e.g. found on the real frames of which ``images`` are the model's version. Equals ``norm_crop`` to
    OpenCV's interpolation rounding."""
    landmarks = np.asarray(landmarks.detach().cpu() if torch.is_tensor(landmarks) else landmarks, dtype=np.float64)
    height, width = images.shape[-2:]
    thetas = [_sampling_theta(similarity_to_template(lm, size), height, width, size) for lm in landmarks]
    theta = torch.as_tensor(np.stack(thetas), dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
