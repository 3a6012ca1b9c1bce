"""Built-in sizes for training from scratch.

Each preset is a plain function returning lmforge's size fields; the vocabulary size comes from the
tokenizer. Parameter counts below are at the vocabulary size in brackets. A preset builds a Llama
unless PRESET_ARCHITECTURES names its family (model.architecture overrides it: the preset then gives
only the sizes).
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


def gpt2_tiny() -> dict[str, Any]:
    """~0.4M parameters [4k vocab, tied embeddings]: a GPT-2 (learned absolute positions, LayerNorm,
    GELU MLP) for tests and CPU runs."""
    return {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}


def qwen2_tiny() -> dict[str, Any]:
    """~0.6M parameters [4k vocab]: a Qwen2 (rotary positions, grouped-query attention with biased
    q/k/v projections, SwiGLU MLP) for tests and CPU runs."""
    return {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "llama-tiny": llama_tiny,
    "llama-20m": llama_20m,
    "llama-120m": llama_120m,
    "t5-tiny": t5_tiny,
    "gpt2-tiny": gpt2_tiny,
    "qwen2-tiny": qwen2_tiny,
}
PRESET_TASKS = {"t5-tiny": "seq2seq"}  # the rest build causal LMs
PRESET_ARCHITECTURES = {"gpt2-tiny": "gpt2", "qwen2-tiny": "qwen2"}
"""The Hugging Face model_type of the causal-LM presets that are no Llama."""


def family(architecture: str | None, preset: str | None) -> str:
    """The Hugging Face model_type of a causal LM built from scratch: model.architecture, else the
    preset's family, else llama."""
    return architecture or PRESET_ARCHITECTURES.get(preset or "", "llama")
