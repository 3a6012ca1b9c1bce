"""Writing directories so that a crash leaves either the old one or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Remove a directory tree, renaming it first: a removal cut short leaves a `.trash-` name
    behind, never a half-empty directory under the real name."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move a finished directory into place, replacing `target` if it exists."""
    if target.exists():
        remove_dir(target)
    os.replace(source, target)
    fsync_dir(target.parent)


@contextmanager
def atomic_dir(target: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`.

    Args:
        durable: fsync every file and the directory before the rename (for checkpoints).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if durable:
            for child in tmp.iterdir():
                if child.is_file():
                    fsync_file(child)
            fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
