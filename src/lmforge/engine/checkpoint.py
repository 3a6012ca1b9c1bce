"""Crash-safe checkpoints.

A checkpoint is a directory `checkpoints/step-000040/` holding

    model.safetensors     weights (shared/tied tensors stored once); in a LoRA run on a pretrained
                          base, the trainable ones only (adapters, modules_to_save), beside
    lmforge_base.json     the base model: its resolved path and a fingerprint of its weights
    optimizer.pt          optimizer state       } torch.save of tensors and plain containers,
    scheduler.pt          lr scheduler state    } loaded back with weights_only=True:
    scaler.pt             fp16 grad scaler      } nothing is unpickled
    rng.pt                python, numpy, torch CPU and CUDA generator states
    trainer_state.json    the loop's TrainState
    config.yaml           the resolved config
    manifest.json         size and sha256 of every file above; written last

A checkpoint of a sharded model (distributed.strategy: fsdp) holds, instead of model.safetensors
and optimizer.pt, `sharded/`: the weights and optimizer state as `torch.distributed.checkpoint`
(DCP) writes them, every process its own shards, keyed by parameter name so that a job of another
number of processes (one included) reads them back resharded. Its manifest records the world size
and strategy it was written with.

It is written under a temporary name in the same directory, the manifest last, every file and
the directory fsynced, then renamed into place. A directory whose manifest is missing or disagrees with its files
is not a checkpoint: a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmforge.atomic import atomic_dir, follow_umask, fsync_dir, fsync_file, remove_dir, replace_dir
from lmforge.engine.sharding import is_sharded
from lmforge.engine.state import TrainState
from lmforge.errors import UserError
from lmforge.models.peft import BASE_FILE, save_base_config

FORMAT = 1
MANIFEST = "manifest.json"
SHARDED = "sharded"
"""The directory of a sharded checkpoint's files (DCP's under FSDP, DeepSpeed's under DeepSpeed)."""
DEEPSPEED_TAG = "zero"
"""The tag (subdirectory of SHARDED) under which DeepSpeed's save_checkpoint writes its files."""
TRAINABLE = "trainable"
"""manifest.json's "weights" of a checkpoint that holds the trainable parameters only (else "all")."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    directory: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    config_yaml: str,
    tokenizer: Any | None = None,
    files: dict[str, str] | None = None,
    base: dict | None = None,
) -> Checkpoint:
    """Write a checkpoint of `state.step` atomically and return it.

    Besides the resume state it holds the model's Hugging Face config.json and the tokenizer, so
    that a checkpoint loads as a model (`lmforge generate/eval/export` take it; eval.target).

    Args:
        base: an adapter run's base model record (`models.peft.base_record`): the checkpoint holds the
            trainable parameters only (the adapters: MBs where the base is GBs) and the record, which
            a resume or a load checks the base against.
    """
    target = directory / checkpoint_name(state.step)
    with atomic_dir(target, durable=True) as tmp:
        if base is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(trainable_state(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        _write_the_rest(tmp, state, model, scheduler, config_yaml, tokenizer, files, base)
        files = {p.name: _describe(p) for p in sorted(tmp.iterdir())}
        weights = "all" if base is None else TRAINABLE
        manifest = {"format": FORMAT, "step": state.step, "weights": weights, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: it vouches for the rest
    return Checkpoint(target, state.step)


def save_sharded_checkpoint(
    directory: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config_yaml: str,
    main: bool,
    world_size: int,
    tokenizer: Any | None = None,
    files: dict[str, str] | None = None,
    base: dict | None = None,
    strategy: str = "fsdp",
) -> Checkpoint:
    """`save_checkpoint` for a sharded model: every process of the job calls it (the save is a
    collective) and writes its shards; the main process writes the rest and the manifest, then
    renames the directory into place. The temporary directory's name is the same in every process.

    Args:
        main: whether this is the job's main process.
        world_size: the number of processes, recorded in the manifest.
        base: as in save_checkpoint: the adapters only (frozen weights are left out of the shards).
        strategy: "fsdp" (model sharded by FSDP2; torch.distributed.checkpoint writes the shards) or
            "deepspeed" (model: the DeepSpeed engine; its save_checkpoint writes the ZeRO partitions).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    target = directory / checkpoint_name(state.step)
    tmp = directory / f".tmp-{target.name}-sharded"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if strategy == "deepspeed":
        engine, model = model, model.module
        where = str(tmp / SHARDED)
        engine.save_checkpoint(where, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=base is not None)
    else:
        options = StateDictOptions(ignore_frozen_params=base is not None)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        with _one_process_is_fine():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / SHARDED))
    _barrier()  # every process's part is written
    if main:
        try:
            _write_the_rest(tmp, state, model, scheduler, config_yaml, tokenizer, files, base)
            written = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "format": FORMAT,
                "step": state.step,
                "weights": "all" if base is None else TRAINABLE,
                "sharded": {"strategy": strategy, "world_size": world_size},
                "files": {str(p.relative_to(tmp)): _describe(p) for p in written},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            follow_umask(tmp)
            for path in [*written, tmp / MANIFEST]:
                fsync_file(path)
            for folder in [tmp / SHARDED, *(p for p in (tmp / SHARDED).rglob("*") if p.is_dir())]:
                fsync_dir(folder)
            fsync_dir(tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _barrier()
    return Checkpoint(target, state.step)


def _write_the_rest(
    tmp: Path, state: TrainState, model, scheduler, config_yaml: str, tokenizer, files: dict | None, base: dict | None
) -> None:
    """Into a checkpoint being written, besides its weights and optimizer state: the base record, the
    model's config, tokenizer and small files that make it usable as a model, the scheduler and RNG
    states, the loop's state and the resolved config."""
    if base is not None:
        (tmp / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
    save_base_config(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, text in (files or {}).items():  # small files that make the checkpoint usable as a model
        (tmp / name).write_text(text)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=2))
    (tmp / "config.yaml").write_text(config_yaml)


@contextmanager
def _one_process_is_fine():
    """DCP warns that it assumes one process when no process group is set up: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def sharded_layout(path: Path) -> dict | None:
    """A sharded checkpoint's {"strategy", "world_size"}, or None for a checkpoint of whole weights."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("sharded")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (requires_grad), by their names in the model's state dict, contiguous."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _describe(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- finding, verifying


def verify(path: Path) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Checkpoint-named directories (valid or not), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_valid(directory: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint that verifies; each newer broken one is skipped with a warning."""
    for checkpoint in reversed(list_checkpoints(directory)):
        problem = verify(checkpoint.path)
        if problem is None:
            return checkpoint
        warn(f"skipping checkpoint {checkpoint.path}: {problem}")
    return None


def remove_stale_temporaries(directory: Path) -> None:
    """Leftovers of writes or removals that a crash interrupted."""
    if directory.is_dir():
        for child in directory.iterdir():
            if child.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(child, ignore_errors=True)


def prune(directory: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Remove all but the newest `keep_last` checkpoints and those in `keep_steps` (the best)."""
    checkpoints = list_checkpoints(directory)
    newest = {c.step for c in checkpoints[-keep_last:]} if keep_last > 0 else set()
    for checkpoint in checkpoints:
        if checkpoint.step not in newest and checkpoint.step not in keep_steps:
            remove_dir(checkpoint.path)


# --------------------------------------------------------------------------- loading


def load_trainer_state(path: Path) -> TrainState:
    return TrainState.from_dict(json.loads((path / "trainer_state.json").read_text()))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> TrainState:
    """Restore weights (`load_weights`), optimizer, scheduler, scaler and RNG states; return the loop state.

    A sharded checkpoint (save_sharded_checkpoint) loads into a sharded or a plain model of any
    number of processes: every process of the job calls this then."""
    layout = sharded_layout(path)
    if (layout or {}).get("strategy") == "deepspeed" or is_deepspeed_engine(model):
        load_deepspeed(path, model, optimizer is not None)
    elif layout is not None:
        load_sharded(path, model, optimizer)
    elif is_sharded(model):
        raise UserError(
            f"{path} holds whole weights (written with distributed.strategy=ddp or one process); a job with "
            "distributed.strategy=fsdp resumes from sharded checkpoints only: resume it with the strategy it "
            "was written with, or export its weights (lmforge export CHECKPOINT --out DIR) and start a new run "
            "from DIR (model.name_or_path)"
        )
    else:
        load_weights(path, model)
        if optimizer is not None:
            optimizer.load_state_dict(_load(path / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(_load(path / "scaler.pt"))
    restore_rng(_load(path / "rng.pt"))
    return load_trainer_state(path)


def is_deepspeed_engine(model: torch.nn.Module) -> bool:
    """Whether `model` is a DeepSpeed engine (distributed.strategy=deepspeed, as accelerate prepares it)."""
    return type(model).__name__ == "DeepSpeedEngine"


def load_deepspeed(path: Path, engine: torch.nn.Module, with_optimizer: bool) -> None:
    """A DeepSpeed checkpoint's weights and ZeRO optimizer partitions into the engine of a job of as
    many processes as wrote it (run.check_resume_config refuses another count); every process calls it.

    Raises:
        UserError: the checkpoint is not DeepSpeed's, or the model is not a DeepSpeed engine.
    """
    layout = sharded_layout(path) or {}
    if layout.get("strategy") != "deepspeed" or not is_deepspeed_engine(engine):
        written = layout.get("strategy", "ddp or one process")
        raise UserError(
            f"{path} was written with distributed.strategy={written}; DeepSpeed's checkpoints hold ZeRO's own "
            "partitions, so a run resumes with DeepSpeed exactly when it was written with it: resume with the "
            "strategy it was written with, or export its weights (lmforge export CHECKPOINT --out DIR) and start "
            "a new run from DIR (model.name_or_path)"
        )
    adapters_only = holds_trainable_only(path)
    engine.load_checkpoint(
        str(path / SHARDED),
        tag=DEEPSPEED_TAG,
        load_module_strict=not adapters_only,
        load_optimizer_states=with_optimizer,
        load_lr_scheduler_states=False,  # lmforge's scheduler.pt holds it
    )


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """A sharded checkpoint's weights (and optimizer state) into `model`, sharded or not, on any
    number of processes: DCP reads each process's part of every tensor by name.

    Raises:
        RuntimeError: the checkpoint's weights do not fit the model (DCP names the missing keys).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    adapters_only = holds_trainable_only(path)  # the frozen base came from its own files
    options = StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)
    where = str(path / SHARDED)
    alone = not is_sharded(model)  # a whole model reads whole tensors: no process needs another
    if optimizer is None:
        model_state = get_model_state_dict(model, options=options)
        with _one_process_is_fine():
            dcp.load({"model": model_state}, checkpoint_id=where, no_dist=alone)
        set_model_state_dict(model, model_state, options=options)
        return
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    both = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_is_fine():
        dcp.load(both, checkpoint_id=where, no_dist=alone)
    set_state_dict(
        model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"], options=options
    )


def holds_trainable_only(path: Path) -> bool:
    """Whether a checkpoint holds the trainable parameters only (an adapter run's: see save_checkpoint)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("weights") == TRAINABLE
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """A checkpoint's weights into `model`: every weight of the model; or, from a checkpoint of the
    trainable parameters only, exactly those (the rest is the base model, loaded by whoever built it).

    Raises:
        RuntimeError: the checkpoint's weights do not fit the model (names missing or unexpected).
    """
    layout = sharded_layout(path)
    if layout is not None and layout["strategy"] == "deepspeed":  # outside a job: DeepSpeed's own consolidation
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UserError(
                f"{path} was written by DeepSpeed, whose zero_to_fp32 joins its partitions: pip install "
                "'lmforge[deepspeed]'"
            ) from None

        adapters_only = holds_trainable_only(path)
        saved = get_fp32_state_dict_from_zero_checkpoint(
            str(path / SHARDED), tag=DEEPSPEED_TAG, exclude_frozen_parameters=adapters_only
        )
        model.load_state_dict(saved, strict=not adapters_only)
        return
    if layout is not None:
        load_sharded(path, model)
        return
    file = str(path / "model.safetensors")
    if not holds_trainable_only(path):
        missing, unexpected = load_model(model, file, strict=False)
        if unexpected or missing:
            raise RuntimeError(
                f"{path}: the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
            )
        return
    saved = load_file(file)
    trainable = set(trainable_state(model))
    if set(saved) != trainable:
        missing, unexpected = sorted(trainable - set(saved)), sorted(set(saved) - trainable)
        raise RuntimeError(
            f"{path}: the checkpoint's trainable weights do not fit the model's: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(saved, strict=False)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict[str, Any]:
    """Every random generator the loop may draw from, in forms weights_only loading accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
