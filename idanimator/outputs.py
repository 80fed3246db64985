"""The app's output folder: generated files under random names, pruned by age and count so it stays bounded."""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

from .errors import IDAnimatorError


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

    def prune(self) -> None:
        """Keep the newest `max_files` entries younger than `max_age_s`; remove the rest."""
        entries = []
        for entry in self.root.iterdir():
            try:
                entries.append((entry.stat().st_mtime, entry))
            except FileNotFoundError:  # removed by a concurrent prune
                continue
        entries.sort(key=lambda item: item[0], reverse=True)
        now = time.time()
        for index, (mtime, entry) in enumerate(entries):
            if index >= self.max_files or now - mtime > self.max_age_s:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
