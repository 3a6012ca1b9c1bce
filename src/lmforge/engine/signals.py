"""Stopping at a step boundary on SIGTERM/SIGINT instead of dying mid-step.

The first signal only sets `requested` (and says so on stderr); the loop saves a checkpoint after
the current step and returns. A second SIGINT (or SIGTERM) exits at once. SIGUSR1 pauses the same way but never
escalates, however often it comes: it is SLURM's warning before a job's time limit
(`--signal=B:USR1@120`), and the signal a sweep's trial gets when its worker dies (Linux sends
the parent-death signal once for each thread of the parent).
"""

from __future__ import annotations

import os
import signal
import threading


class StopOnSignal:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)) -> None:
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGUSR1:
            self.requested = self.requested or "SIGUSR1"
            return
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = signal.Signals(signum).name
        # os.write, not print: the handler may run while the main thread is inside a print
        os.write(2, f"{self.requested}: stopping after this step (again to stop at once)\n".encode())

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
