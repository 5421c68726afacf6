"""Output paths and file copies that several commands share: where results go by default,
which targets are refused before any work, and the one atomic copy of a finished file."""

from __future__ import annotations

import shutil
from pathlib import Path

# atomic_write belongs here (DESIGN.md: files.py owns atomic writes); it still lives in
# checkpoint.py until that module imports it from here
from distml.checkpoint import atomic_write
from distml.errors import DistmlError


def default_out(checkpoint: Path, suffix: str) -> Path:
    """Where a command that reads a checkpoint puts its results: ``<stem>-<suffix>/`` beside it."""
    return checkpoint.parent / f"{checkpoint.stem}-{suffix}"


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse a results folder that is a file."""
    if out.exists() and not out.is_dir():
        raise DistmlError(f"{flag} {out} is a file; give a folder for the results.")


def check_save_target(save: Path | None) -> None:
    """Refuse, before any work, a ``--save`` target that cannot take a checkpoint file."""
    if save is not None and save.is_dir():
        raise DistmlError(f"--save {save} is a directory; give a file path ending in .safetensors.")


def copy_file(source: Path, target: Path) -> None:
    """Copy a finished file (a checkpoint to ``--save``): the target is whole or untouched."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
