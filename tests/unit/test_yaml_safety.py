"""YAML that expands without bound (aliases of aliases) is refused before its value is ever built."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.config import ConfigError, read_yaml

REPO = Path(__file__).resolve().parents[2]

# Nine lines whose aliases expand to 9**9 (about 387 million) strings: the classic "billion laughs".
LAUGHS = "".join(
    f"{k}: &{k} [{', '.join([f'*{prev}'] * 9)}]\n" if prev else f"{k}: &{k} [{', '.join(['lol'] * 9)}]\n"
    for prev, k in zip([None, *"abcdefgh"], "abcdefghi")
) + "name: *i\n"  # a field that pydantic would format into its error message


def test_check_refuses_a_billion_laughs_quickly_naming_the_file(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run([sys.executable, "-m", "kdray", "check", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("kdray check was still expanding the aliases after 60 s")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time, not wall time: the 2 shared CPUs here run at a load of ~8, which stretched a 4 s run to 14 s
    # of wall time. Refusing costs the import of kdray (~4 s of CPU); expanding the value cost ~39 s.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 12, f"kdray check used {cpu:.1f} s of CPU"
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(path) in done.stderr and "alias" in done.stderr
    assert len(done.stderr) < 2000, "the error message printed the expanded value"


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="loop.yaml.*alias"):
        read_yaml(path)


def test_ordinary_anchors_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 3}\ntrain:\n  <<: *b\n  epochs: 5\nothers: [*b, *b]\n")
    data = read_yaml(path)
    assert data["train"] == {"lr": 0.1, "epochs": 5}
    assert data["others"] == [{"lr": 0.1, "epochs": 3}] * 2
