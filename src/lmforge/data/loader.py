"""Deterministic batching: which rows go into which micro-batch of which optimizer step.

The order of epoch e is a permutation seeded by (seed, e) alone, and a position is just
(epoch, micro-batch index), so training can start at any position without replaying or consuming
random numbers. That is what makes resume exact.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from lmforge.data.curriculum import CurriculumPhase
from lmforge.data.packing import position_ids

IGNORE_INDEX = -100


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def row_order(
    lengths: Sequence[int],
    seed: int,
    epoch: int,
    order: str = "shuffle",
    group_by: int | None = None,
    batch: int = 1,
) -> np.ndarray:
    """The rows of an epoch in training order, a function of (seed, epoch) and the settings only.

    Args:
        lengths: tokens per row.
        order: shuffle, length_ascending (shortest first, every epoch) or as_is (stored order).
        group_by: for shuffle, sort each run of `group_by` shuffled rows by length and cut it into
            micro-batches of `batch` rows, which are then shuffled: little padding inside a
            micro-batch, and no long-to-short sweep across them.
    """
    if order == "as_is":
        return np.arange(len(lengths))
    if order == "length_ascending":
        return np.argsort(np.asarray(lengths), kind="stable")
    permutation = epoch_order(len(lengths), seed, epoch)
    if not group_by:
        return permutation
    sizes = np.asarray(lengths)[permutation]
    batches = []
    for start in range(0, len(permutation), group_by):
        group = permutation[start : start + group_by][np.argsort(-sizes[start : start + group_by], kind="stable")]
        batches += [group[i : i + batch] for i in range(0, len(group), batch)]
    shuffled = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return np.concatenate([batches[i] for i in shuffled]) if batches else permutation


def training_order(lengths: Sequence[int], config, epoch: int) -> np.ndarray:
    """The row order of an epoch as the config asks for it (data.order, length grouping)."""
    data, batch = config.data, config.train.micro_batch_size
    group = batch * 32 if data.group_by_length and not data.packs else None
    return row_order(lengths, config.seed, epoch, data.order, group, batch)


def padding_fraction(num_tokens: Sequence[int], order: np.ndarray, micro_batch_size: int) -> float:
    """Share of padding when rows in `order` are cut into micro-batches padded to their longest row."""
    sizes = np.asarray(num_tokens)[order]
    padded = sum(
        len(chunk) * chunk.max()
        for chunk in np.array_split(sizes, range(micro_batch_size, len(sizes), micro_batch_size))
        if len(chunk)
    )
    return float(1 - sizes.sum() / padded) if padded else 0.0


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


HOST_KEYS = frozenset({"num_tokens", "segments"})
"""Batch entries that stay on the host: read there, never copied to the device."""


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into (B, T) input_ids, labels and position_ids, with what the host knows of them.

    position_ids restart at 0 for each packed example: with no attention mask and no KV cache,
    transformers turns that into block-diagonal causal attention, so examples sharing a row never
    see each other. No attention mask is needed for the padding either: with causal attention a
    real token never attends to the padding after it, and padded positions carry no loss.

    Also, so that a GPU never has to be asked: `segments`, the lengths of the examples in flat
    (row-major) order, the padding of a row counting as one (what `attention.segment_lengths` reads
    off the position ids; stays on the host); `target_index`, the flat positions that have a next
    token to predict (the rows a chunked loss scores); `num_tokens`, the real tokens.
    """
    width = max(sum(r["lengths"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments: list[int] = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(np.asarray(row["labels"]), dtype=torch.long)
        positions[i, :n] = torch.as_tensor(position_ids(row["lengths"]))
        positions[i, n:] = torch.arange(width - n)  # padding: a sequence of its own
        segments += [*row["lengths"], width - n] if width > n else row["lengths"]
    has_target = torch.zeros_like(labels, dtype=torch.bool)
    has_target[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "target_index": has_target.reshape(-1).nonzero().squeeze(1),
        "segments": torch.tensor(segments, dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows)),  # real tokens, padding excluded
    }


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch with its tensors on `device` (asynchronously from pinned memory), HOST_KEYS left where they are."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


def collate_encoder(rows: Sequence[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """seq2seq and classification batches: right-padded inputs with an attention mask (encoders
    attend both ways, so padding must be masked), and labels: padded targets, or one class id per row."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)
        attention_mask[i, :n] = 1
    if task == "classification":
        labels = torch.tensor([row["labels"][0] for row in rows], dtype=torch.long)
    else:
        target_width = max(len(r["labels"]) for r in rows)
        labels = torch.full((len(rows), target_width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row["labels"])] = torch.as_tensor(np.asarray(row["labels"]), dtype=torch.long)
    num_tokens = torch.tensor(sum(int(r["num_tokens"]) for r in rows))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_tokens": num_tokens}


def fetch(dataset: Dataset, indices: np.ndarray, pad_id: int, task: str = "causal-lm") -> dict[str, torch.Tensor]:
    """Collate the rows at `indices` of a prepared dataset."""
    columns = dataset[indices.tolist()]
    if task != "causal-lm":
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        return collate_encoder(rows, pad_id, task)
    rows = [
        {"input_ids": i, "labels": lab, "lengths": n}
        for i, lab, n in zip(columns["input_ids"], columns["labels"], columns["lengths"], strict=True)
    ]
    return collate(rows, pad_id)


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int | None, rank: int = 0, world: int = 1):
    """Yield this process's evaluation batches, in dataset order (the same ones every time)."""
    count = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    for b in range(rank, count, world):
        yield np.arange(b * batch_size, min((b + 1) * batch_size, len(dataset)))


@dataclass
class StepData:
    epoch: int
    step_in_epoch: int
    """The step's position in its epoch; -1 for a step of data.curriculum's phase, which is in no
    epoch (the loop counts the step and keeps step_in_epoch at 0 until the epochs begin)."""
    rows: list[np.ndarray]
    """Row indices of each micro-batch (for error messages)."""
    batches: list[dict[str, torch.Tensor]]


def step_data(
    dataset: Dataset,
    plan: StepPlan,
    config,
    pad_id: int,
    start: tuple[int, int],
    rank: int = 0,
    pin: bool = False,
    step: int = 0,
    total_steps: int | None = None,
) -> Iterator[StepData]:
    """This process's micro-batches of every optimizer step from start = (epoch, step_in_epoch) on.

    With data.curriculum, the steps of its phase come first: step t draws the rows of all processes
    from the pool of step t (`CurriculumPhase.draw`, a function of (seed, t)) and this process takes
    its micro-batches of them, as StepPlan deals out an epoch's; the epochs begin after the phase,
    at (0, 0).

    Args:
        step: optimizer steps taken so far (the run's global step), and total_steps: the run's
            length (default: what train.max_steps / train.epochs make of `plan`); data.curriculum's
            schedule is a function of them.
    """
    (epoch, step_in_epoch), lengths, task = start, dataset["num_tokens"], config.model.task
    if total_steps is None:
        train = config.train
        total_steps = train.max_steps if train.max_steps is not None else train.epochs * plan.steps_per_epoch
    phase = curriculum_phase(dataset, config, total_steps)
    if phase is not None and phase.in_phase(step):
        epoch, step_in_epoch = 0, 0
        per_step = plan.micro_batch_size * plan.grad_accum * plan.world
        share = StepPlan(per_step, plan.micro_batch_size, plan.grad_accum, plan.world)
        while phase.in_phase(step):
            rows = share.step_rows(phase.draw(step, per_step), 0, rank)
            yield StepData(0, -1, rows, _fetched(dataset, rows, pad_id, task, pin))
            step += 1
    order = training_order(lengths, config, epoch)
    while True:
        if step_in_epoch == plan.steps_per_epoch:  # next epoch, next permutation
            epoch, step_in_epoch = epoch + 1, 0
            order = training_order(lengths, config, epoch)
        rows = plan.step_rows(order, step_in_epoch, rank)
        yield StepData(epoch, step_in_epoch, rows, _fetched(dataset, rows, pad_id, task, pin))
        step_in_epoch += 1


def curriculum_phase(dataset: Dataset, config, total_steps: int) -> CurriculumPhase | None:
    """data.curriculum's phase over the prepared training rows (None without a curriculum)."""
    if config.data.curriculum is None:
        return None
    if "level" not in dataset.column_names:
        raise ValueError("data.curriculum needs training rows prepared with it (they have no level column)")
    return CurriculumPhase.of(config, dataset.data.column("level").to_numpy(), total_steps)


def _fetched(dataset: Dataset, rows: list[np.ndarray], pad_id: int, task: str, pin: bool) -> list[dict]:
    batches = [fetch(dataset, r, pad_id, task) for r in rows]
    if pin:
        batches = [{k: v if k in HOST_KEYS else v.pin_memory() for k, v in b.items()} for b in batches]
    return batches


class Prefetcher:
    """Runs an iterator `depth` items ahead in a daemon thread: reading Arrow rows and collating
    them overlaps the training step (torch kernels release the GIL). depth 0 runs it inline.
    An exception in the iterator is raised by the next() that would have returned its item."""

    _DONE = object()

    def __init__(self, items: Iterator, depth: int) -> None:
        self.items, self.depth = items, depth
        if depth:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, name="lmforge-prefetch", daemon=True)
            self.thread.start()

    def _fill(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def _put(self, item) -> bool:
        """Queue `item` once there is room; False if the consumer closed first (it may never take it)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if not self.depth:
            return next(self.items)
        item = self.queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.depth:
            self.stop.set()
            self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
