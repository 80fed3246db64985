"""Safety: secrets stay out of output, interrupted builds never look complete."""

from __future__ import annotations

import subprocess
import sys

from idanimator.testing import build_tiny_kit


def test_hf_token_is_never_printed(tmp_path):
    secret = "hf_SENTINELsecretTOKEN1234567890"
    env = {"HF_TOKEN": secret, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for argv in (["download"], ["backbones"]):
        proc = subprocess.run(
            [sys.executable, "-m", "idanimator", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert secret not in proc.stdout + proc.stderr


def test_a_half_built_kit_is_rebuilt_not_trusted(tmp_path):
    root = tmp_path / "kit"
    (root / "base").mkdir(parents=True)  # what an interrupted build would leave without the marker
    paths = build_tiny_kit(root)
    assert (root / "kit.json").is_file()
    assert (paths["base"] / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if "building" in p.name]
