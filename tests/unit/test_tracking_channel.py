"""The channel in front of each tracking backend: never blocks, keeps order, retries, reports.

The backends here are small in-memory implementations of the Tracker protocol that fail or block
on demand; the real backends (an MLflow server killed mid-run, W&B, Comet, TensorBoard) are
exercised in tests/integration/test_tracking.py.
"""

from __future__ import annotations

import json
import threading

from lmforge.tracking.base import Channel, JsonlTracker, Trackers


class FlakyBackend:
    """Fails its first `failures` calls (a server that is down, then back), then records calls."""

    name = "flaky"

    def __init__(self, failures: int = 0, gate: threading.Event | None = None) -> None:
        self.failures = failures
        self.gate = gate
        self.calls: list[tuple] = []

    def _call(self, *record) -> None:
        if self.gate is not None:
            self.gate.wait()
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("server down")
        self.calls.append(record)

    def start(self, run_id):
        self._call("start", run_id)
        return run_id or "run-1"

    def log_params(self, params):
        self._call("params", dict(params))

    def log_metrics(self, metrics, step, timestamp):
        self._call("metrics", step, dict(metrics))

    def finish(self, status):
        self._call("finish", status)


def test_points_survive_an_outage_in_order_and_the_error_is_shown_once():
    backend, warnings = FlakyBackend(failures=3), []
    channel = Channel(backend, warnings.append, on_start=lambda: None, max_backoff=0.05)
    channel.put("start", None)
    for step in range(1, 6):
        channel.put("log_metrics", {"loss": 1.0 / step}, step, 0.0)
    channel.put("finish", "FINISHED")
    assert channel.close(timeout=10)
    assert backend.calls == [
        ("start", None),
        *[("metrics", step, {"loss": 1.0 / step}) for step in range(1, 6)],
        ("finish", "FINISHED"),
    ]
    assert channel.run_id == "run-1" and channel.missing() == 0
    assert len(warnings) == 2 and "failed in start" in warnings[0] and "ConnectionError" in warnings[0]
    assert "works again" in warnings[1]


def test_a_blocked_backend_never_blocks_the_caller_and_close_gives_up_on_a_dead_one():
    gate = threading.Event()  # the backend hangs until the gate opens
    backend = FlakyBackend(failures=10**9, gate=gate)
    channel = Channel(backend, lambda m: None, on_start=lambda: None, max_backoff=0.01)
    channel.put("start", None)
    for step in range(1000):  # returns although the backend has not answered once
        channel.put("log_metrics", {"a": 1.0, "b": 2.0}, step, 0.0)
    assert channel.missing() == 2000
    gate.set()
    assert not channel.close(timeout=0.3)  # still failing: give up, report what is missing
    assert channel.missing() == 2000 and channel.failing.startswith("ConnectionError")


def test_a_full_queue_drops_the_oldest_points_and_counts_them():
    gate = threading.Event()
    backend = FlakyBackend(gate=gate)
    channel = Channel(backend, lambda m: None, on_start=lambda: None, capacity=10)
    channel.put("start", None)
    for step in range(20):
        channel.put("log_metrics", {"a": 1.0}, step, 0.0)
    assert channel.dropped == 11  # the start call stays; the 11 oldest points went
    gate.set()
    assert channel.close(timeout=5)
    assert [c[1] for c in backend.calls if c[0] == "metrics"] == list(range(11, 20))


def test_trackers_write_jsonl_at_once_record_ids_and_report_missing_points(tmp_path):
    good, dead, warnings = FlakyBackend(), FlakyBackend(failures=10**9), []
    dead.name = "dead"
    trackers = Trackers(JsonlTracker(tmp_path / "metrics.jsonl"), [good, dead], tmp_path, warnings.append, None, 0.3)
    trackers.log_params({"train.lr": 0.1, "tracking.tags.api_key": "abcdefgh"})
    trackers.log_metrics({"loss": 2.0}, 1)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0  # before any backend
    missing = trackers.finish("FINISHED")
    assert missing == {"dead": 1}
    assert good.calls[1] == ("params", {"train.lr": 0.1, "tracking.tags.api_key": "***REDACTED***"})
    assert good.calls[-1] == ("finish", "FINISHED")
    record = json.loads((tmp_path / "tracking.json").read_text())
    assert record == {
        "status": "FINISHED",
        "backends": {"flaky": {"run_id": "run-1", "missing": 0}, "dead": {"run_id": None, "missing": 1}},
    }
    assert any(f"lmforge sync {tmp_path}" in w for w in warnings)


def test_other_processes_of_a_distributed_job_log_nothing(tmp_path, tiny_config):
    from lmforge.tracking.base import open_trackers

    config = tiny_config("tracking.backends=[mlflow]")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trackers = open_trackers(config, run_dir, print, main_process=False)
    trackers.log_metrics({"loss": 1.0}, 1)
    trackers.finish("FINISHED")
    assert trackers.channels == [] and list(run_dir.iterdir()) == []


class Refusal(Exception):
    pass


class RefusingBackend(FlakyBackend):
    """Refuses for good (as MLflow refuses a name it does not allow) the calls named in `refuse`."""

    name = "refusing"

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse

    def rejects(self, exc):
        return isinstance(exc, Refusal)

    def start(self, run_id):
        if "start" in self.refuse:
            raise Refusal("bad tag name")
        return super().start(run_id)

    def log_params(self, params):
        if "log_params" in self.refuse:
            raise Refusal("bad param name 'a, b'")
        super().log_params(params)


def test_a_refused_call_is_dropped_and_reported_and_never_blocks_the_others(tmp_path):
    backend, warnings = RefusingBackend({"log_params"}), []
    trackers = Trackers(JsonlTracker(tmp_path / "metrics.jsonl"), [backend], tmp_path, warnings.append, None, 5)
    trackers.log_params({"a, b": 1})
    for step in (1, 2):
        trackers.log_metrics({"loss": 1.0}, step)
    assert trackers.finish("FINISHED") == {}  # the refusal costs no metric value
    assert backend.calls == [("start", None), ("metrics", 1, {"loss": 1.0}), ("metrics", 2, {"loss": 1.0})] + [
        ("finish", "FINISHED")
    ]
    assert len(warnings) == 1 and "refused log_params" in warnings[0] and "bad param name 'a, b'" in warnings[0]
    record = json.loads((tmp_path / "tracking.json").read_text())["backends"]["refusing"]
    assert record == {"run_id": "run-1", "missing": 0, "rejected": ["log_params: Refusal: bad param name 'a, b'"]}


def test_a_refused_start_drops_every_call_at_once_and_reports_the_missing_points(tmp_path):
    backend, warnings = RefusingBackend({"start"}), []
    trackers = Trackers(JsonlTracker(tmp_path / "metrics.jsonl"), [backend], tmp_path, warnings.append, None, 60)
    for step in (1, 2, 3):
        trackers.log_metrics({"loss": 1.0, "lr": 0.1}, step)
    assert trackers.finish("FINISHED") == {"refusing": 6}  # at once: nothing is retried
    assert backend.calls == [] and sum("refused start" in w for w in warnings) == 1
    assert any("missing 6 metric values" in w for w in warnings)
