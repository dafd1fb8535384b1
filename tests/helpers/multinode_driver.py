"""A sweep on a real two-node Ray cluster with a real MLflow server, losing a node mid-sweep.

Run by tests/e2e/test_multinode.py in its own process (a Ray cluster cannot share a process with the test
session's Ray). Set-up, all on this machine: ``ray.cluster_utils.Cluster`` with a head node and one
worker node of 1 CPU each (so two concurrent trials must land on different nodes), and an
``mlflow server`` process on 127.0.0.1 as the tracking URI (every MLflow write goes over http). Once a
trial on the worker node has reported 3 epochs, that node is killed (its raylet and workers die at
once); Tune retries the trial from its last checkpoint, and a fresh node joins so the sweep can finish.
Writes a JSON summary for the test to check.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# Every service of the test cluster listens on loopback, with Ray's token authentication on (a Cluster does not turn
# it on by itself; a local ray.init would).
LOOPBACK = {"node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}


def secure_test_cluster() -> None:
    """Token authentication for the Cluster this process starts and for every process it starts (inherited)."""
    import secrets

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    if "ray" in sys.modules:  # Ray reads its authentication settings once: read them again
        from ray._private.authentication_test_utils import reset_auth_token_state

        reset_auth_token_state()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=open(tmp / "mlflow-server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.25)
    stop(proc)
    raise RuntimeError("mlflow server did not start: " + (tmp / "mlflow-server.log").read_text()[-2000:])


def main(out: Path, space_path: Path, kill: bool) -> None:
    tmp = out.parent
    mlflow_proc, uri = start_mlflow(tmp)
    from ray.cluster_utils import Cluster

    secure_test_cluster()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "resources": {"kdray_driver": 8}, **LOOPBACK})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    summary: dict = {"head_node": cluster.head_node.node_id, "worker_node": worker.node_id, "tracking_uri": uri,
                     "killed": None}
    try:
        from mlflow import MlflowClient

        from kdray.sweep.runner import SweepRequest, run_sweep
        from kdray.sweep.space import load_space
        from kdray.tracking.store import find_sweep, sweep_children

        space = load_space(space_path)
        req = SweepRequest(space=space, space_path=str(space_path), space_yaml=space_path.read_text(),
                           name="multinode", storage=str(tmp / "runs"), tracking_uri=uri,
                           address=cluster.address, quiet=True)
        box: dict = {}

        def sweep() -> None:  # Tune runs from a worker thread (it then skips its signal handlers)
            try:
                box["result"] = run_sweep(req)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        thread = threading.Thread(target=sweep)
        thread.start()
        # The node is killed from the main thread: Cluster.remove_node installs signal handlers.
        c = MlflowClient(uri)
        while kill and thread.is_alive() and summary["killed"] is None:
            time.sleep(0.3)
            try:
                parent = find_sweep(c, "multinode")
                runs = sweep_children(c, parent, kind="trial") if parent is not None else []
            except Exception as e:  # noqa: BLE001 - the server may be busy; keep polling
                summary.setdefault("poll_errors", []).append(repr(e)[:200])
                continue
            for run in runs:
                if run.data.tags.get("kdray.node_id") == worker.node_id and run.info.status == "RUNNING" and \
                        len(c.get_metric_history(run.info.run_id, "val_accuracy")) >= 3:
                    summary["killed"] = {"trial_id": run.data.tags["kdray.trial_id"], "at": time.time()}
                    cluster.remove_node(worker, allow_graceful=False)
                    time.sleep(2.0)
                    summary["replacement_node"] = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1").node_id
                    break
        thread.join()
        if "error" in box:
            raise box["error"]
        result = box["result"]
        from kdray.tracking.champion import read_checkpoint_record

        readable = 0
        for o in result.outcomes:  # every trial's checkpoint can be read from the driver
            if o.checkpoint and read_checkpoint_record(o.checkpoint)["state_dict"]:
                readable += 1
        summary.update(
            outcomes=[{"trial_id": o.trial_id, "status": o.status, "epochs": o.epochs} for o in result.outcomes],
            checkpoints_readable=readable,
            champion=result.champion.as_dict() if result.champion else None,
        )
    finally:
        out.write_text(json.dumps(summary, indent=2, default=str))
        import ray

        ray.shutdown()  # disconnect this driver before the cluster's nodes are stopped
        cluster.shutdown()
        stop(mlflow_proc)


def stop(proc: subprocess.Popen) -> None:
    """Stop the mlflow CLI and the uvicorn server it spawned (its own process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]), kill=sys.argv[3] == "kill")
