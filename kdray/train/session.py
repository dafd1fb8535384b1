"""Where the training loop runs, and how it reports: Ray Train worker, Ray Tune trial, or plain process.

The loop is one function; a ``Session`` hides the three ways of reporting metrics and checkpoints.
FIELD-NOTES: inside a Tune function trial, Train's own ``ray.train.report`` is refused, so a loop run
directly in the trial must use ``ray.tune.report``; on Train workers it must use ``ray.train.report``
(every rank calls it; only rank 0 passes a checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kdray.runfiles import FAILURE_FILE


class Session:
    """A single process, rank 0 of 1: the base for the Ray sessions and for in-process runs."""

    kind = "local"

    def __init__(self, checkpoint_root: str | os.PathLike | None = None,
                 on_report: Callable[[dict[str, Any], str | None], None] | None = None,
                 resume_from: str | os.PathLike | None = None) -> None:
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.on_report = on_report
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self.keep_checkpoints: int | None = None  # the newest K kept (train.keep_checkpoints); None: all
        self._kept: list[Path] = []

    # -- topology --------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def local_rank(self) -> int:
        return 0

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("resources.gpus_per_worker > 0 but this worker sees no CUDA device")
            return torch.device("cuda", self.local_rank if torch.cuda.device_count() > self.local_rank else 0)
        return torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics): each rank updated its own
        during the epoch, and only rank 0's are checkpointed, so validation must measure those."""
        if self.world_size > 1:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)

    # -- reporting ---------------------------------------------------------------------------------
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_root is not None:
            dest = self.checkpoint_root / f"checkpoint_{int(metrics.get('epoch', len(self.reports))):06d}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)
            self.last_checkpoint = dest
            self._kept = [p for p in self._kept if p != dest] + [dest]
            while self.keep_checkpoints and len(self._kept) > self.keep_checkpoints:
                shutil.rmtree(self._kept.pop(0), ignore_errors=True)  # as Ray's CheckpointConfig(num_to_keep)
        if self.on_report:
            self.on_report(dict(metrics), str(self.last_checkpoint) if checkpoint_dir else None)

    def report_failure(self, metrics: dict[str, Any]) -> None:
        """The last report of a run that failed (``metrics["failed"]`` says why)."""
        self.report(metrics, None)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        """The directory of the checkpoint to resume from, if any (valid inside the ``with``)."""
        yield str(self.resume_from) if self.resume_from else None


class RayTrainSession(Session):
    """Inside a ``TorchTrainer`` worker (or its in-process local mode, ``num_workers=0``)."""

    kind = "train"

    def __init__(self, local_checkpoint_root: str | None = None, resume_from: str | None = None) -> None:
        """``local_checkpoint_root``: in Train's local mode checkpoints are not copied to storage, so the
        session keeps them there itself (the runner sets it only for ``num_workers=0``). ``resume_from``: a
        checkpoint folder a new run starts from (a restart of this run resumes its own newer checkpoints)."""
        super().__init__(checkpoint_root=local_checkpoint_root, resume_from=resume_from)
        import ray.train

        self._ctx = ray.train.get_context()

    @property
    def world_size(self) -> int:
        return self._ctx.get_world_size()

    @property
    def rank(self) -> int:
        return self._ctx.get_world_rank()

    @property
    def local_rank(self) -> int:
        return self._ctx.get_local_rank()

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir and self.checkpoint_root is not None:
            super().report(metrics, checkpoint_dir)  # persist a copy
            checkpoint_dir = str(self.last_checkpoint)
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def report_failure(self, metrics: dict[str, Any]) -> None:
        """Ray Train V2 fills ``Result.metrics`` from the latest *checkpoint*: a failure report without one
        never reaches the caller, which would then save the last good epoch as if the run had finished.
        Rank 0 attaches a checkpoint holding only ``failure.json``."""
        if self.rank != 0:
            self.report(metrics, None)
            return
        import json

        with scratch_dir("kdray-failure-") as d:
            (Path(d) / FAILURE_FILE).write_text(json.dumps(metrics, default=str))
            self.report(metrics, d)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield str(self.resume_from) if self.resume_from else None
        else:
            with ckpt.as_directory() as d:
                yield d


class TuneSession(Session):
    """Directly inside a Ray Tune function trial: one process, no Train worker group."""

    kind = "tune"

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield d


@contextlib.contextmanager
def scratch_dir(prefix: str = "kdray-ckpt-") -> Iterator[str]:
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
