"""A training run from config to outputs: data, model, loop, evaluation, samples, files.

runs/<name>-<time>/
  config.yaml      the resolved config
  data_report.json documents, tokens and blocks per split
  metrics.jsonl    every logged point
  eval.json        final validation and test metrics
  examples.jsonl   samples before and after training, with references
  final/           Hugging Face model directory (safetensors, config, tokenizer)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console

from lmforge.config import Config, dump_yaml
from lmforge.data.loader import StepPlan
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.engine.loop import resolve_precision, total_steps, train
from lmforge.engine.progress import format_duration
from lmforge.eval.evaluate import evaluate
from lmforge.eval.generation import generate, prompts_and_references
from lmforge.models.build import build_model, count_parameters
from lmforge.tracking.base import open_trackers


@dataclass
class RunOutcome:
    run_dir: Path | None
    """None for a dry run."""
    eval: dict


def quick_test_config(config: Config) -> Config:
    """A few steps and a tiny evaluation: checks a config end to end in seconds."""
    quick = config.model_copy(deep=True)
    quick.name = f"{config.name}-quick-test"
    quick.train.max_steps = min(config.train.max_steps or 3, 3)
    quick.train.eval_every = None
    quick.train.log_every = 1
    quick.eval.max_batches = 2
    quick.eval.at_start = False
    quick.eval.generate.num_examples = min(config.eval.generate.num_examples, 2)
    quick.eval.generate.max_new_tokens = min(config.eval.generate.max_new_tokens, 16)
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


def run_train(config: Config, console: Console, dry_run: bool = False) -> RunOutcome:
    """Prepare data, build the model, train, evaluate, and write the run directory."""
    started = time.perf_counter()
    precision = resolve_precision(config.train.precision)  # fails early on an impossible choice
    data = prepare_data(config, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    set_seed(config.seed)
    model = build_model(config, data.tokenizer)
    trainable, total = count_parameters(model)
    plan = StepPlan(len(data.splits["train"]), config.train.micro_batch_size, config.train.grad_accum)
    steps = total_steps(config.train, plan)
    _print_plan(console, config, data, trainable, total, plan, steps, precision)
    if dry_run:
        console.print("dry run: config and data are valid; nothing was trained")
        return RunOutcome(None, {})

    run_dir = new_run_dir(config)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
    trackers = open_trackers(config, run_dir, warn=lambda m: console.print(f"[yellow]{m}[/yellow]"))
    trackers.log_params({"model.parameters": total, "model.trainable_parameters": trainable})
    status = "FAILED"
    try:
        pairs = prompts_and_references(data.samples, data.tokenizer, config.eval.generate)
        prompts = [p for p, _ in pairs]
        before = generate(model, data.tokenizer, prompts, config.eval.generate, seed=config.seed)
        result = train(model, data, config, trackers, console=console)
        model = result.model
        after = generate(model, data.tokenizer, prompts, config.eval.generate, seed=config.seed)
        final_eval = {"step": result.state.step, "validation": result.eval_history[-1]}
        if "test" in data.splits:
            batch = config.eval.batch_size or config.train.micro_batch_size
            final_eval["test"] = evaluate(
                model, data.splits["test"], data.tokenizer.pad_token_id, batch, config.eval.max_batches
            )
            trackers.log_metrics({f"test/{k}": v for k, v in final_eval["test"].items()}, result.state.step)
        save_final_model(model, data, run_dir / "final")
        (run_dir / "eval.json").write_text(json.dumps(final_eval, indent=2))
        _write_examples(run_dir / "examples.jsonl", pairs, before, after, result.state.step)
        for name in ("config.yaml", "data_report.json", "eval.json", "examples.jsonl", "metrics.jsonl"):
            trackers.log_artifact(run_dir / name)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        trackers.finish(status)
    _print_summary(console, run_dir, result.eval_history, final_eval, pairs, after, trackers, started)
    return RunOutcome(run_dir, final_eval)


def save_final_model(model, data: PreparedData, final_dir: Path) -> None:
    """An HF directory that plain `from_pretrained` loads: written aside, then renamed."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # trained without a KV cache; generation wants one
    model.generation_config.eos_token_id = data.tokenizer.eos_token_id
    model.generation_config.pad_token_id = data.tokenizer.pad_token_id
    model.save_pretrained(str(tmp), safe_serialization=True)
    data.tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, final_dir)


def _write_examples(path: Path, pairs, before: list[str], after: list[str], step: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for stage, at, texts in (("before", 0, before), ("after", step, after)):
            for (prompt, reference), text in zip(pairs, texts, strict=True):
                row = {
                    "stage": stage,
                    "step": at,
                    "prompt": prompt,
                    "generated": text,
                    "reference": reference,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _print_plan(console, config, data, trainable, total, plan, steps, precision) -> None:
    splits = data.report["splits"]
    rows = ", ".join(
        f"{name} {s['documents']:,} docs / {s['tokens']:,} tokens / {s['blocks']:,} rows" for name, s in splits.items()
    )
    per_step = config.train.micro_batch_size * config.train.grad_accum * config.data.max_length
    cached = " (from cache)" if data.cache_hit else ""
    console.print(f"data{cached}: {rows}", highlight=False)
    console.print(
        f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), vocab {len(data.tokenizer):,}",
        highlight=False,
    )
    console.print(
        f"plan: {steps:,} steps ({plan.steps_per_epoch:,} per epoch), up to {per_step:,} tokens per step, "
        f"precision {precision if precision != 'no' else 'fp32'}",
        highlight=False,
    )


def _print_summary(console, run_dir, history, final_eval, pairs, after, trackers, started) -> None:
    first, last = history[0], history[-1]
    console.print(f"\n[bold green]done[/bold green] in {format_duration(time.perf_counter() - started)}")
    if len(history) > 1:
        console.print(
            f"validation perplexity {first['perplexity']:.1f} (step {first['step']}) -> "
            f"{last['perplexity']:.1f} (step {last['step']})",
            highlight=False,
        )
    if "test" in final_eval:
        console.print(f"test perplexity {final_eval['test']['perplexity']:.1f}", highlight=False)
    for (prompt, _), text in list(zip(pairs, after, strict=True))[:2]:
        console.print(f"[dim]sample:[/dim] {prompt}[cyan]{text}[/cyan]", highlight=False)
    console.print(f"model:    {run_dir / 'final'}", highlight=False)
    console.print(f"metrics:  {run_dir / 'metrics.jsonl'}", highlight=False)
    console.print(f"eval:     {run_dir / 'eval.json'}", highlight=False)
    console.print(f"samples:  {run_dir / 'examples.jsonl'}", highlight=False)
    for line in trackers.describe():
        console.print(line, highlight=False)
