"""Shared fixtures: one Ray per test session, one data cache, small trained teachers."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# The shared drivers, fault hooks and float64 references (tests/helpers) import by name from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

# One data directory for the whole session (MNIST-1D is generated once), inherited by Ray's workers.
_DATA = Path(tempfile.mkdtemp(prefix="kdray-test-data-"))
os.environ.setdefault("KDRAY_DATA_DIR", str(_DATA))
# Tests never talk to a real tracking server unless they start one themselves.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 CPUs and the kdray driver resource, started once per test session."""
    import ray

    from kdray.ray_setup import init_ray

    init_ray(num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


def train_record(run_cfg: dict, tmp: Path) -> dict:
    """Train in-process (no Ray) and return the final student's model record."""
    import torch

    from kdray.config import RunConfig
    from kdray.train.loop import STUDENT_FILE, train_run
    from kdray.train.session import Session

    cfg = RunConfig.model_validate(run_cfg)
    session = Session(checkpoint_root=tmp)
    train_run({"run": cfg.model_dump(mode="json")}, session)
    return torch.load(session.last_checkpoint / STUDENT_FILE, weights_only=True)


@pytest.fixture(scope="session")
def blobs_teacher(tmp_path_factory) -> dict:
    """A small 1-D CNN teacher on the tiny synthetic set (a few seconds)."""
    return train_record({"dataset": {"name": "test_blobs"}, "student": {"name": "test_cnn1d"},
                         "train": {"epochs": 15, "batch_size": 64, "lr": 0.01}}, tmp_path_factory.mktemp("t1"))


@pytest.fixture(scope="session")
def mnist1d_teacher(tmp_path_factory) -> dict:
    """A quickly trained MNIST-1D CNN teacher (not the 92 % one: tests need it fast, not strong)."""
    return train_record({"dataset": {"name": "mnist1d"}, "student": {"name": "mnist1d_cnn"},
                         "train": {"epochs": 12, "batch_size": 100, "lr": 0.01}}, tmp_path_factory.mktemp("t2"))


@pytest.fixture(scope="session")
def blobs_teacher_file(tmp_path_factory, blobs_teacher) -> Path:
    from kdray.models import save_model

    return save_model(blobs_teacher, tmp_path_factory.mktemp("tf") / "teacher.pt")
