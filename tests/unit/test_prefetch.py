"""The data prefetcher: same items in the same order as reading inline, errors reach the loop, and a
loop that stops early does not hang on the thread; training with or without it is identical."""

import io
import threading
import time

import pytest
import torch
from rich.console import Console

from conftest import RecordingTracker
from lmforge.data.loader import Prefetcher
from lmforge.data.prepare import prepare_data
from lmforge.engine.loop import train
from lmforge.models.build import build_model
from lmforge.tracking.base import Trackers


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_in_order(depth):
    with Prefetcher(iter(range(50)), depth) as items:
        assert list(items) == list(range(50))


def test_work_runs_ahead_of_the_consumer():
    made = []

    def produce():
        for i in range(5):
            made.append(i)
            yield i

    with Prefetcher(produce(), depth=2) as items:
        assert next(items) == 0
        deadline = time.monotonic() + 5
        while len(made) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert made == [0, 1, 2]  # one handed out, two waiting, no more


def test_an_error_reaches_the_consumer_at_its_item():
    def produce():
        yield 1
        raise ValueError("row 7 is broken")

    with Prefetcher(produce(), depth=2) as items:
        assert next(items) == 1
        with pytest.raises(ValueError, match="row 7 is broken"):
            next(items)


def test_closing_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    items = Prefetcher(endless(), depth=2)
    assert next(items) == 0
    items.close()
    assert not items.thread.is_alive()
    assert "lmforge-prefetch" not in [t.name for t in threading.enumerate()]


def test_training_is_identical_with_and_without_prefetching(tiny_config):
    runs = {}
    for depth in (0, 2):
        config = tiny_config("train.max_steps=6", "train.log_every=1", f"data.prefetch={depth}")
        data = prepare_data(config, log=lambda _: None)
        torch.manual_seed(0)
        model = build_model(config, data.tokenizer)
        recorder = RecordingTracker()
        result = train(model, data, config, Trackers(recorder, [], None, print), console=Console(file=io.StringIO()))
        runs[depth] = (recorder.series("train/loss"), result.model.state_dict())
    assert runs[0][0] == runs[2][0] and len(runs[0][0]) == 6
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[2][1][name]), name


def test_closing_with_a_full_queue_at_the_end_does_not_hang():
    """The iterator ends (or fails) while the queue is full and nobody reads any more."""

    def failing():
        yield from range(2)
        raise ValueError("late")

    for items in (iter(range(2)), failing()):
        prefetcher = Prefetcher(items, depth=1)
        assert next(prefetcher) == 0
        time.sleep(0.3)  # the thread now waits to queue its end marker or error
        prefetcher.close()
        assert not prefetcher.thread.is_alive()
