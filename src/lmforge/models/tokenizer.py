"""Training a byte-level BPE tokenizer on a corpus, and loading tokenizers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmforge.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, special: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer.

    Every byte is in the base alphabet, so any text round-trips without unknown tokens.
    `<|endoftext|>` separates documents (and is bos/eos); `<|pad|>` pads batches; `special` adds
    more tokens that are never split (a chat template's markers, e.g. <|im_end|>).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD, *(t for t in special if t not in (EOS, PAD))],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 30
    )


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, need_eos: bool = True) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer; give it a pad token (its EOS) if it has none.

    Args:
        need_eos: language models need EOS to end documents and answers; encoders do not.
    """
    from lmforge.config import looks_local

    if looks_local(str(path)) and not Path(path).expanduser().is_dir():  # never a minute of Hub retries
        raise UserError(f"{path}: no such directory (looked for {Path(path).expanduser().resolve()})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.eos_token_id is None and need_eos:
        raise UserError(f"the tokenizer in {path} has no EOS token, which lmforge needs to separate documents")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer in {path} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A fingerprint of the tokenizer's vocabulary, merges and special tokens."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("lmforge needs a fast (Rust) tokenizer; this one has no backend_tokenizer")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
