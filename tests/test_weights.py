"""Resolving weights: local paths, registry names, the Hugging Face cache, and offline errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from idanimator import registry
from idanimator.errors import WeightsUnavailableError
from idanimator.registry import HubFile, HubFolder
from idanimator.weights import hub_reachable, parse_hub_id, parse_source, resolve


def test_registry_names_and_hub_ids_parse():
    assert parse_source("realistic-vision-v6") == registry.BACKBONES["realistic-vision-v6"].source
    assert parse_source("emilianJR/epiCRealism") == HubFolder("emilianJR/epiCRealism")
    assert parse_source("owner/repo/sub/model.safetensors") == HubFile("owner/repo", "sub/model.safetensors")
    assert parse_source("owner/repo@v1.0") == HubFolder("owner/repo", revision="v1.0")
    assert parse_source("owner/repo/m.safetensors@abc") == HubFile("owner/repo", "m.safetensors", revision="abc")


def test_one_hub_id_parser_reads_repos_files_and_revisions_and_nothing_else():
    assert parse_hub_id("owner/repo@main") == HubFolder("owner/repo", revision="main")
    assert parse_hub_id("owner/repo/a/b.CKPT") == HubFile("owner/repo", "a/b.CKPT")
    assert parse_hub_id("owner/repo/ip.bin", file_suffixes=(".bin",)) == HubFile("owner/repo", "ip.bin")
    assert parse_hub_id("owner/repo/ip.bin") is None  # a pickle is not a single-file checkpoint we load
    for local_or_nothing in ("./owner/repo", "/owner/repo", "~/owner/repo", "repo", "own er/repo", "a/b/c"):
        assert parse_hub_id(local_or_nothing) is None


def test_local_paths_win(tmp_path):
    (tmp_path / "owner").mkdir()
    assert resolve(tmp_path / "owner") == tmp_path / "owner"
    assert resolve(str(tmp_path / "owner")) == tmp_path / "owner"


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist|neither"):
        resolve(str(tmp_path / "nothing.safetensors"), what="backbone")


def test_hub_ids_can_be_forbidden():
    with pytest.raises(WeightsUnavailableError, match="not one of the offered models"):
        resolve("someone/some-model", what="backbone", allow_hub_ids=False)


def test_offline_and_not_cached_gives_actionable_error():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        resolve(registry.MOTION_ADAPTER, what="motion adapter")
    message = str(err.value)
    assert "guoyww/animatediff-motion-adapter-v1-5-2" in message
    assert "python -m idanimator download" in message and "--tiny" in message
    assert time.monotonic() - start < 5


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    hub_reachable.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match="cannot be reached"):
            resolve(registry.FACE_ADAPTER, what="face adapter")
        assert time.monotonic() - start < 10
    finally:
        hub_reachable.cache_clear()


def _put_in_hub_cache(cache, repo_id: str, files: dict, repo_type: str = "model"):
    """Lay files out exactly as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dest = repo_dir / "snapshots" / commit / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
    return repo_dir / "snapshots" / commit


def test_cached_hub_folder_and_file_resolve_offline(tiny_kit, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # read at import time from the env
    snap = _put_in_hub_cache(tmp_path, "guoyww/animatediff-motion-adapter-v1-5-2", {"": tiny_kit["motion_adapter"]})
    assert resolve(registry.MOTION_ADAPTER) == snap
    snap = _put_in_hub_cache(
        tmp_path, "ID-Animator/ID-Animator", {"animator.ckpt": tiny_kit["face_adapter"]}, repo_type="space"
    )
    assert resolve(registry.FACE_ADAPTER) == snap / "animator.ckpt"
    snap = _put_in_hub_cache(tmp_path, "h94/IP-Adapter", {"models/image_encoder": tiny_kit["image_encoder"]})
    assert resolve(registry.IMAGE_ENCODER) == snap / "models" / "image_encoder"


def test_generate_without_weights_offline_prints_one_line_not_a_traceback(astronaut_path, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "idanimator",
            "generate",
            "--face",
            str(astronaut_path),
            "--prompt",
            "a man",
            "--out",
            str(tmp_path / "x.mp4"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: The face adapter")
    assert "python -m idanimator download" in proc.stderr


def _copy_base(tiny_kit, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_kit["base"], base)
    return base


def test_truncated_backbone_weights_name_the_file(tiny_kit, tmp_path, detector):
    from idanimator.pipeline import IDAnimatorPipeline

    base = _copy_base(tiny_kit, tmp_path)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsUnavailableError, match=r"backbone at .*base.*delete it and download it again"):
        IDAnimatorPipeline.from_pretrained(base, tiny=True, device="cpu", detector=detector)


def test_backbone_folder_without_weights_is_reported(tiny_kit, tmp_path, detector):
    from idanimator.pipeline import IDAnimatorPipeline

    base = _copy_base(tiny_kit, tmp_path)
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsUnavailableError, match="incomplete or corrupt"):
        IDAnimatorPipeline.from_pretrained(base, tiny=True, device="cpu", detector=detector)


def test_corrupt_single_file_backbone_is_reported(tiny_kit, tmp_path, detector):
    from idanimator.pipeline import IDAnimatorPipeline

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsUnavailableError, match="model.safetensors"):
        IDAnimatorPipeline.from_pretrained(bad, tiny=True, device="cpu", detector=detector)


def test_corrupt_motion_adapter_is_reported(tiny_kit, tmp_path, detector):
    from idanimator.pipeline import IDAnimatorPipeline

    motion = tmp_path / "motion"
    shutil.copytree(tiny_kit["motion_adapter"], motion)
    (motion / "config.json").write_text("{ not json")
    with pytest.raises(WeightsUnavailableError, match="motion adapter"):
        IDAnimatorPipeline.from_pretrained(tiny=True, motion_adapter=motion, device="cpu", detector=detector)


def test_is_cached_looks_only_at_the_disk(tiny_kit, tmp_path):
    from idanimator.weights import is_cached

    assert is_cached(tiny_kit["face_adapter"])
    assert not is_cached(registry.MOTION_ADAPTER)  # offline, empty cache: no download is attempted


def _download(tmp_path, *argv):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    return subprocess.run(
        [sys.executable, "-m", "idanimator", "download", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_download_checks_backbone_names_before_fetching_anything(tmp_path):
    """Issue 18: a name outside the registry was a KeyError traceback after the other parts were fetched."""
    proc = _download(tmp_path, "--backbone", "no-such-backbone")
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout  # nothing was started
    assert proc.stderr.startswith("error: 'no-such-backbone' is neither") and proc.stderr.count("\n") == 1


def test_download_takes_a_hub_id_and_a_local_folder_as_backbone(tiny_kit, tmp_path):
    """The README's --backbone NAME|HUB_ID|PATH: every part in an offline Hugging Face cache, a Hub id and a
    local folder as backbones."""
    cache = tmp_path / "hub"
    _put_in_hub_cache(cache, "ID-Animator/ID-Animator", {"animator.ckpt": tiny_kit["face_adapter"]}, repo_type="space")
    _put_in_hub_cache(cache, "guoyww/animatediff-motion-adapter-v1-5-2", {"": tiny_kit["motion_adapter"]})
    _put_in_hub_cache(cache, "h94/IP-Adapter", {"models/image_encoder": tiny_kit["image_encoder"]})
    for repo in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "someone/some-backbone"):
        _put_in_hub_cache(cache, repo, {"": tiny_kit["base"]})
    proc = _download(tmp_path, "--backbone", "someone/some-backbone", "--backbone", str(tiny_kit["base"]))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "backbone someone/some-backbone: someone/some-backbone" in proc.stdout
    assert f"  -> {tiny_kit['base']}" in proc.stdout


def test_check_available_passes_local_copies_and_names_the_first_missing_weight(tiny_kit, tmp_path):
    from idanimator.weights import check_available

    check_available([(str(tiny_kit["face_adapter"]), "face adapter"), (str(tiny_kit["base"]), "backbone")])
    with pytest.raises(WeightsUnavailableError, match=r"^The image encoder .*nowhere does not exist\.$"):
        check_available([(str(tiny_kit["base"]), "backbone"), (str(tmp_path / "nowhere"), "image encoder")])
    with pytest.raises(WeightsUnavailableError) as caught:  # HF_HUB_OFFLINE and an empty cache in the tests
        check_available([(registry.MOTION_ADAPTER, "motion adapter")], command="download")
    said = str(caught.value)
    assert said.startswith("The motion adapter guoyww/animatediff-motion-adapter-v1-5-2 is not in the local")
    assert "HF_HOME" in said and "HF_HUB_OFFLINE=1" in said and "--tiny" not in said
