"""What the user sees while training: a live bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_train_line(metrics: dict[str, float]) -> str:
    parts = [f"loss {metrics['train/loss']:.4f}", f"lr {metrics['train/lr']:.2e}"]
    if "train/grad_norm" in metrics:
        parts.append(f"grad {metrics['train/grad_norm']:.2f}")
    parts.append(f"{metrics['train/tokens_per_sec'] / 1000:.1f}k tok/s")
    return "  ".join(parts)


class TrainProgress:
    """Step counter with loss, lr, tokens/s and ETA."""

    def __init__(self, total_steps: int, console: Console, enabled: bool = True) -> None:
        self.total = total_steps
        self.console = console
        self.live = enabled and console.is_terminal
        self.start = self.window_start = time.perf_counter()
        self.start_step = 0
        self.bar: Progress | None = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total_steps, info="")
            self.bar.start()

    def begin(self, step: int) -> None:
        self.start, self.start_step = time.perf_counter(), step
        self.window_start = self.start
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        info = format_train_line(metrics)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        self.console.print(f"step {step}/{self.total}  {info}  eta {format_duration(eta)}", highlight=False)

    def clock(self) -> float:
        """Seconds since the last restart_clock(): the time of the current throughput window."""
        return time.perf_counter() - self.window_start

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
