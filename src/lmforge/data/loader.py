"""Deterministic batching: which rows go into which micro-batch of which optimizer step.

The order of epoch e is a permutation seeded by (seed, e) alone, and a position is just
(epoch, micro-batch index), so training can start at any position without replaying or consuming
random numbers. That is what makes resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

IGNORE_INDEX = -100


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


@dataclass
class StepPlan:
    """How an epoch is cut into micro-batches and optimizer steps, for one process of `world`."""

    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world: int = 1

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        per_step = self.grad_accum * self.world
        if self.world == 1:
            return math.ceil(self.micro_batches_per_epoch / per_step)
        # Every process must take part in every step, so a last step that cannot give each
        # process a micro-batch is dropped.
        full, rest = divmod(self.micro_batches_per_epoch, per_step)
        return full + (1 if rest >= self.world else 0)

    def step_rows(self, order: np.ndarray, step_in_epoch: int, rank: int = 0) -> list[np.ndarray]:
        """Row indices of this process's micro-batches for one optimizer step."""
        per_step = self.grad_accum * self.world
        first = step_in_epoch * per_step
        last = min(first + per_step, self.micro_batches_per_epoch)
        mine = range(first + rank, last, self.world)
        return [order[m * self.micro_batch_size : (m + 1) * self.micro_batch_size] for m in mine]


def collate(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into (B, T) input_ids and labels; padding is IGNORE_INDEX in labels.

    No attention mask is needed: with causal attention a real token never attends to the padding
    that follows it, and padded positions carry no loss.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(np.asarray(row), dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        labels[i, : len(ids)] = ids
    return {"input_ids": input_ids, "labels": labels}


def fetch(dataset: Dataset, indices: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Collate the rows at `indices` of a packed dataset."""
    return collate(dataset[indices.tolist()]["input_ids"], pad_id)


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int | None, rank: int = 0, world: int = 1):
    """Yield this process's evaluation batches, in dataset order (the same ones every time)."""
    count = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    for b in range(rank, count, world):
        yield np.arange(b * batch_size, min((b + 1) * batch_size, len(dataset)))
