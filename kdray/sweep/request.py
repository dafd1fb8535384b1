"""What a sweep is asked to do and what it returns, and where its own files live (the sweep's size and space
hash beside Tune's state, the Optuna study beside the driver)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdray.storage import is_remote
from kdray.sweep.space import SearchSpace
from kdray.tracking.champion import Champion, TrialOutcome


@dataclass
class SweepRequest:
    space: SearchSpace
    space_path: str
    space_yaml: str
    name: str
    storage: str
    tracking_uri: str
    address: str | None = None
    resume: bool = False
    num_samples: int | None = None
    max_concurrent: int | None = None
    quiet: bool = False
    register_champion: bool = True


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    outcomes: list[TrialOutcome]
    champion: Champion | None
    leaderboard: pd.DataFrame
    wall_s: float
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    budget: pd.DataFrame = field(default_factory=pd.DataFrame)  # per knowledge type: trials, epochs, best


SWEEP_FILE = "kdray_sweep.json"  # beside Tune's state: the sweep's own size, read back by --resume


def local_state_dir(req: SweepRequest) -> Path:
    """Where the driver keeps what only it uses (the Optuna study): the storage if it is a local path
    (with remote storage a copy of the study is uploaded beside Tune's state at the end)."""
    root = Path("kdray_runs").resolve() if is_remote(req.storage) else Path(req.storage)
    return root / req.name


def space_digest(space_yaml: str) -> str:
    return hashlib.sha256(space_yaml.encode()).hexdigest()[:16]
