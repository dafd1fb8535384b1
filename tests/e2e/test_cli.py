"""The command line as a user runs it (subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def kdray(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "kdray", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_explains_every_command(capsys):
    from kdray.cli import main

    out = kdray("--help").stdout
    for cmd in ("list", "layers", "check", "teacher", "distill", "sweep", "best", "compare", "final"):
        assert f"\n    {cmd} " in out, cmd  # a real subcommand, listed with its help line
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "usage: kdray " + cmd in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    sweep_help = capsys.readouterr().out
    for flag in ("--num-samples", "--name", "--storage", "--tracking-uri", "--address", "--resume"):
        assert flag in sweep_help


def test_list_shows_every_registry():
    out = kdray("list").stdout
    for name in ("kd", "dkd", "fitnet", "at", "rkd", "sp", "resnet110", "resnet8x4", "wrn_40_2", "mobilenet_v2",
                 "mnist1d_cnn", "mnist1d", "digits", "cifar100", "imagefolder"):
        assert name in out
    data = json.loads(kdray("list", "--json").stdout)
    assert "temperature" in data["knowledge"]["kd"]["params"]
    # the schemes too, with their papers and parameters (read from the scheme config's fields)
    assert "Zhang et al. 2018" in out and "Furlanello et al. 2018" in out
    assert set(data["schemes"]["dml"]["params"]) == {"peers", "mutual_weight", "temperature"}
    assert set(data["schemes"]["born_again"]["params"]) == {"generations"}


def test_layers_prints_tappable_layers_with_shapes():
    out = kdray("layers", "resnet20").stdout
    assert "layer2" in out and "(32, 16, 16)" in out


def write(tmp: Path, name: str, data) -> Path:
    p = tmp / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_teacher_then_distill_end_to_end(tmp_path):
    teacher = write(tmp_path, "teacher.yaml", {
        "name": "blobs_teacher", "dataset": {"name": "test_blobs"}, "model": {"name": "test_cnn1d"},
        "train": {"epochs": 8, "batch_size": 64, "lr": 0.01}, "output": str(tmp_path / "t.pt")})
    r = kdray("teacher", str(teacher), "--local", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and (tmp_path / "t.pt").is_file()
    cfg = write(tmp_path, "kd.yaml", {
        "name": "blobs-kd", "dataset": {"name": "test_blobs"}, "teacher": {"checkpoint": str(tmp_path / "t.pt")},
        "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd", "temperature": 2.0}, {"type": "fitnet"}],
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.01}})
    r = kdray("distill", str(cfg), "--local", "--json", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 3/3" in r.stdout and "validation accuracy" in r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "out" / "student.pt").is_file() and (tmp_path / "out" / "config.yaml").is_file()
    import torch

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.models import load_record, model_from_record
    from kdray.train.loop import evaluate

    # what it printed is what the saved student scores on the validation split, in a fresh process
    student = model_from_record(load_record(tmp_path / "out" / "student.pt"))
    val = evaluate(student, load_dataset(DatasetConfig(name="test_blobs")).val, 512, torch.device("cpu"))
    assert result["val_accuracy"] == val["accuracy"]


@pytest.mark.parametrize("data,field", [
    ({"student": {"name": "mnist1d_mlpp"}}, "student.name"),
    ({"student": {"name": "mnist1d_mlp"}, "train": {"epochs": 0}}, "train.epochs"),
    ({"student": {"name": "mnist1d_mlp"}, "teacher": {"checkpoint": "absent.pt"}, "knowledge": [{"type": "kd"}]},
     "teacher.checkpoint"),
])
def test_a_bad_config_exits_2_naming_file_and_field_before_ray(tmp_path, data, field):
    p = write(tmp_path, "bad.yaml", data)
    r = kdray("distill", str(p), cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert str(p) in r.stderr and f"field '{field}'" in r.stderr
    assert "starting Ray" not in r.stdout


def test_resume_without_a_name_finds_this_spaces_latest_sweep_not_one_whose_name_shares_its_prefix(tmp_path):
    import os

    from kdray.cli.sweeps import _latest_sweep_dir

    for i, (name, space) in enumerate([("tiny-20260101-000000", "tiny"), ("tiny-big-20260102-000000", "tiny-big")]):
        d = tmp_path / name
        d.mkdir()
        (d / "tuner.pkl").write_bytes(b"")
        (d / "kdray_sweep.json").write_text(json.dumps({"num_samples": 2, "space": space}))
        os.utime(d, (1_000_000 + i, 1_000_000 + i))  # the other space's sweep is the newer one
    assert _latest_sweep_dir(str(tmp_path), "tiny") == "tiny-20260101-000000"
    assert _latest_sweep_dir(str(tmp_path), "tiny-big") == "tiny-big-20260102-000000"
    assert _latest_sweep_dir(str(tmp_path), "other") is None


def test_a_local_run_killed_mid_way_resumes_from_its_checkpoint_and_local_mode_refuses_remote_storage(tmp_path):
    """``--local`` (Train's local mode, in this process) restored nothing: ``--resume --local`` started at epoch 1
    again. It continues from the run's newest checkpoint now; ``--local`` with S3 storage is refused at once."""
    import signal
    import subprocess
    import sys

    cfg = write(tmp_path, "teacher.yaml", {
        "name": "slow", "dataset": {"name": "test_blobs"}, "model": {"name": "test_cnn1d"},
        "train": {"epochs": 40, "batch_size": 8, "lr": 0.01}, "output": str(tmp_path / "t.pt")})
    cmd = [sys.executable, "-u", "-m", "kdray", "teacher", str(cfg), "--local", "--storage", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 6/40" in line:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    r = kdray("teacher", str(cfg), "--local", "--resume", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    resumed = [line for line in r.stdout.splitlines() if "resumed from the checkpoint of epoch" in line]
    assert resumed and int(resumed[0].split()[-1]) >= 6, r.stdout[-2000:]
    assert "epoch 1/40" not in r.stdout and "epoch 40/40" in r.stdout
    bad = kdray("teacher", str(cfg), "--local", "--storage", "s3://bucket/runs", cwd=tmp_path)
    assert bad.returncode == 2 and "--local runs in this process" in bad.stderr, bad.stderr[-2000:]
