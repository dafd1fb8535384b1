"""Scale-out: the cluster configs pass validation, and a sweep runs on a real two-node Ray cluster with a
real MLflow server, surviving the loss of a node (tests/multinode_driver.py runs the cluster)."""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from sweep_helpers import TINY_SPACE

from kdray.tracking.store import find_sweep, sweep_children

HELPERS = Path(__file__).resolve().parents[1] / "helpers"  # the drivers run as scripts

REPO = Path(__file__).resolve().parents[2]
EPOCHS, SAMPLES = 40, 4


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before touching the cloud
    # The head's `ray start` line is one Ray's own CLI accepts (parsed, not run).
    from ray.scripts.scripts import start

    line = next(c for c in cfg["head_start_ray_commands"] if c.strip().startswith("ray start"))
    args = shlex.split(line.replace("$(hostname -I | awk '{print $1}')", "10.0.0.1"))[2:]
    params = start.make_context("start", args).params
    assert params["head"] and params["num_cpus"] == 0  # the driver-only head the sweep must cope with
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_config"):
        validate_config(prepare_config(broken))


def test_what_a_ray_up_cluster_can_grow_to_is_read_from_its_config(tmp_path):
    from kdray.ray_setup import max_resources_of_cluster_yaml

    # cluster.yaml: a 0-CPU head with 64 driver slots, and up to 12 workers of 8 CPUs + 1 GPU
    assert max_resources_of_cluster_yaml(str(REPO / "cluster.yaml")) == {"CPU": 96.0, "GPU": 12.0, "kdray_driver": 64.0}
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"] = {}  # left to detection: unknown until a node exists
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert max_resources_of_cluster_yaml(str(tmp_path / "c.yaml")) is None
    assert max_resources_of_cluster_yaml(str(tmp_path / "missing.yaml")) is None


def test_the_kuberay_job_runs_a_command_kdray_accepts():
    from kdray.cli import build_parser

    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "kdray"
    args = build_parser().parse_args(words[1:])  # exits on a flag kdray does not have
    assert args.command == "sweep" and args.address == "auto"
    assert (REPO / args.space).is_file()  # the space it names ships with kdray


def test_no_credentials_in_the_repository():
    # Built from pieces so that this file does not match itself.
    secret = re.compile("(" + "AKIA" + "[0-9A-Z]{16}|aws_secret_" + "access_key|BEGIN (RSA|OPENSSH) " + "PRIVATE KEY)")
    files = [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
             and p.suffix in {".py", ".yaml", ".yml", ".md", ".toml", ".cfg", ".txt", ""}]
    assert not [str(p) for p in files if secret.search(p.read_text(errors="ignore"))]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path):
    import torch

    from kdray.models import load_record

    marker, bad = tmp_path / "ran", tmp_path / "bad.pt"
    torch.save({"format": "kdray.model/1", "state_dict": {}, "hook": _Payload(marker)}, bad)
    with pytest.raises(Exception):
        load_record(bad)
    assert not marker.exists()


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space.update(num_samples=SAMPLES, searcher={"type": "tpe", "n_startup_trials": 4})
    space["base"]["train"]["epochs"] = EPOCHS
    # Small batches: a trial must still be training when the kill comes (MLflow, which the driver polls
    # to choose its moment, is written asynchronously and lags a fast trial by its last few epochs).
    space["base"]["train"]["batch_size"] = 4
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    r = subprocess.run([sys.executable, str(HELPERS / "multinode_driver.py"), str(tmp / "summary.json"),
                        str(path), "kill"], capture_output=True, text=True, timeout=480)
    assert (tmp / "summary.json").exists(), r.stdout[-3000:] + r.stderr[-5000:]
    summary = json.loads((tmp / "summary.json").read_text())
    assert r.returncode == 0, r.stderr[-5000:]
    return tmp, summary


def children(tmp, summary):
    db = MlflowClient(f"sqlite:///{tmp / 'server.db'}")  # the server's own store, read after it stopped
    return db, sweep_children(db, find_sweep(db, "multinode"), kind="trial")


def test_trials_ran_on_both_nodes_and_everything_is_readable_from_the_driver(multinode):
    tmp, summary = multinode
    db, runs = children(tmp, summary)
    nodes = {r.data.tags.get("kdray.node_id") for r in runs}
    assert {summary["head_node"], summary["worker_node"]} <= nodes
    assert summary["checkpoints_readable"] == SAMPLES
    champ = summary["champion"]
    assert champ is not None
    version = db.get_model_version_by_alias("kdray-tiny", "champion")
    assert version.run_id == champ["run_id"] and (tmp / "artifacts").is_dir()  # stored through the server


def test_a_lost_node_is_survived_with_every_trial_exactly_once(multinode):
    tmp, summary = multinode
    assert summary["killed"] is not None, summary
    db, runs = children(tmp, summary)
    ids = [r.data.tags["kdray.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == SAMPLES
    assert all(r.info.status == "FINISHED" and r.data.tags["kdray.status"] == "completed" for r in runs)
    killed = next(r for r in runs if r.data.tags["kdray.trial_id"] == summary["killed"]["trial_id"])
    assert killed.data.tags["kdray.retries"] == "1"
    resumed = db.get_metric_history(killed.info.run_id, "resumed_from_epoch")
    assert resumed and resumed[0].value >= 1  # restarted from a checkpoint, not from scratch
    steps = sorted(m.step for m in db.get_metric_history(killed.info.run_id, "val_accuracy"))
    assert steps == list(range(1, EPOCHS + 1))
