"""Exporting a run: a self-contained Hugging Face directory (merged or adapter-only) with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmforge.atomic import check_target, owned_dir
from lmforge.engine.checkpoint import holds_trainable_only
from lmforge.errors import UserError
from lmforge.eval.generation import HINTS_FILE
from lmforge.eval.target import load_target, resolve_target
from lmforge.export.card import CARD_PATH, check_license, load_snippet, model_card
from lmforge.models.peft import BASE_FILE, save_base_config, verify_base, write_base_record

__all__ = ["CARD_PATH", "export_run", "load_snippet", "model_card"]  # the card's names, kept importable here


def export_run(
    target: Path,
    out: Path,
    merge_lora: bool = False,
    force: bool = False,
    license: str | None = None,
) -> Path:
    """Write `out/`: weights (safetensors), config, tokenizer, generation config, README.md model card,
    from a finished run, a paused run (its newest checkpoint) or a checkpoint directory.

    A LoRA run is exported as its adapter (loadable with peft on top of the base model) unless
    `merge_lora`, which folds the adapter into the base weights for a plain transformers model.
    `out` may be new, empty or an earlier export; another directory only with `force`, and nothing
    lmforge did not write is deleted (`atomic.owned_dir`). `license` is the card's Hub licence id
    (e.g. apache-2.0); None carries the base model's, if its card names one (`card.model_card`).

    Raises:
        UserError: a run that cannot be exported, an `out` that holds other files, or a `license`
            that is no lowercase Hub licence id (`card.check_license`).
    """
    if license is not None:
        check_license(license)  # before anything is read or loaded
    check_target(Path(out), force)  # before minutes of loading, not after
    kind, model_dir = resolve_target(Path(target))
    if kind == "model":
        raise UserError(f"{target}: a model directory already; export takes a run, a paused run or a checkpoint")
    run_dir = model_dir.parent if kind == "run" else model_dir.parent.parent
    model, tokenizer, config = load_target(Path(target))
    adapter = config.lora is not None
    if merge_lora and not adapter:
        raise UserError(f"--merge-lora: {target} was fully fine-tuned; it has no adapter to merge")
    merged = False
    if adapter and merge_lora:
        model = model.merge_and_unload()
        merged = True
    step = None if kind == "run" else json.loads((model_dir / "trainer_state.json").read_text())["step"]
    with owned_dir(Path(out), force=force) as tmp:
        model.save_pretrained(str(tmp))
        if adapter and not merged:
            save_base_config(model, tmp)
            full_checkpoint = kind == "checkpoint" and not holds_trainable_only(model_dir)  # (else load_target checked)
            _copy_base_record(model_dir, run_dir, tmp, verify=full_checkpoint)
            _sort_target_modules(tmp / "adapter_config.json")
        tokenizer.save_pretrained(str(tmp))
        if (model_dir / HINTS_FILE).is_file():
            shutil.copy(model_dir / HINTS_FILE, tmp / HINTS_FILE)
        for name in ("eval.json", "config.yaml", "data_report.json") if step is None else ("data_report.json",):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, tmp / f"lmforge_{name}")
        if step is not None:
            shutil.copy(model_dir / "config.yaml", tmp / "lmforge_config.yaml")
        (tmp / "README.md").write_text(model_card(run_dir, config, adapter and not merged, step, license))
    return Path(out)


def _copy_base_record(model_dir: Path, run_dir: Path, out: Path, verify: bool) -> None:
    """The adapter's lmforge_base.json (the model directory's, else the run's) into `out`; with
    `verify` (a checkpoint that holds every weight, loaded without its base: an older lmforge's) the
    base on this machine must match it."""
    for record_path in (model_dir / BASE_FILE, run_dir / BASE_FILE):
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if verify:
                fix = "; or export with --merge-lora: the checkpoint holds every weight"
                verify_base(record, model_dir, record_path, fix)
            write_base_record(out, record)
            return


def _sort_target_modules(path: Path) -> None:
    """peft writes target_modules, a set, in hash order, which differs between processes: sorted,
    the same adapter exports to the same bytes (a push again sends nothing)."""
    if path.is_file():
        config = json.loads(path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
