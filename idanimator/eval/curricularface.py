"""CurricularFace's face-recognition network (TFace's IR backbone), built from the shape of its weights.

ConsisID's evaluation uses ``glint360k_curricular_face_r101_backbone.bin``: an IR-101 (improved-residual
ResNet with basic blocks) whose state-dict names are those of Tencent's TFace. The network here is written
to load exactly those names; the number of blocks per stage, the widths and the input size (112 or 224) are
read from the tensors, so the same code loads the real IR-101 and the tiny one the tests save.

Only the weights are read (``torch.load(weights_only=True)`` or safetensors): no pickled code runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import IDAnimatorError
from ..weights import read_state_dict

_UNIT = re.compile(r"^body\.(\d+)\.")


class _Unit(nn.Module):
    """One basic IR block: BN-conv-BN-PReLU-conv(stride)-BN plus a shortcut (a strided 1x1 max pool when
    the width is unchanged, else a strided 1x1 conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cin == cout:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """Stem, units (each stage's first unit halves the size), then BN-dropout-flatten-linear-BN to the
    embedding. ``widths`` lists each unit's output channels."""

    def __init__(self, stem: int, widths: list[int], embedding: int, input_size: int = 112):
        super().__init__()
        self.input_size = input_size
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        units, cin = [], stem
        for index, cout in enumerate(widths):
            first_of_stage = index == 0 or cout != widths[index - 1]
            units.append(_Unit(cin, cout, 2 if first_of_stage else 1))
            cin = cout
        self.body = nn.Sequential(*units)
        stages = 1 + sum(widths[i] != widths[i - 1] for i in range(1, len(widths)))
        side = input_size // 2**stages
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(cin * side * side, embedding),
            nn.BatchNorm1d(embedding, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def build_from_state_dict(state: dict[str, torch.Tensor]) -> IRBackbone:
    """The IR network these weights belong to, with the weights loaded (strictly)."""
    units = sorted({int(m.group(1)) for key in state if (m := _UNIT.match(key))})
    if not units or f"body.{units[0]}.res_layer.1.weight" not in state or "output_layer.3.weight" not in state:
        raise ValueError("not a TFace IR backbone (no body.N.res_layer / output_layer.3 tensors)")
    widths = [int(state[f"body.{i}.res_layer.1.weight"].shape[0]) for i in units]
    if f"body.{units[0]}.res_layer.6.weight" in state:  # bottleneck (IR-152/200) or SE units
        raise ValueError("only IR backbones with basic blocks (IR-18/34/50/100) are supported")
    stem = int(state["input_layer.0.weight"].shape[0])
    embedding, flat = (int(n) for n in state["output_layer.3.weight"].shape)
    side = round((flat / widths[-1]) ** 0.5)
    stages = 1 + sum(widths[i] != widths[i - 1] for i in range(1, len(widths)))
    model = IRBackbone(stem, widths, embedding, input_size=side * 2**stages)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_curricularface(path: str | Path) -> IRBackbone:
    path = Path(path).expanduser()
    if not path.is_file():
        raise IDAnimatorError(f"The CurricularFace weights {path} do not exist.")
    try:
        return build_from_state_dict(read_state_dict(path))
    except ValueError as exc:  # ours: the tensors are not an IR backbone's
        raise IDAnimatorError(f"{path.name} is not a CurricularFace IR backbone state dict ({exc}).") from exc
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as exc:  # not a weights file
        raise IDAnimatorError(
            f"{path.name} is not a CurricularFace IR backbone state dict (torch cannot read it as weights: "
            f"{type(exc).__name__})."
        ) from exc
