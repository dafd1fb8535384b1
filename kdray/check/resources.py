"""Whether a run's workers fit the machine or cluster: refused at once rather than waiting forever."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kdray.config import ConfigError, RunConfig


def local_capacity() -> dict[str, float]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(cfg: RunConfig, capacity: dict[str, float] | None = None, file: str | Path | None = None,
                    where: str = "resources", holder: str | None = None) -> None:
    """A run whose workers cannot fit on the machine or cluster would wait forever: refuse it now.

    ``holder`` says what ``capacity`` is ("the cluster can grow to" for an autoscaler's maximum)."""
    cap = capacity or local_capacity()
    holder = holder or ("the cluster has" if capacity else "the machine has")
    res = cfg.resources
    cpus = res.num_workers * res.cpus_per_worker
    if cpus > cap.get("CPU", 0):
        raise ConfigError(
            f"{res.num_workers} workers x {res.cpus_per_worker:g} CPUs = {cpus:g} CPUs, but {holder} "
            f"{cap.get('CPU', 0):g}", file, f"{where}.num_workers")
    gpus = res.num_workers * res.gpus_per_worker
    if gpus > cap.get("GPU", 0):
        raise ConfigError(
            f"{res.num_workers} workers x {res.gpus_per_worker:g} GPUs = {gpus:g} GPUs, but {holder} "
            f"{cap.get('GPU', 0):g}", file, f"{where}.gpus_per_worker")
