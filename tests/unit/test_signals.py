"""Stopping at a step boundary: which signals pause a run, and which stop it at once."""

import os
import signal

import pytest

from lmforge.engine.signals import StopOnSignal


def test_sigusr1_pauses_and_never_escalates_while_a_second_sigterm_stops_at_once():
    """SLURM's pre-timeout SIGUSR1, and the parent-death signal a sweep's trial gets once per thread
    of its dead worker, only ask for a pause; a second SIGTERM (or Ctrl-C) means now."""
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
    with StopOnSignal() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)
