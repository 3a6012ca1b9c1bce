"""Workloads shared by the benchmarks: real data, one tokenizer and one starting model, made once
in a workspace directory so that every tool trains exactly the same thing.

- SFT pairs: Python standard-library functions. The prompt is a comment with the first line of the
  function's docstring, the completion is the function's source without its docstring. Lengths
  spread widely (a one-line helper to a page of code), which is what makes padding expensive.
- Pretraining text: the King James Pentateuch shipped in data/.
- Tokenizer: byte-level BPE trained on both; for vocabularies past what they give (~17k), on the
  standard library's module sources too.
"""

from __future__ import annotations

import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT / "data" / "kjv-pentateuch.txt"
sys.path.insert(0, str(ROOT / "examples"))
from make_data import documented_functions  # noqa: E402  (the examples' stdlib walker)


def stdlib_pairs(max_chars: int = 4000) -> list[dict]:
    """{"prompt", "completion"} for every documented stdlib function up to `max_chars` of source."""
    functions = documented_functions(10, 160, max_chars)
    pairs = [{"prompt": f"# {summary}\n", "completion": code + "\n"} for _, summary, code in functions]
    random.Random(0).shuffle(pairs)
    return pairs


def stdlib_sources() -> list[str]:
    """The source of every standard-library module outside the tests (~13 MB): enough text for a
    32k-token vocabulary."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if not {"site-packages", "test", "tests"} & set(p.parts))
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


@dataclass
class Workspace:
    root: Path
    base: Path
    """The starting model and its tokenizer (a Hugging Face directory)."""
    sft_train: Path
    sft_validation: Path
    text_train: Path
    text_validation: Path


def make_workspace(root: Path, preset: str = "llama-20m", vocab_size: int = 8192, smoke: bool = False) -> Workspace:
    """Write the data, train the tokenizer and save the starting model under `root` (once)."""
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(
        root,
        root / "base",
        root / "sft_train.jsonl",
        root / "sft_validation.jsonl",
        root / "text_train.txt",
        root / "text_validation.txt",
    )
    if (ws.base / "config.json").is_file():
        return ws
    pairs = stdlib_pairs()
    if smoke:
        pairs = pairs[:200]
    held_out = max(len(pairs) // 20, 8)
    for path, rows in ((ws.sft_validation, pairs[:held_out]), (ws.sft_train, pairs[held_out:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chapters = KJV.read_text(encoding="utf-8").split("\n\n")
    if smoke:
        chapters = chapters[:60]
    cut = max(len(chapters) // 20, 3)
    ws.text_validation.write_text("\n\n".join(chapters[:cut]) + "\n")
    ws.text_train.write_text("\n\n".join(chapters[cut:]) + "\n")
    _save_base(ws, pairs, chapters, preset, vocab_size)
    return ws


def _save_base(ws: Workspace, pairs: list[dict], chapters: list[str], preset: str, vocab_size: int) -> None:
    import torch

    from lmforge.config import Config
    from lmforge.models.build import build_model
    from lmforge.models.tokenizer import train_bpe_tokenizer

    texts = [p["prompt"] + p["completion"] for p in pairs] + chapters
    if vocab_size > 16_384:  # about what these texts give (16,993 merges at most): add whole modules
        texts += stdlib_sources()
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    config = Config.model_validate(
        {"model": {"preset": preset}, "tokenizer": {"train": True}, "data": {"train": str(ws.sft_train)}}
    )
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    model.save_pretrained(str(ws.base))
    tokenizer.save_pretrained(str(ws.base))
