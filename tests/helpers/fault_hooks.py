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


class FailOneRunOfSeed:
    """Raise in the first run of ``seed`` that reaches its first step (one run only, across processes: the marker
    file is created exclusively), as a CUDA out-of-memory error or a data error would end one retraining run."""

    def __init__(self, seed: int, marker: Path) -> None:
        self.seed, self.marker = seed, Path(marker)

    def __call__(self, epoch: int, step: int) -> None:
        import torch

        from kdray.train.loop import epoch_seed

        if epoch != 1 or step != 0 or torch.initial_seed() != epoch_seed(self.seed, 0, 1):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError(f"simulated out of memory in the run of seed {self.seed}")
