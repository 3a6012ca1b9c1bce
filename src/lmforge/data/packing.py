"""Packing tokenized documents into fixed-length blocks for language-model pretraining."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pack_documents(token_lists: Iterable[Sequence[int]], eos_id: int, block_size: int) -> tuple[list[np.ndarray], int]:
    """Join documents, each followed by EOS, into one stream and cut it into blocks.

    Every token of the stream lands in a block: the last block is shorter unless the stream
    divides evenly, and it is only dropped when it holds fewer than 2 tokens (nothing to predict).

    Args:
        token_lists: token ids of each document, in corpus order.
        eos_id: id appended after every document, so the model learns where documents end.
        block_size: tokens per block (data.max_length).

    Returns:
        The blocks (int32 arrays) and the number of tokens dropped (0 or 1).
    """
    eos = np.array([eos_id], dtype=np.int32)
    pieces = []
    for ids in token_lists:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(eos)
    if not pieces:
        return [], 0
    stream = np.concatenate(pieces)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    dropped = 0
    if len(blocks[-1]) < 2:
        dropped = len(blocks.pop())
    return blocks, dropped
