"""Atomic writes, output paths and file copies that several commands share: where results go
by default, which targets are refused before any work, and the one atomic copy of a finished
file."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distml.errors import DistmlError


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` to a temp file beside ``path``, fsync, then rename over it.
    A crash at any moment leaves either the old file or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        # the usual permissions of a new file: some writers (safetensors) create them 0600
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def default_out(checkpoint: Path, suffix: str) -> Path:
    """Where a command that reads a checkpoint puts its results: ``<stem>-<suffix>/`` beside it."""
    return checkpoint.parent / f"{checkpoint.stem}-{suffix}"


def check_writable(folder: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written: a file in its
    path, no permission, a read-only file system."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest ancestor that exists will hold the new folders
    if not existing.is_dir():
        raise DistmlError(
            f"{what} {folder} cannot be created: {existing} is a file, not a folder. Choose "
            "another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistmlError(
            f"{what} {folder} cannot be written: {existing} is not writable (no permission, or "
            "a read-only file system). Choose a folder you can write to."
        )


def check_out_dir(out: Path, flag: str = "--out", *, overwrite: bool = False) -> None:
    """The one rule for a results folder: new, empty, or (with --overwrite) one whose files
    this command may replace; always writable. Checked before any work."""
    if out.exists() and not out.is_dir():
        raise DistmlError(f"{flag} {out} is a file; give a folder for the results.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DistmlError(
            f"{flag} {out} already holds results. Add --overwrite to replace them, or choose "
            f"another {flag}."
        )
    check_writable(out, flag)


def check_save_target(save: Path | None, *, overwrite: bool = False) -> None:
    """Refuse, before any work, a ``--save`` target that cannot take a checkpoint file or
    already holds a file that is not to be replaced."""
    if save is None:
        return
    if save.is_dir():
        raise DistmlError(f"--save {save} is a directory; give a file path ending in .safetensors.")
    if save.exists() and not overwrite:
        raise DistmlError(
            f"--save {save} already exists. Add --overwrite to replace it, or choose another "
            "path (a file distml did not write is never replaced without --overwrite)."
        )
    check_writable(save.parent, "the folder of --save")


def copy_file(source: Path, target: Path) -> None:
    """Copy a finished file (a checkpoint to ``--save``): the target is whole or untouched."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
