"""What a sweep costs over training the same configs by hand: the wall time of `lmforge sweep` on a
2 x 2 grid of tiny runs against four plain `lmforge train` runs of the trials' own configs.

    python bench/sweep_overhead.py            # 4 trials of 150 steps, plain runs and sweep alternated
    python bench/sweep_overhead.py --smoke    # 2 trials of 3 steps, seconds (tested)

Both sides run through the CLI, one process per run (a trial is one too), with a warm data
cache; tracking is off on both. The figure is sweep seconds / plain seconds (goal: <= 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def base_config(root: Path, steps: int) -> Path:
    config = {
        "name": "tiny",
        "seed": 7,
        "output_dir": str(root / "runs"),
        "model": {"preset": "llama-tiny"},
        "tokenizer": {"train": True, "vocab_size": 512},
        "data": {
            "train": str(ROOT / "data" / "kjv-pentateuch.txt"),
            "max_length": 64,
            "cache_dir": str(root / "cache"),
            "validation_fraction": 0.05,
            "test_fraction": 0.05,
        },
        "train": {"max_steps": steps, "micro_batch_size": 4, "lr": 1e-3, "log_every": 10, "eval_every": 50},
        "eval": {"max_batches": 4, "generate": {"num_examples": 2, "max_new_tokens": 8}},
        "tracking": {"backends": ["none"]},
    }
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def spec_file(root: Path, name: str, smoke: bool) -> Path:
    sizes = "[4]" if smoke else "[4, 8]"
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nbase: base.yaml\nmethod: grid\n"
        f"parameters:\n  train.lr: {{values: [1.0e-3, 3.0e-3]}}\n  train.micro_batch_size: {{values: {sizes}}}\n"
    )
    return path


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.smoke else 2)
    steps = 3 if args.smoke else 150
    lmforge = [sys.executable, "-m", "lmforge"]
    with tempfile.TemporaryDirectory(prefix="lmforge-sweep-bench-") as tmp:
        root = Path(tmp)
        base = base_config(root, steps)
        subprocess.run([*lmforge, "train", str(base), "--dry-run"], cwd=root, check=True, capture_output=True)
        print("repeat  sweep_s  plain_s  trials  ratio")
        ratios = []
        for repeat in range(repeats):
            spec = spec_file(root, f"bench{repeat}", args.smoke)
            sweep_s = timed([*lmforge, "sweep", str(spec)], root)
            configs = sorted((root / "runs" / "sweeps" / spec.stem).glob("trial-*/trial.yaml"))
            plain_s = sum(timed([*lmforge, "train", str(c), f"output_dir={root / 'plain'}"], root) for c in configs)
            ratios.append(sweep_s / plain_s)
            print(f"{repeat:>6}  {sweep_s:7.1f}  {plain_s:7.1f}  {len(configs):>6}  {ratios[-1]:.3f}")
        print(
            f"summary (cpu, medians of {repeats}): sweep of {len(configs)} trials / {len(configs)} plain runs "
            f"wall time {statistics.median(ratios):.3f}x (goal <= 1.15)"
        )


if __name__ == "__main__":
    main()
