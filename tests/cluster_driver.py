"""A sweep on a cluster shaped as users launch one: a head with 0 CPUs (it only hosts the sweep driver),
no worker at start, workers joining 20 s later, and storage that is not a local path (an S3-compatible
server on 127.0.0.1). The sweep trains its teacher, so the teacher too must land in the bucket.

Run by tests/test_cluster_launch.py in its own process (``ray.cluster_utils.Cluster`` starts real raylets on
this machine; the sweep is ``kdray sweep --address ...`` in a subprocess, as a user starts it). Writes a
JSON summary for the test to check.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "kdray-test"
JOIN_AFTER_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"kdray_driver": 8}})
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
        while time.time() - t0 < JOIN_AFTER_S:
            if proc.poll() is not None:  # it refused to start: nothing to wait for
                break
            time.sleep(0.5)
        summary["alive_before_workers"] = proc.poll() is None
        summary["workers"] = [cluster.add_node(num_cpus=1).node_id for _ in range(2)]
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


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
