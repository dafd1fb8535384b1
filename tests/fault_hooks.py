"""Fault injection for tests, kept out of the training loop: a ``step_hook`` the loop calls before each step.

Ray ships the hook to its Train workers inside the loop config; they cannot import this test module, so it
is registered with Ray's cloudpickle to travel by value.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillOnce:
    """SIGKILL the process that reaches (epoch, step) first; the marker file keeps the restarted worker
    from dying again, so it resumes from its checkpoint and finishes."""

    def __init__(self, epoch: int, step: int, marker: Path) -> None:
        self.epoch, self.step, self.marker = epoch, step, Path(marker)

    def __call__(self, epoch: int, step: int) -> None:
        if epoch == self.epoch and step == self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
