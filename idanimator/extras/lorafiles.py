"""Finding a style LoRA's file and checking, from its header alone, that it is an SD 1.5 LoRA.

A source is a local ``.safetensors`` file (or a folder holding one), a Hub file ``owner/repo/file.safetensors``
or a Hub repo ``owner/repo`` with one weight file, either with an optional ``@revision``. Hub files come through
huggingface_hub's cache (tried first, so nothing touches the network once a file is there). Only safetensors are
read: a pickled LoRA (.ckpt, .pt, .bin) could run code when loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InvalidRequestError, WeightsUnavailableError
from ..registry import HubFile, HubFolder
from ..weights import hub_reachable, offline_mode, parse_hub_id

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights names it
_SDXL_WIDTH, _SD2_WIDTH = 2048, 1024  # their text features, which attn2's key/value layers take in
# The down (A) half of a LoRA on a cross-attention's key or value layer, in diffusers', PEFT's and kohya's names.
_CROSS_KV_DOWN = re.compile(r"attn2[._]to_[kv]\.(lora\.down|lora_A|lora_down|lora_linear_layer\.down)\.weight$")


def find_lora(source: str) -> Path:
    """The local .safetensors file of a LoRA source (downloading a Hub file if needed and possible)."""
    kind, *where = check_source(source)
    if kind == "local":
        path = where[0]
        if path.is_dir():
            return path / _pick_file(sorted(p.name for p in path.glob("*.safetensors")), str(source))
        return path
    if kind == "hub-repo":
        return _hub_repo_file(*where)
    return _hub_file(*where)


def check_source(source: str) -> tuple:
    """What a source names, checked without the network: ``("local", path)``, ``("hub-file", repo, file,
    revision)`` or ``("hub-repo", repo, revision)``; a missing local file or a pickle raises InvalidRequestError.
    Cheap enough for the boundary (CLI, app), before any model loads."""
    text = str(source).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        _pick_file(sorted(p.name for p in path.glob("*.safetensors")), text)  # a folder without one LoRA file
        return ("local", path)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise InvalidRequestError(
                f"The LoRA {text} is not a .safetensors file; other formats (.ckpt, .pt, .bin) can run code when "
                "loaded, so convert it to .safetensors first."
            )
        return ("local", path)
    hub = parse_hub_id(text, file_suffixes=(".safetensors",))
    if isinstance(hub, HubFolder) and not hub.repo_id.lower().endswith(".safetensors"):
        return ("hub-repo", hub.repo_id, hub.revision)
    if isinstance(hub, HubFile):
        return ("hub-file", hub.repo_id, hub.filename, hub.revision)
    raise InvalidRequestError(
        f"The LoRA file {text} does not exist (give a local .safetensors file, owner/repo or owner/repo/file)."
    )


def _pick_file(names: list[str], source: str) -> str:
    """The one weight file among ``names``, preferring diffusers' own name."""
    if DIFFUSERS_FILE in names:
        return DIFFUSERS_FILE
    if len(names) == 1:
        return names[0]
    if not names:
        raise InvalidRequestError(f"The LoRA {source} has no .safetensors file.")
    shown = ", ".join(names[:5])
    raise InvalidRequestError(f"The LoRA {source} has several .safetensors files ({shown}); name one: {source}/FILE.")


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except (OSError, ValueError):
        pass  # not in the cache
    if not hub_reachable():
        raise _offline(f"{repo_id}/{filename}")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types; each becomes a sentence
        raise _hub_error(f"{repo_id}/{filename}", exc) from exc


def _hub_repo_file(repo_id: str, revision: str | None) -> Path:
    """A Hub repo's one LoRA file: from the cached snapshot if there is one, else from the repo's file list."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
    except (OSError, ValueError):
        names = []
    if not names:
        if not hub_reachable():
            raise _offline(repo_id)
        try:
            names = sorted(f for f in HfApi().list_repo_files(repo_id, revision=revision) if f.endswith(".safetensors"))
        except Exception as exc:  # noqa: BLE001 - see _hub_file
            raise _hub_error(repo_id, exc) from exc
    return _hub_file(repo_id, _pick_file(names, repo_id), revision)


def _offline(name: str) -> WeightsUnavailableError:
    why = "HF_HUB_OFFLINE is set" if offline_mode() else "the Hugging Face Hub cannot be reached"
    return WeightsUnavailableError(
        f"The LoRA {name} is not in the local Hugging Face cache and {why}; download it while online, "
        "or give the path of a local .safetensors file."
    )


def _hub_error(name: str, exc: Exception) -> WeightsUnavailableError:
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return WeightsUnavailableError(f"The LoRA {name} needs you to accept its licence on huggingface.co.")
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsUnavailableError(f"The LoRA {name} does not exist on the Hugging Face Hub (or is private).")
    if isinstance(exc, EntryNotFoundError):
        return WeightsUnavailableError(f"The LoRA file {name} does not exist on the Hugging Face Hub.")
    return WeightsUnavailableError(f"The LoRA {name} could not be downloaded ({type(exc).__name__}).")


def check_lora_file(path: Path, name: str, cross_attention_dim: int) -> None:
    """Raise InvalidRequestError with a sentence unless the file's header is that of a LoRA for this backbone
    (``cross_attention_dim``: the width of its text features, 768 for SD 1.5). Reads no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidRequestError(f"The LoRA {name} is not a readable .safetensors file (it may be damaged).") from exc
    keys = list(shapes)
    if not any("lora" in key for key in keys):
        raise InvalidRequestError(f"{name} is not a LoRA: it holds no LoRA weights (is it a whole model?).")
    if any(".hada_" in key or ".lokr_" in key for key in keys):
        raise InvalidRequestError(f"The LoRA {name} is a LyCORIS (LoHa/LoKr) file; only plain LoRAs are supported.")
    widths = {shapes[key][1] for key in keys if _CROSS_KV_DOWN.search(key) and len(shapes[key]) == 2}
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in keys) or _SDXL_WIDTH in widths:
        raise InvalidRequestError(f"{name} is an SDXL LoRA; this model is SD 1.5.")
    if _SD2_WIDTH in widths and cross_attention_dim != _SD2_WIDTH:
        raise InvalidRequestError(f"{name} is an SD 2 LoRA; this model is SD 1.5.")
    other = sorted(widths - {cross_attention_dim})
    if other:
        raise InvalidRequestError(
            f"{name} was made for another base model (its text features are {other[0]} wide, this backbone's are "
            f"{cross_attention_dim}); use an SD 1.5 LoRA."
        )
