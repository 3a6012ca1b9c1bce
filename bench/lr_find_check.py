"""The learning-rate range test against a case with a known answer: the quickstart (a ~1M Llama
pretrained on the KJV Pentateuch, examples/quickstart.yaml) trained for a fixed number of steps at
each learning rate of a grid, the best judged by validation loss, next to the range test's
suggestions on the same model and data.

    python bench/lr_find_check.py             # 120 steps per grid point, 7 points, 100 test steps
    python bench/lr_find_check.py --smoke     # 60 steps, 5 points (what the test runs)

Every run uses the quickstart's settings (cosine schedule, 20 warmup steps, batch 16 x 128
tokens, seed 42) but its length; the suggestion must lie within a factor of 3 of the best grid
learning rate. Printed: the grid's validation losses, the suggestions, and each suggestion's
distance from the best as a factor.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SMOKE_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def quickstart(workdir: Path, steps: int, lr: float | str, extra: list[str] = ()):
    """The quickstart config, `steps` long at `lr`, evaluated once at the end on 8 batches, with
    no sampling, predictions or tracking, its outputs under `workdir`."""
    from lmforge.config import load_config

    return load_config(
        ROOT / "examples" / "quickstart.yaml",
        [
            f"data.train={ROOT / 'data' / 'kjv-pentateuch.txt'}",
            f"data.cache_dir={workdir / 'cache'}",
            f"output_dir={workdir / 'runs'}",
            f"train.max_steps={steps}",
            f"train.lr={lr}",
            "train.eval_every=null",
            "train.save_every=null",
            "eval.at_start=false",
            "eval.max_batches=8",
            "eval.generate.num_examples=0",
            "eval.generate.max_examples=0",
            "eval.predictions=false",
            "eval.bootstrap_resamples=0",
            "tracking.backends=[none]",
            *extra,
        ],
        env={},
    )


def known_answer(workdir: Path, steps: int, grid: tuple[float, ...], test_steps: int) -> dict:
    """{grid: {lr: validation loss}, best, suggestions, factors}: train at each grid point, then run
    the range test of train.lr=find on the same config."""
    from rich.console import Console

    from lmforge.engine.lr_find import RESULT_FILE
    from lmforge.run import run_train

    quiet = Console(file=io.StringIO())
    losses = {}
    for lr in grid:
        outcome = run_train(quickstart(workdir, steps, lr), quiet)
        losses[lr] = outcome.eval["validation"]["loss"]
    best = min(losses, key=losses.get)
    finder = run_train(quickstart(workdir, steps, "find", [f"train.lr_find.num_steps={test_steps}"]), quiet)
    found = json.loads((finder.run_dir / RESULT_FILE).read_text())
    suggestions = found["suggestions"]
    factors = {name: max(lr / best, best / lr) for name, lr in suggestions.items()}
    return {
        "steps": steps,
        "grid": losses,
        "best": best,
        "suggestions": suggestions,
        "factors": factors,
        "stopped": found["stopped"],
        "trained_with": finder.eval["validation"]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="60 steps, 5 grid points")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (60 if args.smoke else 120)
    grid = SMOKE_GRID if args.smoke else GRID
    with tempfile.TemporaryDirectory() as tmp:
        result = known_answer(Path(tmp), steps, grid, 100)
    print(f"quickstart, {steps} steps per run, validation loss after training:")
    for lr, loss in result["grid"].items():
        mark = "  <- best" if lr == result["best"] else ""
        print(f"  lr {lr:8.1e}  {loss:.4f}{mark}")
    print(f"range test ({result['stopped']}):")
    for name, lr in result["suggestions"].items():
        print(f"  {name:9s} {lr:8.2e}  {result['factors'][name]:.2f}x from the best")
    print(f"trained with train.lr=find (valley): validation loss {result['trained_with']:.4f}")
    sys.exit(0 if result["factors"]["valley"] <= 3 else 1)


if __name__ == "__main__":
    main()
