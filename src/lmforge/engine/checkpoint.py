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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from lmforge.atomic import atomic_dir, remove_dir
from lmforge.engine.state import TrainState
from lmforge.models.peft import BASE_FILE, save_base_config

FORMAT = 1
MANIFEST = "manifest.json"
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
            (tmp / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        save_base_config(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (files or {}).items():  # small files that make the checkpoint usable as a model
            (tmp / name).write_text(text)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(capture_rng(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        files = {p.name: _describe(p) for p in sorted(tmp.iterdir())}
        weights = "all" if base is None else TRAINABLE
        manifest = {"format": FORMAT, "step": state.step, "weights": weights, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: it vouches for the rest
    return Checkpoint(target, state.step)


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
    """Restore weights (`load_weights`), optimizer, scheduler, scaler and RNG states; return the loop state."""
    load_weights(path, model)
    if optimizer is not None:
        optimizer.load_state_dict(_load(path / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(_load(path / "scaler.pt"))
    restore_rng(_load(path / "rng.pt"))
    return load_trainer_state(path)


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
