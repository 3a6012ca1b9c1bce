"""Packed rows of long examples of varying length: time and memory of the attention paths over many
steps, lmforge's varlen attention against transformers' sdpa (a block-diagonal mask).

    python bench/long_examples.py            # 2-layer Llama, 4 rows x 2048 tokens, 60 steps, bf16
    python bench/long_examples.py --smoke    # tiny sizes, seconds: keeps the script alive (tested)

Every step packs examples of new random lengths (300 to 1500 tokens) into its rows, as SFT on long
documents does. Under CPU bf16 the attention runs in bf16 matmuls, and oneDNN builds and keeps a
primitive for every new matmul shape: a plan whose shapes follow the draw shows up as RSS that
grows step after step. The rows are the same for both attentions (the draw is seeded).

Each attention trains in a fresh process, and they alternate over the repeats. Figures (medians):
seconds of the steps (forward and backward, no optimizer), RSS after a third, two thirds and all
of the steps, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

FULL = {"hidden": 256, "layers": 2, "heads": 4, "rows": 4, "width": 2048, "lengths": [300, 1500], "steps": 60}
SMOKE = {"hidden": 64, "layers": 2, "heads": 4, "rows": 2, "width": 128, "lengths": [20, 80], "steps": 3}
ATTENTIONS = ["varlen", "sdpa"]
VOCAB = 1000


def packed_rows(s: dict, rng: random.Random) -> torch.Tensor:
    """(rows, width) position ids: examples of random lengths, cut at the row's end."""
    rows = []
    for _ in range(s["rows"]):
        lengths, left = [], s["width"]
        while left > 0:
            lengths.append(min(left, rng.randint(*s["lengths"])))
            left -= lengths[-1]
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows)


def run_one(attention: str, s: dict, precision: str) -> dict:
    from lmforge.models.attention import NAME

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s["hidden"],
        intermediate_size=2 * s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(NAME if attention == "varlen" else attention)
    rng, process = random.Random(0), psutil.Process()
    marks = {s["steps"] // 3, 2 * s["steps"] // 3, s["steps"]}
    rss, seconds = [], 0.0
    for step in range(1, s["steps"] + 1):
        positions = packed_rows(s, rng)
        ids = torch.randint(0, VOCAB, positions.shape, generator=torch.Generator().manual_seed(step))
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        if step in marks:
            rss.append(process.memory_info().rss / 2**20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"attention": attention, "seconds": seconds, "rss": rss, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and rows, 3 steps, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        s["steps"] = args.steps
    if args.one:
        print(json.dumps(run_one(args.one, s, args.precision)))
        return
    repeats = 1 if args.smoke else args.repeats
    results: dict[str, list[dict]] = {name: [] for name in ATTENTIONS}
    for r in range(repeats):
        for name in ATTENTIONS[r % 2 :] + ATTENTIONS[: r % 2]:
            command = [sys.executable, __file__, "--one", name, "--precision", args.precision]
            command += (["--smoke"] if args.smoke else []) + (["--steps", str(args.steps)] if args.steps else [])
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(results, s, args.precision, repeats)


def report(results: dict[str, list[dict]], s: dict, precision: str, repeats: int) -> None:
    print(f"long examples, {precision}: {json.dumps(s)}")
    print(f"{'attention':<10} {'seconds':>8} {'RSS 1/3 MB':>11} {'2/3 MB':>8} {'end MB':>8} {'peak MB':>8}")
    median = {}
    for name, runs in results.items():
        rss = [statistics.median(r["rss"][i] for r in runs) for i in range(3)]
        median[name] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "growth": rss[2] - rss[0],
            "peak": statistics.median(r["peak_mb"] for r in runs),
        }
        m = median[name]
        print(f"{name:<10} {m['seconds']:>8.1f} {rss[0]:>11.0f} {rss[1]:>8.0f} {rss[2]:>8.0f} {m['peak']:>8.0f}")
    ours, theirs = median["varlen"], median["sdpa"]
    print(
        f"summary (cpu, {precision}, medians of {repeats}): varlen {theirs['seconds'] / ours['seconds']:.2f}x the "
        f"speed of sdpa, peak RSS {ours['peak'] / theirs['peak']:.2f}x; RSS growth after the first third: "
        f"varlen {ours['growth']:+.0f} MB, sdpa {theirs['growth']:+.0f} MB"
    )


if __name__ == "__main__":
    main()
