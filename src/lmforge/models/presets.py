"""Built-in Llama-architecture sizes for training from scratch.

Each preset is a plain function returning architecture fields; the vocabulary size comes from the
tokenizer. Parameter counts below are at the vocabulary size in brackets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def llama_tiny() -> dict[str, Any]:
    """~0.6M parameters [4k vocab]: for tests and the CPU quickstart."""
    return {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 256}


def llama_20m() -> dict[str, Any]:
    """~20M parameters [8k vocab]."""
    return {"hidden_size": 384, "num_layers": 8, "num_heads": 6, "num_kv_heads": 6, "intermediate_size": 1024}


def llama_120m() -> dict[str, Any]:
    """~120M parameters [32k vocab], GPT-2-small scale, tied embeddings."""
    return {
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "num_kv_heads": 12,
        "intermediate_size": 2304,
        "tie_embeddings": True,
    }


def t5_tiny() -> dict[str, Any]:
    """~2M parameters [4k vocab]: a T5 encoder-decoder for seq2seq from scratch, on CPU."""
    return {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 512}


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "llama-tiny": llama_tiny,
    "llama-20m": llama_20m,
    "llama-120m": llama_120m,
    "t5-tiny": t5_tiny,
}
PRESET_TASKS = {"t5-tiny": "seq2seq"}  # the rest build causal LMs
