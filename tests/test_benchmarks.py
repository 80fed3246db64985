"""The benchmark scripts run in their smoke modes (tiny sizes, one repeat), so they cannot rot.

Only their output is checked (the keys, and that every figure is a finite number), never a timing. Both
scripts start together at the beginning of the module and run side by side (each waits on its own
subprocesses and the disk much of the time). Also here: the motion UNet that the cold-start benchmark's
"after" builds is diffusers' own, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CPU_FIGURES = ["face_path_ratio", "serving_overhead_ratio", "warm_speedup", "switch_vs_cold", "peak_rss_mb"]
TIMEOUT = 900  # far beyond a normal run: only a hang fails on time


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numbers(tree, path=""):
    """Every number in a JSON tree, with where it is."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


class Script:
    """A benchmark script running in a subprocess; ``result()`` waits for its JSON."""

    def __init__(self, name: str, args: list[str], folder: Path):
        self.name, self.log = name, folder / f"{name}.log"
        self.tmp = folder / f"{name}-tmp"  # its temporary files go here, so the test sees what is left behind
        self.tmp.mkdir()
        # One thread each: the two run side by side on a small machine, and their timings are not the point.
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env["TMPDIR"] = str(self.tmp)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, f"benchmarks/{name}.py", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
                env=env,
            )

    def result(self) -> dict:
        stdout, _ = self.process.communicate(timeout=TIMEOUT)
        assert self.process.returncode == 0, f"{self.name}.py failed:\n{self.log.read_text()[-3000:]}"
        return json.loads(stdout)  # --json: stdout is one JSON object and nothing else

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def runs(tiny_kit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmarks")
    (folder / "work").mkdir()
    gpu_args = ["--smoke", "--channels-last", "--json", "--out", str(folder / "gpu.json")]
    scripts = {
        "cpu": Script("cpu", ["--smoke", "--json"], folder),
        "gpu": Script("gpu", [*gpu_args, "--workdir", str(folder / "work")], folder),
    }
    yield scripts, folder
    for script in scripts.values():
        script.stop()


def test_cpu_benchmark_reports_every_figure(runs):
    scripts, _ = runs
    results = scripts["cpu"].result()
    for key in CPU_FIGURES:
        assert finite(results[key]) and results[key] > 0, (key, results[key])
    assert set(results["targets_met"]) == {"serving_overhead_ratio", "warm_speedup", "switch_vs_cold"}
    assert all(isinstance(met, bool) for met in results["targets_met"].values())
    bad = [(where, value) for where, value in numbers(results) if not math.isfinite(value)]
    assert bad == []
    assert results["settings"]["mode"] == "smoke" and results["machine"]["cpus"] >= 1
    assert [p.name for p in scripts["cpu"].tmp.iterdir() if p.name.startswith("idanimator-")] == []  # all removed


def test_gpu_benchmark_runs_every_section_on_the_cpu(runs):
    scripts, folder = runs
    results = scripts["gpu"].result()
    assert results["errors"] == {}
    assert results["unexpected_imports"] == []  # what a GPU machine lacks (gradio, face detectors) stays out
    assert set(results["section_s"]) == {
        "write random parts", "layout", "cold-start", "speed", "floor", "channels-last", "memory",
    }  # fmt: skip
    assert results["layout"]["image_proj_tensors"] > 0 and results["layout"]["face_adapter_tensors"] > 0
    cold = results["cold_start"]
    for way in ("before", "after"):
        assert set(cold[way]) == {"cold", "switch", "switch back"}
        assert "motion UNet" in cold[way]["cold"]["stages"] and "load motion adapter" in cold[way]["cold"]["stages"]
    for key in ("cold_ratio", "switch_ratio", "motion_unet_ratio", "switch_vs_cold_after"):
        assert finite(cold[key]) and cold[key] > 0, key
    for key in ("video_s", "step_s", "unet_call_s", "decode_s"):
        assert finite(results["speed"][key]) and results["speed"][key] > 0, key
    assert "IPAdapterAttnProcessor2_0" in results["speed"]["attention_processors"]
    for key in ("unet_flops_per_step", "matmul_tflops", "unet_floor_s", "unet_achieved_fraction", "video_floor_s"):
        assert finite(results["floor"][key]) and results["floor"][key] > 0, key
    assert finite(results["channels_last"]["ratio"])
    assert set(results["memory"]) == {"none"} and finite(results["memory"]["none"]["2"]["step_s"])
    bad = [(where, value) for where, value in numbers(results) if not math.isfinite(value)]
    assert bad == []
    assert json.loads((folder / "gpu.json").read_text()) == results  # --out holds the same results
    assert list((folder / "work").iterdir()) == []  # its temporary weights are gone
    assert [p.name for p in scripts["gpu"].tmp.iterdir() if p.name.startswith("idanimator-")] == []


# -- the cold-start benchmark's "before" and "after" build the same motion UNet -------------------------


def _layout(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.data_ptr() % 64


@pytest.mark.parametrize("backbone", ["tiny", "tiny-single-file", "in memory"])
def test_the_motion_unet_built_in_place_is_diffusers_own_bit_for_bit(tiny_kit, backbone):
    """Same tensors, same memory layout (so the same kernels and summation order), same output; the shared
    motion adapter is left as it was, also after the face adapter is fused in."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from idanimator.adapter import install_face_adapter, load_face_adapter_weights
    from idanimator.models import load_backbone, motion_unet_from_parts

    if backbone == "in memory":  # fresh, aligned tensors: the in-place path takes them without a copy
        torch.manual_seed(0)
        unet2d = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_kit["base"], subfolder="unet"))
        adapter = MotionAdapter.from_config(MotionAdapter.load_config(tiny_kit["motion_adapter"]))
    else:  # loaded tensors are not 64-byte aligned: they are copied, as diffusers copies them
        path = tiny_kit["base"] if backbone == "tiny" else tiny_kit["single_file"]
        unet2d = load_backbone(path, tiny_kit["base"]).unet
        adapter = MotionAdapter.from_pretrained(tiny_kit["motion_adapter"])
    inputs_before = {k: v.clone() for k, v in (*unet2d.state_dict().items(), *adapter.state_dict().items())}
    theirs = UNetMotionModel.from_unet2d(unet2d, adapter)
    ours = motion_unet_from_parts(unet2d, adapter)
    assert type(ours) is UNetMotionModel and dict(ours.config) == dict(theirs.config)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    for key, tensor in reference.items():
        assert torch.equal(mine[key], tensor) and _layout(mine[key]) == _layout(tensor), key
    assert all(not t.is_meta for t in (*ours.parameters(), *ours.buffers()))

    sample = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(2))  # one per frame, as the pipeline passes
    with torch.no_grad():
        assert torch.equal(ours(sample, 10, text).sample, theirs(sample, 10, text).sample)
    install_face_adapter(ours, load_face_adapter_weights(tiny_kit["face_adapter"]))  # fuses LoRA into attn2
    inputs_after = {**unet2d.state_dict(), **adapter.state_dict()}
    assert all(torch.equal(inputs_after[k], v) for k, v in inputs_before.items())
