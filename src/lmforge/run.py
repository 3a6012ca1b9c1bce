"""A training run from config to outputs: data, model, loop, evaluation, samples, files.

runs/<name>-<time>/
  config.yaml      the resolved config
  data_report.json documents, tokens and blocks per split
  metrics.jsonl    every logged point
  eval.json        final validation and test metrics
  examples.jsonl   samples before and after training, with references
  final/           Hugging Face model directory (safetensors, config, tokenizer, README.md model card)
  tracking.json    each tracking backend's run id, and the points it is missing
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from rich.console import Console
from rich.markup import escape

from lmforge import malloc
from lmforge.atomic import atomic_dir
from lmforge.config import Config, dump_yaml, resume_differences, saved_config
from lmforge.data.formats import split_markers
from lmforge.data.loader import StepPlan
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.data.report import data_report_lines, data_warnings
from lmforge.engine.checkpoint import (
    Checkpoint,
    checkpoint_name,
    holds_trainable_only,
    latest_valid,
    list_checkpoints,
    load_trainer_state,
    load_weights,
    sharded_layout,
    verify,
)
from lmforge.engine.loop import (
    PAUSES,
    EvalHook,
    TrainResult,
    cpu_has_native_bf16,
    distributed_cpu,
    resolve_precision,
    total_steps,
    train,
)
from lmforge.engine.optim import schedule_change
from lmforge.engine.progress import format_duration
from lmforge.engine.sharding import fsdp_settings, resolve_strategy
from lmforge.engine.threads import default_threads
from lmforge.errors import UserError
from lmforge.eval.evaluate import describe, evaluate_split
from lmforge.eval.generation import HINTS_FILE, Prompt, hints_of, prompts_and_references, respond
from lmforge.export.export import model_card
from lmforge.models.build import build_model, count_parameters
from lmforge.models.peft import BASE_FILE, base_record, check_quantization, save_base_config, write_base_record
from lmforge.results.plugins import plugins_for
from lmforge.tracking.base import RUN_ARTIFACTS, Trackers, open_trackers, saved_ids

T = TypeVar("T")


@dataclass
class RunOutcome:
    run_dir: Path | None
    """None for a dry run."""
    eval: dict
    paused: str | None = None
    """Why a run stopped early to be resumed (SIGTERM, SIGINT, max_time); None if it finished."""


def quick_test_config(config: Config) -> Config:
    """A few steps and a tiny evaluation: checks a config end to end in seconds."""
    quick = config.model_copy(deep=True)
    quick.name = f"{config.name}-quick-test"
    quick.train.max_steps = min(config.train.max_steps or 3, 3)
    quick.train.eval_every = None
    quick.train.log_every = 1
    if quick.train.warmup_steps is not None:  # (a wsd schedule needs its decay after the warmup)
        quick.train.warmup_steps = min(quick.train.warmup_steps, 1)
    quick.train.lr_find.num_steps = min(config.train.lr_find.num_steps, 10)  # train.lr=find: a short test,
    quick.train.lr_find.smoothing = min(config.train.lr_find.smoothing, 0.8)  # smoothed for its length
    quick.eval.max_batches = 2
    quick.eval.at_start = False
    quick.eval.generate.num_examples = min(config.eval.generate.num_examples, 2)
    quick.eval.generate.max_new_tokens = min(config.eval.generate.max_new_tokens, 16)
    quick.eval.generate.max_examples = min(config.eval.generate.max_examples, 8)
    return quick


def new_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.output_dir) / f"{config.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def run_train(
    config: Config,
    console: Console,
    dry_run: bool = False,
    resume: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    run_dir: Path | None = None,
    on_eval: EvalHook | None = None,
) -> RunOutcome:
    """Prepare data, build the model, train (or resume), evaluate, and write the run directory.

    Args:
        resume: "auto" (the newest valid checkpoint of the newest run with this name, if any) or
            the path of a checkpoint or run directory.
        config_path, overrides: the config file and command-line overrides, only to print the
            command that resumes a paused run.
        run_dir: this directory instead of a new <output_dir>/<name>-<time>/ (a sweep's trial):
            the run continues from its newest valid checkpoint if it has one, else starts there.
        on_eval: called after each validation evaluation past step 0 (see `engine.loop.train`);
            a stop reason it returns ("pruned") ends the run without final outputs.
    """
    started = time.perf_counter()
    warn = lambda message: console.print(f"[yellow]warning: {message}[/yellow]")  # noqa: E731
    precision = resolve_precision(config.train.precision)  # fails early on an impossible choice
    check_quantization(config)
    process = job_state(config)  # one per process of a job; the main one writes and logs
    if not process.is_main_process:
        console = Console(quiet=True)
    check_mirror(config)
    if run_dir is not None:
        checkpoint = latest_valid(run_dir / "checkpoints", warn) if (run_dir / "checkpoints").is_dir() else None
    else:
        log = lambda message: console.print(message, highlight=False)  # noqa: E731
        # a checkpoint in the mirror is downloaded once per machine, by its first process
        find = lambda: find_resume_checkpoint(config, resume, warn, log) if resume else None  # noqa: E731
        checkpoint = same_checkpoint_everywhere(process, machine_by_machine(process, find))
    if checkpoint is not None:
        config = as_resolved_before(checkpoint, config, console)
        check_resume_config(checkpoint, config, warn, process.num_processes)
    held = run_dir or (checkpoint.path.parent.parent if checkpoint is not None else None)
    if held is not None and process.is_main_process:
        held.mkdir(parents=True, exist_ok=True)
    with run_lock(held if process.is_main_process else None):
        how = Launch(dry_run, config_path, overrides, started, run_dir, on_eval)
        return _run(config, console, warn, precision, checkpoint, process, how)


@dataclass
class Launch:
    """How run_train was called, for _run."""

    dry_run: bool
    config_path: str | None
    overrides: list[str] | None
    started: float
    run_dir: Path | None
    on_eval: EvalHook | None


@contextmanager
def run_lock(run_dir: Path | None) -> Iterator[None]:
    """Hold the run directory for this process: a second lmforge resuming the same run at the same
    time would interleave checkpoints and metrics, so it is refused at once.

    Raises:
        UserError: another process holds the run.
    """
    if run_dir is None:
        yield
        return
    import fcntl

    with (run_dir / ".lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise UserError(
                f"{run_dir} is being trained by {holder} right now; wait for it to stop (or stop it), then resume"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"lmforge (pid {os.getpid()})")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(config, console, warn, precision, checkpoint, process, how: Launch) -> RunOutcome:
    """run_train after the checks: data, model, plan, training, outputs."""
    plugins = plugins_for(config)
    base = adapter_base(config)
    if checkpoint is not None:
        check_resume_base(checkpoint, base)
    config, data, model, plan, steps = _data_and_model(config, console, process)
    trainable, total = count_parameters(model)
    _print_plan(console, config, data, model, trainable, total, plan, steps, precision)
    _warn_before_training(data.report, data.tokenizer, config, checkpoint, plan, steps, warn)
    config, finder = _lr_of_run(config, model, data, console, how.dry_run)
    if how.dry_run:
        return _end_dry_run(console, data, checkpoint)

    run_dir, saved = _run_dir(config, process, checkpoint, how.run_dir, console)
    check_shared_checkpoints(run_dir, process, resolve_strategy(config, process.num_processes))
    main = process.is_main_process
    trackers = _open_outputs(config, run_dir, data, saved, main, warn, console, how.config_path, base)
    trackers.log_params({"model.parameters": total, "model.trainable_parameters": trainable})
    _record_lr_find(finder if main else None, run_dir, trackers)
    status = "FAILED"
    try:
        prompts = prompts_and_references(data.samples, data.tokenizer, config.eval.generate)
        hints = hints_of(data, config)
        if saved is None and main:
            before = respond(model, data.tokenizer, prompts, config.eval.generate, seed=config.seed, hints=hints)
            _write_examples(run_dir / "examples.jsonl", prompts, before, "before", 0, append=False)
        result = train(
            model,
            data,
            config,
            trackers,
            console=console,
            checkpoint_dir=run_dir / "checkpoints",
            resume_from=checkpoint.path if checkpoint else None,
            on_eval=how.on_eval,
            base=base,
        )
        state = result.state
        if state.stop_reason in PAUSES:
            status = "KILLED"
            if main:
                _print_pause(console, run_dir, state, how.config_path, how.overrides or [], how.run_dir is None)
            return RunOutcome(run_dir, {}, paused=state.stop_reason)
        if state.stop_reason == "pruned":  # a sweep's loser: no test evaluation, samples or final model
            status = "KILLED"
            return _end_pruned(run_dir, state, main, console)
        if not main:
            status = "FINISHED"
            return RunOutcome(run_dir, {})
        final_eval = finish_outputs(result, data, config, trackers, run_dir, prompts, console, base, hints, plugins)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        missing = trackers.finish(status)
    _print_summary(console, run_dir, state.eval_history, final_eval, trackers, how.started)
    if missing:
        console.print(f"[yellow]tracking incomplete[/yellow]: {', '.join(missing)}; run `lmforge sync {run_dir}`")
    if how.run_dir is None:
        link = link_latest(run_dir, config.name)
        console.print(f"latest:   {link / 'final'} (points at this run)", highlight=False)
    return RunOutcome(run_dir, final_eval)


def _data_and_model(config: Config, console: Console, process: PartialState):
    """(config, data, model, plan, steps) of a run, and of `lmforge lr-find`: the data prepared
    (the main process fills the cache, the others read it), a model built from the seeded RNGs, the
    step plan and the run's length, and the config with the curriculum's default length resolved
    over that length."""
    torch.set_num_threads(config.train.num_threads or default_threads()[0])
    data = prepare_per_node(config, process, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    set_seed(config.seed)
    model = build_model(config, data.tokenizer, labels=data.labels)
    train = config.train  # the loop's plan: steps per epoch depend on the number of processes
    plan = StepPlan(len(data.splits["train"]), train.micro_batch_size, train.grad_accum, process.num_processes)
    steps = total_steps(train, plan)
    return resolved_curriculum(config, steps), data, model, plan, steps


def job_state(config: Config) -> PartialState:
    """This process's place in its job (accelerate's PartialState; the process group, over gloo on a
    machine without CUDA, with distributed.timeout_minutes), set up on first use."""
    from datetime import timedelta

    return PartialState(cpu=distributed_cpu(), timeout=timedelta(minutes=config.distributed.timeout_minutes))


def prepare_per_node(config: Config, process: PartialState, log) -> PreparedData:
    """`prepare_data` in every process of a job, the work done once per machine (see
    `machine_by_machine`): the first process of each machine finds a shared data.cache_dir filled, or
    fills its own machine's (nodes need no shared disk); the rest read their machine's cache. A job
    whose data takes long to tokenize is best prepared before it starts (`lmforge data prepare`;
    `lmforge train --nproc` does it itself), so that no process waits past
    distributed.timeout_minutes."""
    return machine_by_machine(process, lambda: prepare_data(config, log=log))


def machine_by_machine(process: PartialState, work: Callable[[], T]) -> T:
    """work() once in every process of a job, in three waves so that what one process writes to
    its machine's disk (a data cache, a checkpoint downloaded from the mirror) is there before the
    next reads it: the main process, then the first process of each other machine, then the rest.
    One process alone simply calls it."""
    if process.num_processes == 1:
        return work()
    first_wave = process.is_main_process
    second_wave = process.is_local_main_process and not first_wave
    result = work() if first_wave else None
    process.wait_for_everyone()
    if second_wave:
        result = work()
    process.wait_for_everyone()
    return result if first_wave or second_wave else work()


def same_checkpoint_everywhere(process: PartialState, checkpoint: Checkpoint | None) -> Checkpoint | None:
    """The main process's checkpoint to resume from, checked to be the one every process found: on
    machines that share no output_dir, a resumed job needs each machine to hold it.

    Raises:
        UserError: in a process whose machine lacks the main process's checkpoint (or found another).
    """
    if process.num_processes == 1:
        return checkpoint
    mine = (str(checkpoint.path), checkpoint.step) if checkpoint is not None else None
    chosen = broadcast_object_list([mine])[0]
    if chosen == mine:
        return checkpoint
    if chosen is None:
        raise UserError(f"process {process.process_index} found checkpoint {mine[0]}, the main process none")
    raise UserError(
        f"process {process.process_index} (machine {os.environ.get('GROUP_RANK', '?')}) has no copy of the checkpoint "
        f"the main process resumes from, {chosen[0]}: a job on several machines resumes from an output_dir they "
        "share, or from train.mirror (--resume auto pulls the newest checkpoint onto every machine); copy the run "
        "directory there, or set train.mirror"
    )


def _lr_of_run(config: Config, model, data: PreparedData, console: Console, dry_run: bool):
    """(config, LrFindResult or None): train.lr=find runs the range test, except in a dry run."""
    if config.train.lr != "find":
        return config, None
    if dry_run:
        console.print("train.lr=find: the learning-rate range test runs before training", highlight=False)
        return config, None
    return find_lr(config, model, data, console)


def _record_lr_find(result, run_dir: Path, trackers: Trackers) -> None:
    """lr_find.json and lr_find.png in the run directory, logged as artifacts, and the suggestions as
    parameters lr_find.<name> (nothing without a result)."""
    if result is None:
        return
    for path in result.save(run_dir):
        trackers.log_artifact(path)
    trackers.log_params({f"lr_find.{name}": lr for name, lr in result.suggestions.items()})


def find_lr(config: Config, model, data: PreparedData, console: Console, training: bool = True):
    """train.lr=find: the range test (engine.lr_find) on the run's model and data, and the config
    with train.lr set to its train.lr_find.suggestion; returns (config, LrFindResult).

    Args:
        training: the run trains with the suggestion (train.lr=find), which a curve that never
            fell refuses; else (lmforge lr-find) that is a warning.

    Raises:
        UserError: the test had too few finite losses to suggest anything, or (training) its loss
            never fell.
        KeyboardInterrupt: a signal stopped the test.
    """
    from lmforge.engine.lr_find import range_test

    cfg = config.train.lr_find
    console.print(
        f"train.lr=find: learning-rate range test, {cfg.num_steps} steps from {cfg.start_lr:.1e} to {cfg.end_lr:.1e}",
        highlight=False,
    )
    try:
        result = range_test(model, data, config, console)
    except ValueError as exc:
        raise UserError(f"train.lr=find: {exc}") from None
    found = config.model_copy(deep=True)
    found.train.lr = result.suggestions[cfg.suggestion]
    shown = ", ".join(f"{name} {lr:.2e}" for name, lr in result.suggestions.items())
    flat = result.flat()
    if flat and training:
        raise UserError(f"train.lr=find: {flat}; nothing was trained. `lmforge lr-find CONFIG` shows the curve")
    if flat:
        console.print(f"[yellow]warning: {flat}[/yellow]", highlight=False)
    then = f"training with the {cfg.suggestion} one, train.lr={found.train.lr:.3g}" if training else ""
    said = f"train.lr=find: {result.stopped}; suggestions {shown}"
    console.print(said + (f"; {then}" if then else ""), highlight=False)
    return found, result


def run_lr_find(config: Config, console: Console, out: Path | None = None):
    """`lmforge lr-find`: prepare the data, build the model as training would, run the range test
    and save lr_find.json and lr_find.png in `out` (default <output_dir>/<name>-lr-find-<time>/);
    returns (LrFindResult, the directory).

    Raises:
        UserError: the test had too few finite losses to suggest anything.
    """
    from datetime import datetime

    resolve_precision(config.train.precision)
    check_quantization(config)
    process = job_state(config)
    if not process.is_main_process:
        console = Console(quiet=True)
    config, data, model, _, _ = _data_and_model(config, console, process)  # the model and data training would have
    found, result = find_lr(config, model, data, console, training=False)
    out = out or Path(config.output_dir) / f"{config.name}-lr-find-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if process.is_main_process:
        result.save(out)
        console.print(f"curve and suggestions: {out / 'lr_find.json'}, {out / 'lr_find.png'}", highlight=False)
        console.print(
            f"train with it: train.lr={found.train.lr:.3g} (or train.lr: find, which runs this test first)",
            highlight=False,
        )
    return result, out


def as_resolved_before(checkpoint: Checkpoint, config: Config, console: Console) -> Config:
    """The settings a run resolved when it started, taken from the checkpoint's config where this
    config leaves them to be resolved: train.lr=find goes on with the learning rate its range test
    found (the test does not run again), and a curriculum's default length stays the half of the
    run it was, whatever train.max_steps is now."""
    saved = saved_config(checkpoint.path / "config.yaml")
    resumed = config.model_copy(deep=True)
    if config.train.lr == "find":
        resumed.train.lr = saved.train.lr
        console.print(f"train.lr=find: resuming with the learning rate found before, {resumed.train.lr:.3g}")
    ours, theirs = resumed.data.curriculum, saved.data.curriculum
    if ours is not None and theirs is not None and ours.steps is None and not ours.stages:
        ours.steps = theirs.steps
    return resumed


def resolved_curriculum(config: Config, steps: int) -> Config:
    """The config with data.curriculum.steps, when left to its default, set to half of the run's
    `steps`: the saved config says the curriculum's length, and a resume with another length keeps it."""
    curriculum = config.data.curriculum
    if curriculum is None or curriculum.stages or curriculum.steps is not None:
        return config
    resolved = config.model_copy(deep=True)
    resolved.data.curriculum.steps = max(1, steps // 2)
    return resolved


def adapter_base(config: Config) -> dict | None:
    """A LoRA run's record of its base model (models.peft.base_record); None otherwise. An s3://
    base is recorded as given and as the local copy it was loaded from."""
    if not (config.lora and config.model.name_or_path):
        return None
    from lmforge.publish.push import local_model

    record = base_record(local_model(config.model.name_or_path, config.storage))
    record["given_as"] = config.model.name_or_path
    return record


def check_resume_base(checkpoint: Checkpoint, base: dict | None) -> None:
    """A checkpoint of an adapter run's trainable weights resumes on the base it was trained on only.

    Raises:
        UserError: the run's base model (`base`, `adapter_base`) has other weights than the
            checkpoint's record of its base.
    """
    record_path = checkpoint.path / BASE_FILE
    if not holds_trainable_only(checkpoint.path) or not record_path.is_file():
        return
    saved = json.loads(record_path.read_text())
    if base is None or saved.get("fingerprint") in (None, base.get("fingerprint")):
        return
    raise UserError(
        f"{checkpoint.path} holds LoRA adapters trained on the base model {saved['path']} (fingerprint "
        f"{saved['fingerprint'][:12]}), and model.name_or_path now loads {base['path']} (fingerprint "
        f"{str(base.get('fingerprint'))[:12]}): other weights. Adapters on another base give wrong outputs; resume "
        "with the base they were trained on, or start a new run"
    )


def _end_dry_run(console: Console, data: PreparedData, checkpoint: Checkpoint | None) -> RunOutcome:
    for line in data_report_lines(data.report):
        console.print(line, highlight=False)
    if checkpoint is not None:
        console.print(f"a run would resume from {checkpoint.path} (step {checkpoint.step})", highlight=False)
    console.print("dry run: config and data are valid; nothing was trained")
    return RunOutcome(None, {})


def _run_dir(config: Config, process, checkpoint: Checkpoint | None, given: Path | None, console):
    """(run directory, saved trainer state or None): the checkpoint's run, the given directory, or a
    new one."""
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint.path} (step {checkpoint.step})")
        if process.is_main_process:
            set_aside_later(checkpoint, console)
        return checkpoint.path.parent.parent, load_trainer_state(checkpoint.path)
    if given is None:
        return shared_run_dir(config, process), None
    for name in ("metrics.jsonl", "tracking.json", "eval.json", "examples.jsonl"):  # an attempt that saved nothing
        (given / name).unlink(missing_ok=True)
    return given, None


def set_aside_later(checkpoint: Checkpoint, console: Console) -> None:
    """A resume from a checkpoint that is not its run's newest starts another history from it. The
    later checkpoints of the first history move to <run>/abandoned/after-step-N-<time>/, kept, but
    where --resume auto no longer finds them (it would take the newest, of the other history)."""
    later = [c for c in list_checkpoints(checkpoint.path.parent) if c.step > checkpoint.step]
    if not later:
        return
    aside = checkpoint.path.parent.parent / "abandoned" / f"after-step-{checkpoint.step}-{datetime.now():%Y%m%d-%H%M%S}"
    aside.mkdir(parents=True)
    for later_one in later:
        later_one.path.rename(aside / later_one.path.name)
    names = ", ".join(c.path.name for c in later)
    console.print(
        f"[yellow]warning: the run goes on from step {checkpoint.step}: its later checkpoints ({names}) "
        f"are set aside in {aside}[/yellow]"
    )


def check_shared_checkpoints(run_dir: Path, process: PartialState, strategy: str) -> None:
    """Under FSDP and DeepSpeed every process writes its shards into the run's checkpoints/ and a resume reads
    them all, so every machine of the job must see the run directory machine 0 made: a shared
    output_dir. Checked with a file the main process writes there, before anything trains.

    Raises:
        UserError: (in every process) a process does not see the file.
    """
    if strategy not in ("fsdp", "deepspeed") or process.num_processes == 1:
        return
    token = run_dir / ".lmforge-shared"
    if process.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        token.write_text(str(os.getpid()))
    process.wait_for_everyone()
    seen = gather_object([token.is_file()])
    process.wait_for_everyone()
    if process.is_main_process:
        token.unlink()
    if not all(seen):
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        raise UserError(
            f"distributed.strategy={strategy}: process{'es' * (len(blind) > 1)} {', '.join(map(str, blind))} "
            f"cannot see the run directory {run_dir} that machine 0 made: each process writes its shards of every "
            "checkpoint there, so the machines need a shared output_dir (a network filesystem). Give them one, "
            "or use distributed.strategy=ddp, whose checkpoints machine 0 writes alone"
        )


def _end_pruned(run_dir: Path, state, main: bool, console) -> RunOutcome:
    """A pruned run's eval.json: its step, stop reason and last validation."""
    pruned = {"step": state.step, "stop_reason": "pruned", "validation": state.eval_history[-1]}
    if main:
        (run_dir / "eval.json").write_text(json.dumps(pruned, indent=2))
        console.print(f"pruned at step {state.step}: {describe(state.eval_history[-1])}", highlight=False)
    return RunOutcome(run_dir, pruned)


def _open_outputs(
    config: Config, run_dir: Path, data, saved, main: bool, warn, console, config_path, base: dict | None
) -> Trackers:
    """The run's config, data report and adapter base record (main process), and its trackers,
    continuing a resumed run's."""
    if main and base is not None:  # a checkpoint's adapter is exported with it
        (run_dir / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
    if main:
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        report = {**data.report, "working_dir": os.getcwd()}  # what the config's relative paths are relative to
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
        for line in data_report_lines(data.report):
            console.print(f"[dim]{line}[/dim]", highlight=False)
    trackers = open_trackers(
        config,
        run_dir,
        warn,
        resume_ids={**saved.tracker_ids, **saved_ids(run_dir)} if saved else None,
        keep_lines=saved.metrics_lines if saved else None,
        resume_step=saved.step if saved else None,
        main_process=main,
        project_dir=Path(config_path).resolve().parent if config_path else None,
    )
    if saved is None:
        trackers.log_metrics(data_metrics(data.report), 0)
    return trackers


def shared_run_dir(config: Config, process: PartialState) -> Path:
    """A new run directory, made by the main process; every process of the job gets its path."""
    name = [str(new_run_dir(config)) if process.is_main_process else None]
    if process.num_processes > 1:
        name = broadcast_object_list(name)
    return Path(name[0])


def link_latest(run_dir: Path, name: str) -> Path:
    """runs/<name>-latest points at the newest finished run: a stable path for the next config."""
    link = run_dir.parent / f"{name}-latest"
    tmp = run_dir.parent / f".{name}-latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    return link


def finish_outputs(
    result: TrainResult,
    data,
    config: Config,
    trackers,
    run_dir: Path,
    prompts,
    console,
    base: dict | None = None,
    hints: dict | None = None,
    plugins: list | None = None,
) -> dict:
    """Best-weight restore, test evaluation, predictions.jsonl, final/ model, eval.json, samples, artifacts.

    Args:
        base: an adapter run's base record (`peft.base_record`), saved beside the adapter.
        hints: `generation.hints_of` the data: how prompts are cut and answers end, saved too.
        plugins: `results.plugins.load_plugins` of eval.metrics_plugins."""
    model, state = result.model, result.state
    stopping = config.train.early_stopping
    validation = state.eval_history[-1]
    final_eval: dict = {"step": state.step, "stop_reason": state.stop_reason}
    if stopping and stopping.restore_best and state.best_step is not None and state.best_step != state.step:
        load_weights(run_dir / "checkpoints" / checkpoint_name(state.best_step), model)
        validation = next(e for e in state.eval_history if e["step"] == state.best_step)
        final_eval["restored_best_step"] = state.best_step
        console.print(f"restored the best weights, from step {state.best_step}, into final/")
    final_eval["validation"] = validation
    if "test" in data.splits:
        details: dict = {}
        final_eval["test"] = evaluate_split(model, data, "test", config, details=details, whole=True)
        if not config.eval.predictions:
            trackers.log_metrics({f"test/{k}": v for k, v in final_eval["test"].items()}, state.step)
        if details:
            final_eval["test_confusion_matrix"] = {"labels": data.labels, "matrix": details["confusion_matrix"]}
    after = respond(model, data.tokenizer, prompts, config.eval.generate, seed=config.seed, hints=hints)
    if config.eval.predictions:
        final_eval.update(_predictions(model, data, config, run_dir, final_eval, hints, plugins, console))
        for section in ("generation", "test"):
            if section in final_eval:
                numbers = {k: v for k, v in final_eval[section].items() if isinstance(v, int | float)}
                trackers.log_metrics({f"{section}/{k}": v for k, v in numbers.items()}, state.step)
    (run_dir / "eval.json").write_text(json.dumps(final_eval, indent=2))
    card = model_card(run_dir, config, adapter_only=config.lora is not None)
    save_final_model(model, data, run_dir / "final", card, base, hints)
    _write_examples(run_dir / "examples.jsonl", prompts, after, "after", state.step, append=True)
    for name in RUN_ARTIFACTS:
        if (run_dir / name).is_file():
            trackers.log_artifact(run_dir / name)
    trackers.log_model(run_dir)
    joiner = "  ->  " if config.model.task == "classification" else ""
    final_eval["samples"] = [p.text + joiner + t for p, t in zip(prompts, after, strict=True)]
    return final_eval


def _predictions(model, data, config: Config, run_dir: Path, final_eval: dict, hints, plugins, console) -> dict:
    """predictions.jsonl of the test split (else validation), and what it adds to eval.json: the
    generation metrics of its greedy answers, a classifier's plugin values, plugin errors."""
    from lmforge.data.prepare import split_records
    from lmforge.results.analysis import intervals
    from lmforge.results.predictions import PREDICTIONS, read_predictions, write_predictions

    split = "test" if "test" in data.splits else "validation"
    summary = write_predictions(
        run_dir / PREDICTIONS,
        model,
        data.tokenizer,
        split_records(config.data, split),
        config.data,
        config.eval,
        split,
        labels=data.labels,
        seed=config.seed,
        hints=hints,
        plugins=plugins,
        warn=lambda m: console.print(f"[yellow]{m}[/yellow]", highlight=False),
    )
    added: dict = {"predictions": {"split": split, "examples": summary.examples, "pieces": summary.pieces}}
    rows = read_predictions(run_dir / PREDICTIONS)
    try:
        added["intervals"] = intervals(rows, data.labels, split, config.eval.bootstrap_resamples, config.seed)
    except ValueError as exc:  # an analysis problem must not cost the run its final model
        console.print(f"[yellow]no bootstrap intervals: {exc}[/yellow]", highlight=False)
    if summary.generation:
        added["generation"] = {"split": split, **summary.generation}
    if summary.classification:
        added[split] = {**final_eval[split], **summary.classification}
    if summary.plugin_errors:
        added["plugin_errors"] = summary.plugin_errors
    added |= {"judge": summary.judge} if summary.judge else {}  # eval.judge's counts
    return added


_RUN_DIR = r"-\d{8}-\d{6}(-\d+)?$"


def find_resume_checkpoint(config: Config, resume: str, warn, log=print) -> Checkpoint | None:
    """The checkpoint to resume from; None when "auto" finds no earlier run. With train.mirror,
    "auto" takes the mirror's newest checkpoint when it is newer than the local one (downloading it
    into output_dir), so a fresh machine continues where the lost one stopped."""
    if resume == "auto":
        pattern = re.compile(re.escape(config.name) + _RUN_DIR)
        out = Path(config.output_dir)
        runs = sorted((d for d in out.glob(f"{config.name}-*") if pattern.match(d.name)), reverse=True)
        local = next((c for run in runs if (c := latest_valid(run / "checkpoints", warn)) is not None), None)
        if config.train.mirror:
            return _newer_in_mirror(config, pattern, local, warn, log)
        if local is None:
            warn(f"no checkpoint of a run named {config.name!r} in {out}/: starting a new run")
        return local
    path = Path(resume)
    if (path / "manifest.json").exists() or path.name.startswith("step-"):
        problem = verify(path)
        if problem is not None:
            raise UserError(f"--resume {resume}: not a usable checkpoint: {problem}")
        return Checkpoint(path, load_trainer_state(path).step)
    if (path / "checkpoints").is_dir():
        checkpoint = latest_valid(path / "checkpoints", warn)
        if checkpoint is None:
            raise UserError(f"--resume {resume}: no valid checkpoint in {path / 'checkpoints'}")
        return checkpoint
    raise UserError(f"--resume {resume}: neither a checkpoint (with manifest.json) nor a run directory")


def _newer_in_mirror(config: Config, pattern, local: Checkpoint | None, warn, log) -> Checkpoint | None:
    """The local checkpoint, or the mirror's newest when it is newer (a later run, or a later step
    of the same run): downloaded into output_dir first."""
    from lmforge.publish.mirror import fetch_checkpoint, newest_mirrored

    remote = newest_mirrored(config, pattern, warn)
    mine = (local.path.parent.parent.name, local.step) if local is not None else None
    if remote is None or (mine is not None and mine >= remote):
        if local is None:
            warn(
                f"no checkpoint of a run named {config.name!r} in {config.output_dir}/ or the mirror "
                f"{config.train.mirror}: starting a new run"
            )
        return local
    return fetch_checkpoint(config, *remote, log=log)


def check_mirror(config: Config) -> None:
    """Say at once when train.mirror cannot be reached (a wrong bucket, no credentials), not after
    the first checkpoint.

    Raises:
        UserError: the mirror refuses or cannot be reached.
    """
    from lmforge.publish.mirror import mirror_store
    from lmforge.publish.storage import check_writable

    if config.train.mirror:
        try:
            check_writable(mirror_store(config))
        except UserError as exc:
            raise UserError(f"train.mirror: {exc}") from None


def check_resume_ahead(config: Config, resume: str, processes: int) -> None:
    """run_train's resume checks, made by `lmforge train --nproc` before it starts a job of
    `processes` on this machine, so that a refusal is said once and plainly rather than by every
    process under torchrun's report. A checkpoint only the mirror holds is checked by the job, which
    downloads it first.

    Raises:
        UserError: as run_train would: no such checkpoint, or a resume it refuses.
    """
    if resume == "auto" and config.train.mirror:
        return
    quiet = lambda message: None  # noqa: E731  (the job says its warnings)
    checkpoint = find_resume_checkpoint(config, resume, quiet, quiet)
    if checkpoint is not None:
        resolved = as_resolved_before(checkpoint, config, Console(quiet=True))
        check_resume_config(checkpoint, resolved, quiet, processes)


def check_deepspeed_resume(checkpoint: Checkpoint, strategy: str, saved_world: int, world_size: int) -> None:
    """A DeepSpeed checkpoint holds ZeRO's partitions of the optimizer state (and at stage 3 of the
    weights), one file per process: it resumes under DeepSpeed on as many processes as wrote it, and
    a checkpoint written without DeepSpeed does not resume under it.

    Raises:
        UserError: the strategy or, for a DeepSpeed checkpoint, the number of processes changed.
    """
    written = (sharded_layout(checkpoint.path) or {}).get("strategy")
    if (written == "deepspeed") != (strategy == "deepspeed"):
        raise UserError(
            f"cannot resume {checkpoint.path} with distributed.strategy={strategy}: it was written "
            f"{'with' if written == 'deepspeed' else 'without'} DeepSpeed, whose checkpoints hold ZeRO's own "
            "partitions; resume it with the strategy it was written with, or export its weights (lmforge export "
            f"{checkpoint.path} --out DIR) and start a new run from DIR (model.name_or_path)"
        )
    if written == "deepspeed" and saved_world != world_size:
        raise UserError(
            f"cannot resume {checkpoint.path} on {world_size} process{'es' * (world_size > 1)}: DeepSpeed wrote "
            f"its ZeRO partitions for {saved_world}; resume with --nproc {saved_world} (distributed.strategy=fsdp "
            "checkpoints resume on any number)"
        )


def check_resume_config(checkpoint: Checkpoint, config: Config, warn, world_size: int = 1) -> None:
    """Refuse a resume whose config changes the model, the data or the optimisation.

    A job of another number of processes than the checkpoint's resumes when each optimizer step
    still takes the same micro-batches: train.grad_accum x processes unchanged (from 2 processes
    with grad_accum 1 to 1 with grad_accum 2), and then the data continues where it was."""
    saved = saved_config(checkpoint.path / "config.yaml")
    allowed, refused = resume_differences(saved, config)
    saved_world = load_trainer_state(checkpoint.path).world_size
    check_deepspeed_resume(checkpoint, resolve_strategy(config, world_size), saved_world, world_size)
    before, now = saved.train.grad_accum * saved_world, config.train.grad_accum * world_size
    if before != now:
        fits = before % world_size == 0
        raise UserError(
            f"cannot resume {checkpoint.path} on {world_size} process{'es' * (world_size > 1)}: it was written by "
            f"{saved_world} with train.grad_accum={saved.train.grad_accum}, {before} micro-batches per step, and "
            f"now a step would take {now}. "
            + (
                f"Set train.grad_accum={before // world_size} to keep each step's data"
                if fits
                else f"Use a number of processes that divides {before}"
            )
        )
    if saved_world != world_size:  # the same global batch: grad_accum may change with the processes
        accum = [line for line in refused if line.startswith("train.grad_accum:")]
        refused = [line for line in refused if line not in accum]
        allowed += [f"{line} ({saved_world} -> {world_size} processes)" for line in accum]
    if refused:
        raise UserError(
            f"cannot resume {checkpoint.path}: these settings differ from the checkpoint's and would change "
            f"the model or data: {'; '.join(refused)}. Restore them, or start a new run "
            "(e.g. from the checkpoint's weights with model.name_or_path)"
        )
    for line in allowed:
        warn(f"resuming with a changed setting: {line}")


def data_metrics(report: dict) -> dict[str, float]:
    """The data report's numbers as metrics: data/<split>/<name>, drops as data/<split>/dropped/<reason>."""
    metrics = {}
    for split, values in report["splits"].items():
        for name, value in values.items():
            if isinstance(value, int | float):
                metrics[f"data/{split}/{name}"] = value
        for reason, count in values["dropped"].items():
            metrics[f"data/{split}/dropped/{reason}"] = count
    return metrics


def save_final_model(
    model,
    data: PreparedData,
    final_dir: Path,
    card: str | None = None,
    base: dict | None = None,
    hints: dict | None = None,
) -> None:
    """An HF directory that plain `from_pretrained` loads (for an adapter run: the adapter, with the
    base model's config and `base` record beside it) and its model card (README.md), written aside
    and renamed into place."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.use_cache = True  # trained without a KV cache; generation wants one
    if getattr(inner, "generation_config", None) is not None and inner.can_generate():
        inner.generation_config.eos_token_id = data.tokenizer.eos_token_id
        inner.generation_config.pad_token_id = data.tokenizer.pad_token_id
    with atomic_dir(final_dir) as tmp:
        model.save_pretrained(str(tmp))
        if inner is not model:  # the base's config beside the adapter: its task, labels and class
            save_base_config(model, tmp)
            if base is not None:
                write_base_record(tmp, base)
        data.tokenizer.save_pretrained(str(tmp))
        if hints is not None:
            (tmp / HINTS_FILE).write_text(json.dumps(hints, ensure_ascii=False, indent=2) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)


def _write_examples(path: Path, prompts: list[Prompt], texts: list[str], stage: str, step: int, append: bool) -> None:
    kept = []
    if append and path.is_file():  # a resumed run may have written "after" rows already
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["stage"] != stage]
    rows = [
        json.dumps(
            {"stage": stage, "step": step, "prompt": p.text, "generated": t, "reference": p.reference},
            ensure_ascii=False,
        )
        for p, t in zip(prompts, texts, strict=True)
    ]
    path.write_text("".join(line + "\n" for line in kept + rows), encoding="utf-8")


def _preset_said(config: Config) -> str:
    """Where a preset of one family gives its sizes to another (model.architecture), the plan says so."""
    from lmforge.models.presets import PRESET_ARCHITECTURES, family

    m = config.model
    if m.preset is None or m.architecture is None or m.name_or_path is not None:
        return ""
    own = PRESET_ARCHITECTURES.get(m.preset, "llama")
    return f", the sizes of the {own} preset {m.preset}" if family(m.architecture, m.preset) != own else ""


def _print_plan(console, config, data, model, trainable, total, plan, steps, precision) -> None:
    splits = data.report["splits"]
    rows = ", ".join(
        f"{name} {s['records']:,} records / {s['tokens']:,} tokens / {s['rows']:,} rows" for name, s in splits.items()
    )
    per_step = config.train.micro_batch_size * config.train.grad_accum * plan.world * config.data.max_length
    strategy = resolve_strategy(config, plan.world)
    deepspeed = config.distributed.deepspeed
    zero = Path(deepspeed.config_file).name if deepspeed.config_file else f"ZeRO-{deepspeed.zero_stage}"
    job = {"ddp": "DDP", "fsdp": "FSDP, weights sharded", "deepspeed": f"DeepSpeed {zero}"}.get(strategy)
    if strategy == "fsdp":
        fsdp = fsdp_settings(config)
        job += ", activations recomputed" * fsdp.activation_checkpointing + ", offloaded to CPU" * fsdp.cpu_offload
    cached = " (from cache)" if data.cache_hit else ""
    console.print(f"data{cached}: {rows}", highlight=False)
    console.print(
        f"model: {getattr(model.config, 'model_type', 'model')}, {total / 1e6:.2f}M parameters, "
        f"{trainable / 1e6:.3f}M trainable ({trainable / total:.2%}), vocab {len(data.tokenizer):,}"
        + _preset_said(config)
        + _dropout_said(config, model),
        highlight=False,
    )
    attention = getattr(model.config, "_attn_implementation", None)
    train, lr = config.train, config.train.lr
    console.print(
        f"plan: {steps:,} steps ({plan.steps_per_epoch:,} per epoch), up to {per_step:,} tokens per step, "
        f"{train.optimizer} at lr {lr if isinstance(lr, str) else f'{lr:.3g}'} ({train.scheduler}), "
        f"precision {precision if precision != 'no' else 'fp32'}"
        + (f", {plan.world} processes ({job})" if plan.world > 1 else "")
        + (f", attention {attention.removeprefix('lmforge_')}" if attention else "")
        + f", {malloc.active()}"
        + ("" if torch.cuda.is_available() else f", {_threads(config.train.num_threads)}"),
        highlight=False,
    )
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        console.print(
            "[yellow]warning: train.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): its bf16 "
            "matmuls are emulated, about 10x slower per training step than fp32 on an AVX2 CPU (bench/RESULTS.md). "
            "train.precision=auto picks fp32 here[/yellow]",
            highlight=False,
        )
    if precision == "bf16" and config.train.precision == "auto" and cpu_has_native_bf16():
        console.print(
            "[dim]precision bf16: this CPU computes bf16 natively (autocast, fp32 master weights; the validation loss "
            "of fp32 at about 2x the speed); train.precision=fp32 trains in fp32[/dim]",
            highlight=False,
        )
    if not torch.cuda.is_available() and (tip := malloc.advice()):
        console.print(f"[dim]{tip}[/dim]", highlight=False)


def _dropout_said(config: Config, model) -> str:
    """', dropout P (the fields set)' when model.dropout is given."""
    if config.model.dropout is None:
        return ""
    from lmforge.models.build import dropout_fields

    return f", dropout {config.model.dropout:g} ({', '.join(dropout_fields(model.config))})"


def _threads(configured: int | None) -> str:
    """The plan's words for the CPU threads: "2 CPU threads (the 2 cores this process may use;
    train.num_threads)", or "(train.num_threads)" alone where the config sets them."""
    n, why = (configured, "") if configured else default_threads()
    return f"{n} CPU thread{'s' if n != 1 else ''} ({why + '; ' if why else ''}train.num_threads)"


def _warn_before_training(
    report: dict, tokenizer, config: Config, checkpoint: Checkpoint | None, plan, steps: int, warn
) -> None:
    """The data's losses, and what a resume with another length does to the schedule."""
    for message in data_warnings(report, config.data):
        warn(message)
    if note := curriculum_beyond_the_run(config, steps):
        warn(note)
    if split := split_markers(config.data, tokenizer):
        warn(
            f"the tokenizer cuts the {config.data.chat_template} chat template's markers {', '.join(split)} into "
            "several ordinary tokens: the model learns them as text and its rows are longer; a tokenizer that has "
            "them as tokens (tokenizer.train gives its own) avoids that"
        )
    if checkpoint is not None:
        saved = saved_config(checkpoint.path / "config.yaml")
        if note := schedule_change(saved.train, config.train, total_steps(saved.train, plan), steps, checkpoint.step):
            warn(note)


def curriculum_beyond_the_run(config: Config, steps: int) -> str:
    """What of data.curriculum a run of `steps` steps never reaches, in words ('' when it reaches
    all of it): stages that start at or after its end, or a phase longer than the run (fine for a run
    to be resumed longer, so a warning, not an error)."""
    curriculum = config.data.curriculum
    if curriculum is None:
        return ""
    if curriculum.stages:
        starts = [0] + [s.until_step for s in curriculum.stages[:-1]]
        never = [i for i, start in enumerate(starts) if start >= steps]
        if never:
            return (
                f"data.curriculum.stages {', '.join(map(str, never))} start at or after step {steps:,}, the run's "
                "last: they never train unless the run is resumed longer (raise train.max_steps or lower until_step)"
            )
        return ""
    if curriculum.steps is not None and curriculum.steps > steps:
        return (
            f"data.curriculum.steps ({curriculum.steps:,}) is longer than the run ({steps:,} steps): it ends before "
            "all the data is in its pool (lower data.curriculum.steps, or resume the run longer)"
        )
    return ""


def resume_command(config_path: str | None, overrides: list[str], resume: str | Path) -> str:
    """The command that resumes a run as it was started: its overrides quoted for the shell."""
    words = ["lmforge", "train", config_path or "CONFIG", *overrides, "--resume", str(resume)]
    return shlex.join(words)


def _print_pause(
    console, run_dir: Path, state, config_path: str | None, overrides: list[str], tell_resume: bool = True
) -> None:
    console.print(
        f"\n[bold yellow]stopped[/bold yellow] ({state.stop_reason}) at step {state.step}; "
        f"checkpoint saved in {run_dir / 'checkpoints' / checkpoint_name(state.step)}"
    )
    if tell_resume:  # a sweep's trial is resumed by its sweep
        console.print(f"resume with: {resume_command(config_path, overrides, run_dir)}", highlight=False, markup=False)


def _print_summary(console, run_dir, history, final_eval, trackers, started) -> None:
    first, last = history[0], history[-1]
    console.print(f"\n[bold green]done[/bold green] in {format_duration(time.perf_counter() - started)}")
    key = "perplexity" if "perplexity" in last else "accuracy"
    if len(history) > 1:
        console.print(
            f"validation {key} {first[key]:.3f} (step {first['step']}) -> {last[key]:.3f} (step {last['step']})",
            highlight=False,
        )
    if "test" in final_eval:
        console.print(f"test: {describe(final_eval['test'])}", highlight=False)
    if "generation" in final_eval:
        console.print(f"generation on held-out prompts: {describe(final_eval['generation'])}", highlight=False)
    for sample in final_eval["samples"][:2]:
        console.print(f"[dim]sample:[/dim] {escape(sample)}", highlight=False)
    console.print(f"model:    {run_dir / 'final'}", highlight=False)
    console.print(f"metrics:  {run_dir / 'metrics.jsonl'}", highlight=False)
    console.print(f"eval:     {run_dir / 'eval.json'}", highlight=False)
    console.print(f"samples:  {run_dir / 'examples.jsonl'}", highlight=False)
    if (run_dir / "predictions.jsonl").is_file():
        console.print(f"per example: {run_dir / 'predictions.jsonl'} (lmforge report {run_dir})", highlight=False)
    for line in trackers.describe():
        console.print(line, highlight=False)
