"""A sweep on a cluster shaped as users launch one: a head with 0 CPUs (it only hosts the sweep driver),
no worker at start, workers joining 3 s after the sweep says it waits for them, and storage that is not a
local path (an S3-compatible server on 127.0.0.1). The sweep trains its teacher, so the teacher too must
land in the bucket.

Run by tests/e2e/test_cluster_launch.py in its own process (``ray.cluster_utils.Cluster`` starts real raylets on
this machine; the sweep is ``kdray sweep --address ...`` in a subprocess, as a user starts it). Writes a
JSON summary for the test to check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from multinode_driver import LOOPBACK, free_port, secure_test_cluster  # tests/ is this script's folder

BUCKET = "kdray-test"
JOIN_AFTER_S = 20.0
WAIT_AFTER_MESSAGE_S = 3.0


def start_s3(tmp: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on loopback, with one bucket."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(tmp / "s3.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(120):
        try:
            s3.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.25)
    raise RuntimeError("the S3 server did not start: " + (tmp / "s3.log").read_text()[-2000:])


def bucket_keys(endpoint: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys, token = [], None
    while True:
        page = s3.list_objects_v2(Bucket=BUCKET, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def main(out: Path, space_path: Path) -> None:
    tmp = out.parent
    # Credentials for the loopback server only; raylets (and so every worker) inherit them.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    s3_proc, endpoint = start_s3(tmp)
    from ray.cluster_utils import Cluster

    secure_test_cluster()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "resources": {"kdray_driver": 8}, **LOOPBACK})
    port = endpoint.rsplit(":", 1)[1]
    storage = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [sys.executable, "-u", "-m", "kdray", "sweep", str(space_path), "--address", cluster.address,
           "--storage", storage, "--tracking-uri", uri, "--name", "launch"]
    summary: dict = {"head_node": cluster.head_node.node_id, "storage": storage}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=open(tmp / "sweep.log", "w"), stderr=subprocess.STDOUT, env=env)
        waiting_since = None  # workers join a few seconds after the sweep says it waits for them (at most 20 s in)
        while time.time() - t0 < JOIN_AFTER_S:
            if proc.poll() is not None:  # it refused to start: nothing to wait for
                break
            if waiting_since is None and "waiting for workers" in (tmp / "sweep.log").read_text():
                waiting_since = time.time()
            if waiting_since is not None and time.time() - waiting_since > WAIT_AFTER_MESSAGE_S:
                break
            time.sleep(0.5)
        summary["alive_before_workers"] = proc.poll() is None
        summary["workers"] = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1").node_id for _ in range(2)]
        summary["workers_joined_after_s"] = time.time() - t0
        summary["returncode"] = proc.wait(timeout=420)
        summary["keys_after_sweep"] = bucket_keys(endpoint)
        # --resume of the finished sweep reads its state from the bucket and ends as finished.
        resume = subprocess.run(cmd + ["--resume"], cwd=tmp, capture_output=True, text=True, env=env, timeout=300)
        (tmp / "resume.log").write_text(resume.stdout + resume.stderr)
        summary["resume_returncode"] = resume.returncode
    finally:
        out.write_text(json.dumps(summary, indent=2, default=str))
        cluster.shutdown()
        s3_proc.terminate()
        s3_proc.wait(timeout=20)


def publish_autoscaler_config(address: str, cpu_nodes: int) -> None:
    """Put in the cluster's GCS what an autoscaler publishes there (Ray's autoscaler state: node groups and
    their max counts): here one group of 1-CPU workers, 0..``cpu_nodes``."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    from kdray.ray_setup import LOOPBACK as HOST
    from kdray.ray_setup import loopback_only

    with loopback_only():  # the test cluster listens on 127.0.0.1 only
        ray.init(address=address, _node_ip_address=HOST)
    cfg = autoscaler_pb2.ClusterConfig(node_group_configs=[autoscaler_pb2.NodeGroupConfig(
        name="cpu_worker", resources={"CPU": 1}, min_count=0, max_count=cpu_nodes)])
    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, cfg.SerializeToString(),
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
    ray.shutdown()


def ceiling(out: Path, fits: Path, too_big: Path) -> None:
    """Against an autoscaler that can grow to 2 CPUs: a sweep whose trial needs 3 is refused at once; one
    that fits sizes its concurrency from the maximum (not from the 0 CPUs present)."""
    tmp = out.parent
    from ray.cluster_utils import Cluster

    secure_test_cluster()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "resources": {"kdray_driver": 8}, **LOOPBACK})
    summary: dict = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        publish_autoscaler_config(cluster.address, cpu_nodes=2)

        def cmd(space: Path, name: str) -> list[str]:
            return [sys.executable, "-u", "-m", "kdray", "sweep", str(space), "--address", cluster.address,
                    "--storage", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--name", name]

        big = subprocess.run(cmd(too_big, "big"), cwd=tmp, capture_output=True, text=True, env=env, timeout=180)
        summary["too_big"] = {"returncode": big.returncode, "stderr": big.stderr[-3000:]}
        proc = subprocess.Popen(cmd(fits, "fits"), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        t0, lines = time.time(), []
        for line in proc.stdout:  # the plan is printed before anything waits for a worker
            lines.append(line)
            if " trials, " in line or time.time() - t0 > 120:
                break
        proc.kill()
        proc.wait(timeout=30)
        summary["fits"] = lines
    finally:
        out.write_text(json.dumps(summary, indent=2, default=str))
        cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "ceiling":
        ceiling(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
