"""Tokens per second from raw files to a tokenized, packed, cached dataset (lmforge's prepare_data).

    python bench/data_prep.py            # stdlib prompt/completion JSONL and the KJV text
    python bench/data_prep.py --smoke    # small inputs, seconds (tested)

Each measurement starts from an empty cache, with an already trained tokenizer (tokenizer
training is not data preparation), and covers reading, formatting, tokenizing, masking, length
policies, packing, writing Arrow files and the report. Tokens are all tokens of all splits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import make_workspace  # noqa: E402

from lmforge.config import Config  # noqa: E402
from lmforge.data.prepare import prepare_data  # noqa: E402


def inputs(ws, copies: int) -> dict[str, Path]:
    """The raw inputs, each the workspace's data repeated `copies` times."""
    sft = ws.root / f"prep_sft_x{copies}.jsonl"
    text = ws.root / f"prep_text_x{copies}.txt"
    if not sft.is_file():
        sft.write_text(ws.sft_train.read_text() * copies)
        text.write_text(ws.text_train.read_text() * copies)
    return {"sft": sft, "text": text}


def prepare_once(ws, workload: str, path: Path, num_proc: int, max_length: int) -> tuple[float, int, int]:
    """(seconds, records, tokens) of one cold preparation."""
    cache = Path(tempfile.mkdtemp(prefix="lmforge-prep-"))
    fmt = "prompt-completion" if workload == "sft" else "text"
    config = Config.model_validate(
        {
            "model": {"name_or_path": str(ws.base)},
            "data": {"train": str(path), "format": fmt, "max_length": max_length, "num_proc": num_proc},
        }
    )
    config.data.cache_dir = str(cache)
    try:
        start = time.perf_counter()
        prepared = prepare_data(config, log=lambda _: None)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    splits = prepared.report["splits"].values()
    return seconds, sum(s["records"] for s in splits), sum(s["tokens"] for s in splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--copies", type=int, default=4, help="repeat the data this many times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--workspace", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        root = args.workspace or Path(tempfile.gettempdir()) / "lmforge-bench-smoke"
        ws = make_workspace(root, preset="llama-tiny", vocab_size=512, smoke=True)
        copies, repeats, procs = 1, 1, [1]
    else:
        ws = make_workspace(args.workspace or Path(tempfile.gettempdir()) / "lmforge-bench")
        copies, repeats, procs = args.copies, args.repeats, [1, 2]
    print(
        f"{'workload':<9} {'num_proc':>8} {'records':>9} {'tokens':>11} {'seconds':>8} {'tokens/s':>11} {'spread':>19}"
    )
    best = {}
    for workload, path in inputs(ws, copies).items():
        for num_proc in procs:
            runs = [prepare_once(ws, workload, path, num_proc, args.max_length) for _ in range(repeats)]
            seconds = statistics.median(r[0] for r in runs)
            records, tokens = runs[0][1], runs[0][2]
            speeds = [tokens / r[0] for r in runs]
            spread = f"{min(speeds):,.0f}-{max(speeds):,.0f}"
            rate = tokens / seconds
            print(
                f"{workload:<9} {num_proc:>8} {records:>9,} {tokens:>11,} {seconds:>8.2f} {rate:>11,.0f} {spread:>19}"
            )  # noqa: E501
            best[workload] = max(best.get(workload, 0), rate)
    summary = ", ".join(f"{w} {v / 1e6:.2f}M tokens/s" for w, v in best.items())
    print(f"summary (medians of {repeats}, best num_proc): {summary}; goal 1M tokens/s on 2 cores")
    print(json.dumps({"best_tokens_per_s": best}))


if __name__ == "__main__":
    main()
