"""An interrupted sweep (SIGINT, then SIGKILL of the resumed driver) finished with --resume: every trial
exactly once in MLflow, none lost, each with one value per epoch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kdray.tracking.store import TAG_STATUS, TAG_TRIAL, find_sweep, sweep_children
from sweep_helpers import TINY_SPACE

EPOCHS = 12
SAMPLES = 5


def sweep_cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-u", "-m", "kdray", "sweep", str(tmp / "space.yaml"), "--name", name,
            "--storage", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


def run_until(tmp: Path, env: dict, finished_wanted: int, sig: int, *extra: str) -> tuple[int, int, list[str]]:
    """Run the sweep CLI and send ``sig`` once ``finished_wanted`` trials have finished in this process."""
    proc = subprocess.Popen(sweep_cmd(tmp, "r", *extra), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    finished, log = 0, []
    deadline = time.time() + 240
    for line in proc.stdout:
        log.append(line)
        if "finished: val_accuracy" in line:
            finished += 1
            if finished == finished_wanted:
                proc.send_signal(sig)
        if time.time() > deadline:
            proc.kill()
            break
    return proc.wait(timeout=120), finished, log


def test_a_sweep_interrupted_then_killed_resumes_with_every_trial_exactly_once(tmp_path):
    """SIGINT after two trials, --resume, SIGKILL of that driver after one more trial, --resume again."""
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = SAMPLES
    space["base"]["train"]["epochs"] = EPOCHS
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)

    rc, finished, log = run_until(tmp_path, env, 2, signal.SIGINT)
    assert finished >= 2, "".join(log[-30:])
    assert rc == 130 and any("--resume --name r" in line for line in log), "".join(log[-20:])
    before = {r.data.tags[TAG_TRIAL] for r in sweep_children(c, find_sweep(c, "r"))}
    assert 2 <= len(before) < SAMPLES

    rc, finished, log = run_until(tmp_path, env, 1, signal.SIGKILL, "--resume")
    assert finished >= 1 and rc == -signal.SIGKILL, "".join(log[-30:])
    assert any("resuming sweep r" in line for line in log), "".join(log[-30:])

    r = subprocess.run(sweep_cmd(tmp_path, "r", "--resume"), cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "champion:" in r.stdout

    parent = find_sweep(c, "r")
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_STATUS] == "completed"
    children = sweep_children(c, parent, kind="trial")
    ids = [ch.data.tags[TAG_TRIAL] for ch in children]
    assert len(ids) == len(set(ids)) == SAMPLES, ids  # none lost, none twice
    assert {ch.data.tags["kdray.trial_number"] for ch in children} == {str(i) for i in range(1, SAMPLES + 1)}
    for ch in children:
        assert ch.info.status == "FINISHED" and ch.data.tags[TAG_STATUS] == "completed", (  # why, if not
            ch.data.tags.get("mlflow.runName"), ch.data.tags.get(TAG_STATUS), ch.data.tags.get("kdray.failure"),
            r.stdout[-2000:])
        steps = sorted(m.step for m in c.get_metric_history(ch.info.run_id, "val_accuracy"))
        assert steps == list(range(1, EPOCHS + 1)), (ch.data.tags["kdray.trial_number"], steps)
