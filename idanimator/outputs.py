"""The app's output folder: generated files under random names, pruned by age and count so it stays bounded.

The app writes into a folder of its own, ``idanimator-outputs`` inside the folder the operator names (or, by
default, the user's own cache folder: :func:`default_output_parent`), and serves that folder: anyone who knows
a file's random name can download it.
Pruning removes only entries named as this module names them, so nothing an operator keeps there is touched.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path

from .errors import IDAnimatorError

FOLDER_NAME = "idanimator-outputs"  # the app's own folder inside the operator's --output-dir
_OURS = re.compile(r"[0-9a-f]{16}(\.[a-z0-9]{1,5})?")  # what new_path/new_folder name: 16 hex digits (+ suffix)


def _named_here(path: Path) -> bool:
    """A name OutputFolder makes, and not a link (a link with such a name is someone else's)."""
    return bool(_OURS.fullmatch(path.name)) and not path.is_symlink()


def default_output_parent() -> Path:
    """Where the app's folder goes without ``--output-dir``: the user's own cache, ``$IDANIMATOR_CACHE``, else
    ``$XDG_CACHE_HOME/idanimator``, else ``~/.cache/idanimator`` (as the tiny kit), rather than the system's
    temporary folder, which every user and app on a machine shares."""
    root = os.environ.get("IDANIMATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idanimator"
    )
    return Path(root)


def own_folder(parent: Path) -> Path:
    """The folder the app writes into (and serves, and prunes) for an operator's ``--output-dir``."""
    return Path(parent) / FOLDER_NAME


class OutputFolder:
    def __init__(self, root: Path, max_files: int, max_age_s: float):
        self.root = root
        self.max_files = max_files
        self.max_age_s = max_age_s
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise IDAnimatorError(
                f"The output folder {root} cannot be written ({exc.strerror or exc}); choose another with --output-dir."
            ) from exc

    def new_path(self, suffix: str, folder: Path | None = None) -> Path:
        return (folder or self.root) / f"{secrets.token_hex(8)}{suffix}"

    def new_folder(self) -> Path:
        folder = self.root / secrets.token_hex(8)
        folder.mkdir()
        return folder

    def made_here(self, path) -> bool:
        """Whether `path` is a file this folder named (directly in it or in one of its own folders), not a link."""
        path = Path(path)
        folder = path.parent
        in_ours = folder == self.root or (folder.parent == self.root and _named_here(folder))
        return in_ours and _named_here(path) and path.is_file()

    def prune(self) -> None:
        """Keep the newest `max_files` of our entries younger than `max_age_s`; remove the rest of ours.

        Only names this class made are considered (never links), so other files in the folder stay."""
        entries = []
        for entry in self.root.iterdir():
            if not _named_here(entry):
                continue
            try:
                entries.append((entry.stat().st_mtime, entry))
            except FileNotFoundError:  # removed by a concurrent prune
                continue
        entries.sort(key=lambda item: item[0], reverse=True)
        now = time.time()
        for index, (mtime, entry) in enumerate(entries):
            if index >= self.max_files or now - mtime > self.max_age_s:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
