"""Peak memory of one training step (forward + backward) with and without chunked cross-entropy.

    python bench/memory.py            # vocab 32k and 50k, sequence 1024 and 2048
    python bench/memory.py --smoke    # tiny sizes, seconds: keeps this script from rotting (tested)

Each measurement runs in a fresh process so that peaks do not leak between settings. On CUDA the
figure is torch.cuda.max_memory_allocated during the step; on CPU it is the growth of the
process's peak RSS (ru_maxrss) over its RSS just before the step, which is what the step itself
needed on top of weights and optimizer state. The summary line gives the saving of the chunked
loss at each size, as a ratio: lower is better.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.engine.losses import causal_lm_step

FULL = {"vocab": [32_000, 50_000], "seq": [1024, 2048], "batch": 2, "hidden": 256, "layers": 2}
SMOKE = {"vocab": [2_000], "seq": [64], "batch": 2, "hidden": 64, "layers": 2}
CHUNK = 512  # train.loss_chunk_size for the chunked runs: 512 x 32k x 4 bytes = 64 MB of logits


def one_step(vocab: int, seq: int, batch: int, hidden: int, layers: int, chunk: int | None) -> dict:
    """Build a Llama, run one step, return the step's peak memory in MB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=seq,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)
    positions = torch.arange(seq, device=device).expand(batch, -1)
    step = {"input_ids": input_ids, "labels": input_ids, "position_ids": positions}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    loss, targets = causal_lm_step(model, step, chunk_size=chunk)
    (loss / targets).backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return {"peak_mb": peak / 2**20, "loss": loss.item() / int(targets), "device": device.type}


def measure(vocab: int, seq: int, sizes: dict, chunk: int | None, repeats: int) -> list[float]:
    """Peak MB of `repeats` fresh processes."""
    args = {"vocab": vocab, "seq": seq, "batch": sizes["batch"], "hidden": sizes["hidden"], "layers": sizes["layers"]}
    peaks = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps({**args, "chunk": chunk})],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(**json.loads(args.one))))
        return
    sizes, repeats = (SMOKE, 1) if args.smoke else (FULL, args.repeats)
    print(f"{'vocab':>7} {'seq':>5} {'batch':>5} {'plain MB':>10} {'chunked MB':>11} {'ratio':>6}")
    ratios = []
    for vocab in sizes["vocab"]:
        for seq in sizes["seq"]:
            plain = statistics.median(measure(vocab, seq, sizes, None, repeats))
            chunked = statistics.median(measure(vocab, seq, sizes, CHUNK, repeats))
            ratios.append((vocab, seq, chunked / plain))
            print(f"{vocab:>7} {seq:>5} {sizes['batch']:>5} {plain:>10.0f} {chunked:>11.0f} {chunked / plain:>6.2f}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = ", ".join(f"v{v // 1000}k/s{s}: {r:.2f}x" for v, s, r in ratios)
    print(f"summary ({device}, medians of {repeats}): chunked/plain step peak memory {summary}")


if __name__ == "__main__":
    main()
