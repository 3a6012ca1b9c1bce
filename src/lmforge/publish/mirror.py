"""Checkpoints that survive the machine: `train.mirror`.

The mirror is a tracking backend (`tracking.base.Tracker`): it sits behind its own queue and
thread, so an upload never blocks a training step, a failing upload is reported once and retried
with backoff, and at the end of the run lmforge says what is still missing. Layout, for a run
directory runs/NAME-TIME/ and train.mirror = s3://bucket/prefix:

    s3://bucket/prefix/NAME-TIME/config.yaml, metrics.jsonl, data_report.json, ...   (the run's files)
    s3://bucket/prefix/NAME-TIME/checkpoints/step-000040/...   manifest.json last
    s3://bucket/prefix/NAME-TIME/final/...                     at the end (with lmforge_manifest.json)

A checkpoint is uploaded only once it is complete (its manifest written and the directory renamed
into place), its manifest.json after every other file: a remote checkpoint without one is a copy
cut short and is never resumed. The run's files go first, so the metrics.jsonl beside a mirrored
checkpoint has every line the checkpoint counts. Checkpoints removed locally (keep_last) are
removed from the mirror too.

`--resume auto` looks in the mirror when it is newer than what `output_dir` holds (a fresh
machine holds nothing): the newest run of the config's name with a complete checkpoint is
downloaded, each file checked against the checkpoint's manifest, and training continues from it
exactly as from a local one.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lmforge.atomic import atomic_dir
from lmforge.engine.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from lmforge.engine.checkpoint import Checkpoint, checkpoint_name, list_checkpoints, verify
from lmforge.publish.storage import StorageError, Store, download_dir, file_sha256, join, open_store, upload_dir
from lmforge.tracking.base import RunInfo

RUN_FILES = (
    "config.yaml",
    "data_report.json",
    "metrics.jsonl",
    "tracking.json",
    "examples.jsonl",
    "lmforge_base.json",
)
"""A run's own files that a resume reads (beside its checkpoints), sent with every checkpoint."""
_LOCAL_ONLY = (".lock",)
_STEP = re.compile(r"^step-(\d{6,})$")


def mirror_store(config) -> Store:
    """The store of `config.train.mirror`."""
    return open_store(config.train.mirror, storage=config.storage)


class MirrorTracker:
    """Uploads each complete checkpoint and, when the run ends, the whole run directory."""

    name = "mirror"
    keeps = "its uploads are retried, and the run directory has everything"

    def __init__(self, info: RunInfo) -> None:
        self.run_dir = info.run_dir.resolve()  # a -latest link: the run's own name
        self.url = info.config.train.mirror
        self.settings = info.config
        self.store: Store | None = None
        self.prefix = self.run_dir.name

    def start(self, run_id: str | None) -> None:
        self.store = mirror_store(self.settings)
        self.store.children(self.prefix)  # reachable, and the bucket exists: said now, not at the first checkpoint

    def log_checkpoint(self, path: Path) -> None:
        """Upload the checkpoint at `path` (skipped if keep_last removed it meanwhile: a newer one
        is queued), after the run's files, its manifest last; then drop mirrored checkpoints that
        are no longer kept locally."""
        self._send_run_files()
        if verify(path) is not None:  # removed (or being removed) by keep_last since it was queued
            return
        self._send_checkpoint(path)
        self._prune()

    def finish(self, status: str) -> None:
        """The whole run directory: final/, eval.json, predictions.jsonl, reports, checkpoints."""
        for child in sorted(self.run_dir.iterdir()):
            if child.is_dir() and child.name == "checkpoints":
                for checkpoint in list_checkpoints(child):
                    if verify(checkpoint.path) is None:
                        self._send_checkpoint(checkpoint.path)
            elif child.is_dir() and not child.name.startswith("."):
                upload_dir(child, self.store, join(self.prefix, child.name))
        self._send_run_files(every=True)
        self._prune()

    def log_artifact(self, path: Path) -> None:
        """One file of the run directory, as it is now (sent again if it changes later)."""
        if path.is_file() and path.resolve().is_relative_to(self.run_dir.resolve()):
            with tempfile.TemporaryDirectory(prefix="lmforge-mirror-") as tmp:
                snapshot = Path(tmp) / path.name
                shutil.copyfile(path, snapshot)
                key = path.resolve().relative_to(self.run_dir.resolve()).as_posix()
                self.store.put(snapshot, join(self.prefix, key), file_sha256(snapshot))

    def _send_checkpoint(self, path: Path) -> None:
        """A complete checkpoint, its manifest.json after every other file."""
        prefix = join(self.prefix, "checkpoints", path.name)
        upload_dir(path, self.store, prefix, skip=lambda key: key in _LOCAL_ONLY, last=(CHECKPOINT_MANIFEST,))

    def where(self) -> str:
        return f"mirror: {self.store.url if self.store else self.url}/{self.prefix}"

    def _send_run_files(self, every: bool = False) -> None:
        """The run's top-level files (every one at the end, else those a resume needs), each
        replaced whole; no manifest: a resume reads them as they are."""
        for path in sorted(self.run_dir.iterdir()):
            if path.is_file() and path.name not in _LOCAL_ONLY and (every or path.name in RUN_FILES):
                self.log_artifact(path)  # a snapshot: metrics.jsonl grows while it travels

    def _prune(self) -> None:
        kept = {c.path.name for c in list_checkpoints(self.run_dir / "checkpoints")}
        remote = join(self.prefix, "checkpoints")
        for name in self.store.children(remote):
            if _STEP.match(name) and name not in kept:
                keys = self.store.list(join(remote, name))
                manifest = [k for k in keys if k.endswith(f"/{CHECKPOINT_MANIFEST}")]
                self.store.delete(manifest + [k for k in keys if k not in manifest])  # invalid first


# --------------------------------------------------------------------------- resuming from the mirror


def newest_mirrored(config, run_pattern: re.Pattern, warn: Callable[[str], None]) -> tuple[str, int] | None:
    """(run directory name, step) of the newest complete checkpoint in the mirror of a run whose
    name matches `run_pattern`; None if there is none."""
    store = mirror_store(config)
    for run in sorted((r for r in store.children() if run_pattern.match(r)), reverse=True):
        steps = sorted(int(m.group(1)) for n in store.children(join(run, "checkpoints")) if (m := _STEP.match(n)))
        for step in reversed(steps):
            if store.head(join(run, "checkpoints", checkpoint_name(step), CHECKPOINT_MANIFEST)) is not None:
                return run, step
            warn(f"skipping mirrored checkpoint {store.url}/{run}/checkpoints/{checkpoint_name(step)}: no manifest")
    return None


def fetch_checkpoint(config, run: str, step: int, log: Callable[[str], None]) -> Checkpoint:
    """Download the mirrored checkpoint `step` of `run` (and the run's files) into
    <output_dir>/<run>/, verified against the checkpoint's manifest.

    Raises:
        StorageError: a file is missing or arrives different from the manifest.
    """
    store = mirror_store(config)
    run_dir = Path(config.output_dir) / run
    name = checkpoint_name(step)
    remote = join(run, "checkpoints", name)
    log(f"downloading checkpoint {name} of {run} from the mirror {store.url}")
    with atomic_dir(run_dir / "checkpoints" / name, durable=True) as tmp:
        store.get(join(remote, CHECKPOINT_MANIFEST), tmp / CHECKPOINT_MANIFEST)
        manifest = json.loads((tmp / CHECKPOINT_MANIFEST).read_text())
        download_dir(store, remote, tmp, manifest)
        problem = verify(tmp)
        if problem is not None:
            raise StorageError(f"{store.url}/{remote}: the downloaded checkpoint is not whole: {problem}")
    for file in RUN_FILES:
        if store.head(join(run, file)) is not None:
            partial = run_dir / f".tmp-{file}"
            store.get(join(run, file), partial)
            partial.replace(run_dir / file)
    return Checkpoint(run_dir / "checkpoints" / name, step)
