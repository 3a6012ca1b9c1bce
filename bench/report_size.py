"""How big and how slow `lmforge report` is for one run and for a sweep of 100 trials.

    python bench/report_size.py            # one real run; a 100-trial sweep made of its files
    python bench/report_size.py --smoke    # 10 trials (tested)

One tiny prompt-completion run is trained through the CLI (so it has metrics.jsonl, eval.json,
predictions.jsonl and examples.jsonl). The sweep is that run copied N times with its learning
rate, LoRA rank and losses varied (every tenth pruned, every twentieth failed, with reasons), plus
the trials.csv, summary.json and sweep.yaml a real sweep writes, so that the report draws N trials
without training them. Printed: the report's size in KB and the seconds to build it.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_run(root: Path) -> Path:
    words = sorted({w.strip(".,;:").lower() for w in (ROOT / "data" / "kjv-pentateuch.txt").read_text().split()})
    words = [w for w in words if w.isalpha()][:400]
    rows = "".join(json.dumps({"word": w, "spelling": " ".join(w)}) + "\n" for w in words)
    (root / "spelling.jsonl").write_text(rows)
    config = {
        "name": "spell",
        "output_dir": str(root / "runs"),
        "model": {"preset": "llama-tiny"},
        "tokenizer": {"train": True, "vocab_size": 400},
        "data": {
            "train": str(root / "spelling.jsonl"),
            "format": "prompt-completion",
            "columns": {"prompt": "word", "completion": "spelling"},
            "template": "Spell {prompt}:\n",
            "max_length": 48,
            "validation_fraction": 0.1,
            "test_fraction": 0.1,
            "cache_dir": str(root / "cache"),
        },
        "train": {"micro_batch_size": 8, "max_steps": 40, "eval_every": 10, "log_every": 2},
        "eval": {"generate": {"num_examples": 4, "max_new_tokens": 12, "max_examples": 40}},
        "tracking": {"backends": ["none"]},
    }
    (root / "spell.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lmforge", "train", str(root / "spell.yaml")]
    subprocess.run(command, check=True, capture_output=True, cwd=root)
    (run,) = (root / "runs").glob("spell-2*")
    return run


def fake_sweep(run: Path, sweep: Path, trials: int) -> None:
    """`run` copied as `trials` trials of a sweep over train.lr and lora.r, with the sweep's files."""
    rng = random.Random(0)
    rows = []
    for number in range(trials):
        lr, rank = 10 ** rng.uniform(-4, -2), rng.choice([4, 8, 16, 32])
        trial = sweep / f"trial-{number:04d}"
        shutil.copytree(run, trial, ignore=shutil.ignore_patterns("final", "checkpoints"), symlinks=True)
        config = yaml.safe_load((trial / "config.yaml").read_text())
        config["train"]["lr"] = lr
        config["lora"] = {"r": rank, "alpha": 2 * rank}
        (trial / "config.yaml").write_text(yaml.safe_dump(config))
        scale = 1 + rng.uniform(-0.2, 0.2)
        points = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        for point in points:
            for key in ("train/loss", "eval/loss"):
                if key in point:
                    point[key] *= scale
        (trial / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
        final = json.loads((trial / "eval.json").read_text())
        final["validation"]["loss"] *= scale
        state, reason = "complete", ""
        if number % 10 == 9:
            state, reason = "pruned", "pruned at step 20: worse than the median"
        elif number % 20 == 18:
            state, reason = "failed", "RuntimeError: loss is nan at step 12"
        if state == "pruned":
            final = {"step": 20, "stop_reason": "pruned", "validation": final["validation"]}
        (trial / "eval.json").write_text(json.dumps(final))
        value = final["validation"]["loss"] if state != "failed" else ""
        rows.append({"number": number, "state": state, "reason": reason, "train.lr": lr, "lora.r": rank,
                     "eval/loss": value, "best_step": 40, "seconds": 10.0, "run_dir": str(trial)})  # fmt: skip
    with (sweep / "trials.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    complete = [r for r in rows if r["state"] == "complete"]
    best = min(complete, key=lambda r: r["eval/loss"])
    summary = {
        "name": "big",
        "metric": "eval/loss",
        "goal": "minimize",
        "method": "tpe",
        "trials": {
            "complete": len(complete),
            "pruned": trials // 10,
            "failed": sum(r["state"] == "failed" for r in rows),
        },
        "best": {"number": best["number"], "value": best["eval/loss"], "params": {}},
        "importances": {"train.lr": 0.8, "lora.r": 0.2},
    }
    (sweep / "summary.json").write_text(json.dumps(summary))
    spec = {"name": "big", "base": "spell.yaml", "metric": "eval/loss", "parameters": {"train.lr": {}, "lora.r": {}}}
    (sweep / "sweep.yaml").write_text(yaml.safe_dump(spec))


def build(paths: list[Path], out: Path) -> tuple[float, float]:
    from lmforge.results.report import build_report

    start = time.perf_counter()
    build_report(paths, out)
    return out.stat().st_size / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="10 trials")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--workspace", type=Path, default=None)
    args = parser.parse_args()
    trials = 10 if args.smoke else args.trials
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workspace or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        run = train_run(root)
        size, seconds = build([run], root / "one.html")
        print(f"one run: {size:.0f} KB in {seconds:.1f} s")
        sweep = root / "runs" / "sweeps" / "big"
        sweep.mkdir(parents=True)
        fake_sweep(run, sweep, trials)
        size, seconds = build([sweep], root / "sweep.html")
        print(f"sweep of {trials} trials: {size:.0f} KB in {seconds:.1f} s")


if __name__ == "__main__":
    main()
