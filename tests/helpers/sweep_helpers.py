"""A tiny search space for sweep tests (test_blobs, a 1-D CNN teacher trained once, an MLP student), a session
that interrupts a run after a given epoch, and the straight-versus-resumed pair that resume tests compare."""
from __future__ import annotations

from pathlib import Path

import yaml

from kdray.train.session import Session

TINY_SPACE = {
    "name": "tiny",
    "num_samples": 2,
    "seed": 0,
    "base": {
        "dataset": {"name": "test_blobs"},
        "teacher": {"train": {"model": {"name": "test_cnn1d"}, "train": {"epochs": 6, "batch_size": 64, "lr": 0.01}}},
        "student": {"name": "test_mlp"},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
    },
    "scheduler": {"type": "fifo"},
    "searcher": {"type": "tpe", "n_startup_trials": 4},
    "space": {
        "train.lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
        "knowledge": {"none": {}, "kd": {"kd.temperature": {"type": "float", "low": 1.0, "high": 8.0, "log": True}},
                      "kd+fitnet": {"kd.temperature": 4.0, "fitnet.weight": {"type": "float", "low": 0.1,
                                                                             "high": 1.0}}},
    },
}


def write_space(tmp: Path, **overrides) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    p = tmp / f"{data['name']}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def request(tmp: Path, space_path: Path, name: str, **kw):
    from kdray.sweep.runner import SweepRequest
    from kdray.sweep.space import load_space

    return SweepRequest(space=load_space(space_path), space_path=str(space_path), space_yaml=space_path.read_text(),
                        name=name, storage=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                        quiet=True, **kw)


class Interrupt(Exception):
    """Raised by :class:`StopAfter`: the run stops as if its process had been interrupted."""


class StopAfter(Session):
    """An in-process session whose run is interrupted right after the report of epoch ``epochs``."""

    def __init__(self, epochs: int, **kw):
        super().__init__(**kw)
        self.stop_after = epochs

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.stop_after:
            raise Interrupt()


def straight_and_resumed(loop: dict, root: Path, stop_after: int = 2):
    """Run ``loop`` straight through, and again stopped after epoch ``stop_after`` then resumed from that
    checkpoint. Returns (the straight session, the resumed session, the resumed run's last metrics)."""
    from kdray.train.loop import train_run

    straight = Session(checkpoint_root=root / "a")
    train_run(loop, straight)
    first = StopAfter(stop_after, checkpoint_root=root / "b")
    try:
        train_run(loop, first)
    except Interrupt:
        pass
    else:
        raise AssertionError(f"the run was not interrupted after epoch {stop_after}")
    resumed = Session(checkpoint_root=root / "c", resume_from=first.last_checkpoint)
    return straight, resumed, train_run(loop, resumed)
