"""lmforge against the Hugging Face Trainer and TRL, on the same model, data and hyperparameters.

    python bench/vs_peers.py --workload sft         # ~20M Llama, stdlib prompt/completion pairs
    python bench/vs_peers.py --workload pretrain    # KJV text in full blocks: the loop alone
    python bench/vs_peers.py --workload sft --smoke # tiny model, 3 steps: keeps the script alive

Every run is a fresh process; the tools alternate inside each repeat (in a rotated order), so
machine noise shows as spread rather than as a bias. Each tool is set up the way its docs
recommend: `Trainer` with dynamic padding (DataCollatorForSeq2Seq), the same with
`train_sampling_strategy="group_by_length"`, TRL `SFTTrainer` with `packing=True`; lmforge with
packing (its SFT default) and without (length-grouped micro-batches).

Figures per tool (medians over repeats):
- trained tok/s: target tokens the loss was computed on, per second of the training call;
- peak RSS (MB) of the process after training; wall (s) of the training call;
- val loss: mean completion-token (sft) or token (pretrain) loss of the trained model on the same
  held-out data, computed by one shared function here, example by example, with no packing.

Data preparation (tokenising, packing, caching) is outside the timed call for every tool.

The memory allocator changes CPU speed for every tool alike (tcmalloc: +5-35% here, see
lmforge/malloc.py). `--malloc as-shipped` (the default) runs each tool as its users get it:
lmforge with tcmalloc where it is installed (`lmforge train` preloads it) and glibc keeping
freed memory where not (lmforge.malloc.GLIBC_KEEP), the peers on the C library's malloc;
`system` and `tcmalloc` give every tool the same one. The table names each tool's allocator,
precision and thread count.

`--defaults` runs every tool exactly as its users get it: its own default precision (lmforge's
`precision: auto`, `Trainer`'s fp32, TRL `SFTConfig`'s bf16), thread count (no OMP_NUM_THREADS)
and allocator (as shipped); the settings above (steps, batch, lr...) stay the same for all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge import malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import Workspace, make_workspace  # noqa: E402

IGNORE = -100
SETTINGS = {
    "steps": 50,  # one whole megabatch (50 micro-batches) of Trainer's length-grouped sampler
    "micro_batch_size": 8,
    "grad_accum": 1,
    "max_length": 256,
    "lr": 5e-4,
    "warmup_steps": 2,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "seed": 0,
    "precision": "fp32",
}
SMOKE = {**SETTINGS, "steps": 3, "micro_batch_size": 4, "max_length": 64}
TIME_TO_LOSS = {**SETTINGS, "steps": 150, "eval_every": 10}
SMOKE_TIME_TO_LOSS = {**SMOKE, "steps": 4, "eval_every": 2}
TOOLS = {
    "sft": ["lmforge", "lmforge-unpacked", "trainer", "trainer-grouped", "trl-packed"],
    "pretrain": ["lmforge", "trainer"],
    "time-to-loss": ["lmforge", "trainer"],
}


# --------------------------------------------------------------------------- shared pieces


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """prompt + completion + EOS, the prompt masked, truncated to max_length (like lmforge)."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE] * len(prompt) + completion)[:max_length]
        if any(label != IGNORE for label in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


def text_blocks(tokenizer, path: Path, max_length: int) -> list[dict]:
    """The corpus as one token stream (EOS between chapters) cut into full blocks."""
    stream: list[int] = []
    for chapter in path.read_text().split("\n\n"):
        stream += tokenizer(chapter, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // max_length
    return [{"input_ids": stream[i * max_length : (i + 1) * max_length]} for i in range(n)]


@torch.no_grad()
def validation_loss(model, examples: list[dict]) -> float:
    """Mean loss over every target token of `examples`, one example at a time (no padding, no
    packing): the same measurement for every tool."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example.get("labels", example["input_ids"])], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((targets != IGNORE).sum())
    return total / count


def count_targets(model) -> list[int]:
    """A forward pre-hook that adds up the target tokens of every training forward pass."""
    seen = [0]

    def hook(module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None and module.training:
            seen[0] += int((labels[..., 1:] != IGNORE).sum())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# --------------------------------------------------------------------------- the tools


class Points:
    """Stands where metrics.jsonl does: keeps (step, timestamp, metrics) of every logged point."""

    lines = 0

    def __init__(self) -> None:
        self.points: list[tuple[int, float, dict]] = []

    def log_metrics(self, metrics, step, timestamp) -> None:
        self.points.append((step, timestamp, dict(metrics)))

    def finish(self, status) -> None:
        pass


LEVERS = {
    "lmforge": {},
    "lmforge-unpacked": {"data": {"packing": False}},
    "lmforge-compile": {"train": {"compile": True}},
    "lmforge-chunked": {"train": {"loss_chunk_size": 512}},
    "lmforge-plainloss": {"train": {"loss_chunk_size": None}},
    "lmforge-sdpa": {"model": {"attention": "sdpa"}},
    "lmforge-noprefetch": {"data": {"prefetch": 0}},
}
"""lmforge variants: settings on top of the shared ones (packing is lmforge's SFT default)."""


def run_lmforge(
    ws: Workspace, workload: str, s: dict, lever: dict, eval_every: int | None = None
) -> tuple[float, int, object, list, str]:
    from rich.console import Console

    from lmforge.config import Config
    from lmforge.data.prepare import prepare_data
    from lmforge.engine.loop import resolve_precision, train
    from lmforge.models.build import build_model
    from lmforge.tracking.base import Trackers

    data = {"train": str(ws.sft_train), "validation": str(ws.sft_validation), "format": "prompt-completion"}
    if workload == "pretrain":  # time-to-loss trains on the SFT data
        data = {"train": str(ws.text_train), "validation": str(ws.text_validation), "format": "text"}
    config = Config.model_validate(
        {
            "seed": s["seed"],
            "output_dir": str(ws.root / "runs"),
            "model": {"name_or_path": str(ws.base), **lever.get("model", {})},
            "data": {
                **data,
                "max_length": s["max_length"],
                "cache_dir": str(ws.root / "cache"),
                **lever.get("data", {}),
            },
            "train": {
                "max_steps": s["steps"],
                "micro_batch_size": s["micro_batch_size"],
                "grad_accum": s["grad_accum"],
                "lr": s["lr"],
                "warmup_steps": s["warmup_steps"],
                "weight_decay": s["weight_decay"],
                "max_grad_norm": s["max_grad_norm"],
                "precision": "auto" if s["precision"] == "default" else s["precision"],
                "log_every": eval_every or s["steps"],
                "eval_every": eval_every,
                **lever.get("train", {}),
            },
            "eval": {"at_start": eval_every is not None, "max_batches": None if eval_every else 1},
            "tracking": {"backends": ["none"]},
        }
    )
    prepared = prepare_data(config, log=lambda _: None)
    model = build_model(config, prepared.tokenizer)

    record = Points()
    started = time.time()
    result = train(model, prepared, config, Trackers(record, [], None, print), console=Console(quiet=True))
    # until the last step is logged: the validation batch the loop runs at its end is left out,
    # as no peer is asked for one
    wall = max(stamp for _, stamp, metrics in record.points if "train/loss" in metrics) - started
    mixed = resolve_precision(config.train.precision)  # accelerate's name: "no" is fp32
    precision = "fp32" if mixed == "no" else mixed
    return wall, result.state.target_tokens_seen, result.model, training_curve(record.points, started), precision


def training_curve(points: list[tuple[int, float, dict]], started: float) -> list[tuple[int, float, float]]:
    """(step, training seconds so far, eval loss) at each evaluation. The train log of a step is
    written just before its evaluation and the eval log just after, so time spent evaluating is
    left out."""
    curve, train_seconds, resumed = [], 0.0, started
    for step, stamp, metrics in points:
        if "train/loss" in metrics:
            train_seconds += stamp - resumed
        if "eval/loss" in metrics:
            curve.append((step, train_seconds, metrics["eval/loss"]))
            resumed = stamp
    return curve


def hf_arguments(s: dict, out: str, **extra):
    from transformers import TrainingArguments

    return dict(
        output_dir=out,
        max_steps=s["steps"],
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["lr"],
        warmup_steps=s["warmup_steps"],
        lr_scheduler_type="cosine",
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        seed=s["seed"],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        **({} if s["precision"] == "default" else {"bf16": s["precision"] == "bf16"}),  # default: the tool's own
        **extra,
    ), TrainingArguments


def curve_callback(model, held_out: list[dict], every: int):
    """A TrainerCallback evaluating with the shared `validation_loss` every `every` steps, with the
    time spent evaluating left out of the training time."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self) -> None:
            self.curve: list[tuple[int, float, float]] = []
            self.train_seconds, self.resumed = 0.0, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.curve.append((0, 0.0, validation_loss(model, held_out)))
            model.train()
            self.resumed = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self.train_seconds += time.perf_counter() - self.resumed
                self.curve.append((state.global_step, self.train_seconds, validation_loss(model, held_out)))
                model.train()
                self.resumed = time.perf_counter()

    return Curve()


def run_trainer(
    ws: Workspace, workload: str, s: dict, grouped: bool, eval_every: int | None = None
) -> tuple[float, int, object, list, str]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(str(ws.base))
    model = AutoModelForCausalLM.from_pretrained(str(ws.base))
    if workload in ("sft", "time-to-loss"):
        rows = tokenize_pairs(tokenizer, read_jsonl(ws.sft_train), s["max_length"])
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    else:
        rows = [{**b, "labels": b["input_ids"]} for b in text_blocks(tokenizer, ws.text_train, s["max_length"])]
        collator = default_data_collator
    extra = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    seen = count_targets(model)
    with tempfile.TemporaryDirectory() as out:
        kwargs, arguments = hf_arguments(s, out, **extra)
        dataset = Dataset.from_list(rows)
        trainer = Trainer(model=model, args=arguments(**kwargs), train_dataset=dataset, data_collator=collator)
        curve = None
        if eval_every:
            held_out = tokenize_pairs(tokenizer, read_jsonl(ws.sft_validation), s["max_length"])
            curve = curve_callback(model, held_out, eval_every)
            trainer.add_callback(curve)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return wall, seen[0], trainer.model, curve.curve if curve else [], "bf16" if trainer.args.bf16 else "fp32"


def run_trl(ws: Workspace, workload: str, s: dict) -> tuple[float, int, object, list, str]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(ws.base))
    model = AutoModelForCausalLM.from_pretrained(str(ws.base))
    seen = count_targets(model)
    with tempfile.TemporaryDirectory() as out:
        kwargs, _ = hf_arguments(s, out)
        config = SFTConfig(**kwargs, packing=True, max_length=s["max_length"], completion_only_loss=True)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(read_jsonl(ws.sft_train)),
            processing_class=tokenizer,
        )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return wall, seen[0], trainer.model, [], "bf16" if trainer.args.bf16 else "fp32"


def run_one(tool: str, workload: str, ws: Workspace, s: dict) -> dict:
    """Train with one tool in this process; return its figures."""
    from transformers import AutoTokenizer

    torch.manual_seed(s["seed"])
    every = s.get("eval_every") if workload == "time-to-loss" else None
    if tool.startswith("lmforge"):
        wall, targets, model, curve, precision = run_lmforge(ws, workload, s, LEVERS[tool], eval_every=every)
    elif tool.startswith("trainer"):
        grouped = tool == "trainer-grouped"
        wall, targets, model, curve, precision = run_trainer(ws, workload, s, grouped=grouped, eval_every=every)
    else:
        wall, targets, model, curve, precision = run_trl(ws, workload, s)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tokenizer = AutoTokenizer.from_pretrained(str(ws.base))
    if workload in ("sft", "time-to-loss"):
        held_out = tokenize_pairs(tokenizer, read_jsonl(ws.sft_validation), s["max_length"])
    else:
        held_out = text_blocks(tokenizer, ws.text_validation, s["max_length"])
    figures = {
        "tool": tool,
        "wall_s": wall,
        "trained_tokens": targets,
        "tokens_per_s": targets / wall,
        "peak_rss_mb": peak_mb,
        "val_loss": validation_loss(model, held_out),
        "malloc": malloc.active(),
        "precision": precision,
        "threads": torch.get_num_threads(),
    }
    if workload == "time-to-loss":
        figures["curve"] = curve
    return figures


# --------------------------------------------------------------------------- the driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(TOOLS), default="sft")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, 3 steps, one repeat")
    parser.add_argument("--workspace", type=Path, default=None, help="default: a directory under /tmp, reused")
    parser.add_argument("--tools", nargs="*", default=None, help="a subset of the tools")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "default"],
        default="fp32",
        help="for every tool (bf16: autocast, fp32 weights)",
    )
    parser.add_argument(
        "--malloc",
        choices=["as-shipped", "system", "tcmalloc"],
        default="as-shipped",
        help="as-shipped: lmforge preloads tcmalloc where installed, the peers do not; else the same for all",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="every tool exactly as its users get it: its own default precision, thread count and allocator",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.defaults:
        if args.precision != "fp32" or args.malloc != "as-shipped":
            parser.error("--defaults gives every tool its own precision and allocator: drop --precision and --malloc")
        args.precision = "default"
    settings = SMOKE if args.smoke else SETTINGS
    if args.workload == "time-to-loss":
        settings = SMOKE_TIME_TO_LOSS if args.smoke else TIME_TO_LOSS
    settings = {**settings, "precision": args.precision}
    name = "lmforge-bench-smoke" if args.smoke else "lmforge-bench"
    root = args.workspace or Path(tempfile.gettempdir()) / name
    size = {"preset": "llama-tiny", "vocab_size": 512, "smoke": True} if args.smoke else {}
    ws = make_workspace(root, **size)
    if args.one:
        print(json.dumps(run_one(args.one, args.workload, ws, settings)))
        return
    tools = args.tools or TOOLS[args.workload]
    repeats = 1 if args.smoke else args.repeats
    results: dict[str, list[dict]] = {tool: [] for tool in tools}
    for r in range(repeats):
        for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:  # rotate the order each repeat
            command = [sys.executable, __file__, "--workload", args.workload, "--workspace", str(root), "--one", tool]
            command += ["--precision", args.precision]
            if args.smoke:
                command.append("--smoke")
            env = tool_env(tool, args.malloc, args.defaults)
            out = subprocess.run(command, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{tool} failed:\n{out.stderr[-3000:]}")
            results[tool].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(args.workload, settings, results, repeats, args.malloc)
    if args.workload == "time-to-loss":
        print_time_to_loss(results, repeats)


def tool_env(tool: str, choice: str, defaults: bool = False) -> dict[str, str]:
    """The environment a tool's process starts with, for --malloc `choice`; with `defaults`, no
    thread count set for it either (each tool picks its own)."""
    env = malloc.without_preload(os.environ)
    if defaults:
        env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES")}
    if choice == "system" or (choice == "as-shipped" and not tool.startswith("lmforge")):
        return env
    preloaded = malloc.preload_plan(env, sys.platform)  # what `lmforge train` starts with
    if choice == "tcmalloc" and "LD_PRELOAD" not in (preloaded or {}):
        raise SystemExit(
            "--malloc tcmalloc: no tcmalloc installed (apt install libtcmalloc-minimal4), or LMFORGE_MALLOC=system"
        )
    return preloaded or env


def print_table(workload: str, settings: dict, results: dict[str, list[dict]], repeats: int, choice: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"workload {workload} on {device}: {json.dumps(settings)}")
    columns = (
        f"{'trained tok/s':>14} {'spread':>13} {'peak RSS MB':>12} {'wall s':>8} {'tokens':>9} {'val loss':>9}  "
        "precision threads malloc"
    )
    print(f"{'tool':<18} {columns}")
    median = {}
    for tool, runs in results.items():
        speeds = [r["tokens_per_s"] for r in runs]
        median[tool] = {
            k: statistics.median(r[k] for r in runs)
            for k in runs[0]
            if k not in ("tool", "curve", "malloc", "precision", "threads")
        }
        m = median[tool]
        spread = f"{min(speeds):.0f}-{max(speeds):.0f}"
        print(
            f"{tool:<18} {m['tokens_per_s']:>14.0f} {spread:>13} {m['peak_rss_mb']:>12.0f} {m['wall_s']:>8.1f} "
            f"{m['trained_tokens']:>9.0f} {m['val_loss']:>9.3f}  {'/'.join(sorted({r['precision'] for r in runs})):<9} "
            f"{'/'.join(sorted({str(r['threads']) for r in runs})):<7} {'/'.join(sorted({r['malloc'] for r in runs}))}"
        )
    base = next(t for t in results if t.startswith("lmforge"))
    ours, others = median[base], [t for t in results if t != base]
    speed = ", ".join(f"{ours['tokens_per_s'] / median[t]['tokens_per_s']:.2f}x vs {t}" for t in others)
    memory = ", ".join(f"{ours['peak_rss_mb'] / median[t]['peak_rss_mb']:.2f}x vs {t}" for t in others)
    how = "every tool on its defaults" if settings["precision"] == "default" else f"malloc {choice}"
    print(f"summary ({device}, medians of {repeats}, {how}): {base} trained tok/s {speed}; peak RSS {memory}")


def print_time_to_loss(results: dict[str, list[dict]], repeats: int) -> None:
    """Training seconds until the validation loss first reaches a target both tools reach: the
    higher of the two best losses (per repeat), so neither is asked for more than it achieved."""
    print(f"{'tool':<18} {'loss at start':>14} {'best loss':>10} {'seconds to target':>18}")
    seconds: dict[str, list[float]] = {tool: [] for tool in results}
    targets = []
    for r in range(repeats):
        curves = {tool: runs[r]["curve"] for tool, runs in results.items()}
        target = max(min(loss for _, _, loss in curve) for curve in curves.values())
        targets.append(target)
        for tool, curve in curves.items():
            seconds[tool].append(next(t for _, t, loss in curve if loss <= target))
    for tool, runs in results.items():
        start = statistics.median(run["curve"][0][2] for run in runs)
        best = statistics.median(min(loss for _, _, loss in run["curve"]) for run in runs)
        print(f"{tool:<18} {start:>14.3f} {best:>10.3f} {statistics.median(seconds[tool]):>18.1f}")
    if not {"lmforge", "trainer"} <= set(seconds):
        return
    ours, peer = statistics.median(seconds["lmforge"]), statistics.median(seconds["trainer"])
    ratio = ours / peer if peer else float("nan")
    print(
        f"summary time-to-loss (medians of {repeats}, target val loss {statistics.median(targets):.3f}): "
        f"lmforge {ours:.1f}s, trainer {peer:.1f}s, ratio {ratio:.2f}x (goal <= 0.5x)"
    )


if __name__ == "__main__":
    main()
