"""Writing directories so that a crash leaves either the old one or the new one, never a mix."""

from __future__ import annotations

import json
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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes an ordinary file or directory gets (0666 /
    0777 less the umask): temporary directories are made 0700 and some writers make files 0600,
    which would hide a model from a colleague or a serving container."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(directory) / name, 0o777 & ~mask)
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


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
        follow_umask(tmp)
        if durable:
            for child in tmp.iterdir():
                if child.is_file():
                    fsync_file(child)
            fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


OWNED_MARKER = ".lmforge-files.json"
"""In a directory lmforge wrote for the user (an export): the files it wrote there, so that a
later write replaces those and never touches anything else."""


@contextmanager
def owned_dir(target: Path, force: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield a temporary directory whose files then land in `target`, a directory the user named.

    A new or empty `target` is replaced whole (atomically); one lmforge wrote before (it lists its
    files in OWNED_MARKER) has those files replaced and any other file left alone; any other
    non-empty directory is refused unless `force`, and then the files are written beside the ones
    there, never over one of the same name. Nothing lmforge did not write is deleted or overwritten.

    Raises:
        UserError: `target` is a file, a non-empty directory lmforge did not write (without `force`), or
            one holding a file of a name lmforge writes.
    """
    target = Path(target)
    present, owned = check_target(target, force, what)
    with atomic_dir(target.parent / f".staged-{target.name}") as staged:
        yield staged
    staged = target.parent / f".staged-{target.name}"
    written = sorted(p.name for p in staged.iterdir())
    clashes = [name for name in written if name in present and (owned is None or name not in owned)]
    if clashes:  # --force writes beside the user's files, never over them
        from lmforge.errors import UserError

        shutil.rmtree(staged, ignore_errors=True)
        raise UserError(
            f"{what} {target.resolve()}: it holds files of the names lmforge writes that lmforge did not write "
            f"({', '.join(clashes)}); move them, or name another directory"
        )
    (staged / OWNED_MARKER).write_text(json.dumps(written))
    if not present:
        replace_dir(staged, target)
        return
    for name in written + [OWNED_MARKER]:
        if (target / name).is_dir() and not (target / name).is_symlink():
            remove_dir(target / name)
        os.replace(staged / name, target / name)
    for name in (owned or set()) - set(written):  # ours from the previous write, not written now
        path = target / name
        if path.is_dir() and not path.is_symlink():
            remove_dir(path)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(staged, ignore_errors=True)
    fsync_dir(target)


def check_target(target: Path, force: bool = False, what: str = "--out") -> tuple[list[str], set[str] | None]:
    """(names present in `target`, names lmforge wrote there or None): see `owned_dir`.

    Raises:
        UserError: `target` is a file, or a non-empty directory lmforge did not write (without `force`).
    """
    from lmforge.errors import UserError

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{what} {target}: a file, not a directory; name a directory to write into")
    if file := next((p for p in target.parents if p.exists() and not p.is_dir()), None):
        raise UserError(f"{what} {target}: {file} is a file, so no directory can be made below it")
    present = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    owned = set(json.loads((target / OWNED_MARKER).read_text())) if (target / OWNED_MARKER).is_file() else None
    foreign = [name for name in present if name != OWNED_MARKER and (owned is None or name not in owned)]
    if foreign and owned is None and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"{what} {target.resolve()}: the directory holds files lmforge did not write ({shown}); name a new or "
            "empty directory, or pass --force to write into it (files of other names are kept)"
        )
    return present, owned
