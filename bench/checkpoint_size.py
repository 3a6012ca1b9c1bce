"""Checkpoint size and save time of a LoRA run: every weight (as lmforge saved before) against the
trainable weights only (adapters beside a record of the base), in one run on the same model.

    python bench/checkpoint_size.py            # the spelling example's base, and a 120M Llama
    python bench/checkpoint_size.py --smoke    # the spelling example's base only (tested)

Each base is a Llama of that size with random weights, saved as a local "pretrained" directory,
under the LoRA settings of examples/spelling-lora.yaml (r 32, alpha 64, the default target
modules), after one AdamW step (so the optimizer state is the size it is in a run). A save is the
whole `save_checkpoint` (weights, optimizer, scheduler, RNG, manifest with sha256, fsync); the
median of 3 saves is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.config import dump_yaml, load_config  # noqa: E402
from lmforge.engine.checkpoint import save_checkpoint  # noqa: E402
from lmforge.engine.state import TrainState  # noqa: E402
from lmforge.models.build import load_pretrained  # noqa: E402
from lmforge.models.peft import apply_lora, base_record  # noqa: E402

BASES = {  # name: (LlamaConfig sizes, vocabulary)
    "spelling (quickstart model)": ({"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2}, 2048),
    "llama-120m": ({"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 12}, 32000),
}


def lora_model(base_dir: Path, sizes: dict, vocab: int):
    heads = sizes["hidden_size"] // 64
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_attention_heads=heads, **sizes)).save_pretrained(base_dir)
    config = load_config(
        None,
        ["data.train=x.txt", f"model.name_or_path={base_dir}", "lora.r=32", "lora.alpha=64", "lora.dropout=0"],
        env={},
    )
    model = apply_lora(load_pretrained(base_dir), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return config, model, optimizer, scheduler


def timed_saves(directory: Path, config, model, optimizer, scheduler, base: dict | None) -> tuple[float, float]:
    """(MB on disk, median seconds) of 3 checkpoint saves."""
    seconds, size = [], 0
    for step in (1, 2, 3):
        started = time.perf_counter()
        checkpoint = save_checkpoint(
            directory, TrainState(step=step), model, optimizer, scheduler, None, dump_yaml(config), base=base
        )
        seconds.append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in checkpoint.path.iterdir())
    return size / 1e6, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the spelling example's base only")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = list(BASES)[:1] if args.smoke else list(BASES)
    print(f"{'base':<28} {'params':>8} {'trainable':>10} {'full MB':>9} {'full s':>7} {'adapter MB':>11} "
          f"{'adapter s':>10} {'size ratio':>10}")  # fmt: skip
    for name in names:
        sizes, vocab = BASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            config, model, optimizer, scheduler = lora_model(tmp / "base", sizes, vocab)
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            full_mb, full_s = timed_saves(tmp / "full", config, model, optimizer, scheduler, None)
            record = base_record(str(tmp / "base"))
            adapter_mb, adapter_s = timed_saves(tmp / "adapter", config, model, optimizer, scheduler, record)
        print(
            f"{name:<28} {total / 1e6:>7.1f}M {trainable / 1e6:>9.2f}M {full_mb:>9.1f} {full_s:>7.3f} "
            f"{adapter_mb:>11.2f} {adapter_s:>10.3f} {full_mb / adapter_mb:>9.1f}x"
        )


if __name__ == "__main__":
    main()
