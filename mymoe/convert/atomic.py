"""Outputs appear whole or not at all: everything is written under a temporary sibling, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from mymoe.checkpoint.storage import CheckpointError


def refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists: choose another output path or pass --overwrite")


@contextlib.contextmanager
def atomic_output(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or folder into; on success it replaces `path`,
    on any error it is deleted and `path` is left as it was."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
        if path.exists():  # only with overwrite: the old output goes only once the new one is complete
            _remove(path)
        os.replace(temporary, path)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
