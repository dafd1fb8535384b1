"""Nothing exposed: a local ``kdray sweep`` starts Ray services that listen on 127.0.0.1 only, with Ray's token
authentication still on (a GCS client with a wrong token is refused, the cluster's own token is accepted)."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import psutil
import yaml
from sweep_helpers import TINY_SPACE


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def listeners(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of ``pid`` and its descendants."""
    try:
        root = psutil.Process(pid)
        tree = {root.pid: root.name(), **{p.pid: p.name() for p in root.children(recursive=True)}}
    except psutil.NoSuchProcess:
        return []
    return [(tree[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in tree]


def gcs_accepts(port: int, token: str | None) -> bool:
    """Does the sweep's GCS answer a client holding ``token`` (None: the machine's own ~/.ray/auth_token)?"""
    code = (f"from ray._raylet import GcsClient\n"
            f"try:\n    GcsClient(address='127.0.0.1:{port}').internal_kv_keys(b'', namespace=None, timeout=10)\n"
            f"    print('ACCEPTED')\nexcept Exception as e:\n    print('REFUSED', type(e).__name__, e)\n")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env.pop("RAY_AUTH_TOKEN", None)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "ACCEPTED" in r.stdout or "REFUSED" in r.stdout, r.stdout + r.stderr[-2000:]
    return "ACCEPTED" in r.stdout


def test_a_local_sweep_listens_on_loopback_only_with_token_authentication_on(tmp_path):
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["base"]["train"]["epochs"] = 20  # long enough to look while trials run
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cmd = [sys.executable, "-u", "-m", "kdray", "sweep", str(tmp_path / "space.yaml"), "--name", "exposed",
           "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen: set[tuple[str, str, int]] = set()
    log = []
    try:
        for line in proc.stdout:
            log.append(line)
            if "started:" in line:  # trials (and their worker processes) are running: look now, and again
                for _ in range(3):
                    seen |= set(listeners(proc.pid))
                    time.sleep(1.0)
                break
        gcs = sorted(port for name, _, port in seen if name == "gcs_server")
        assert gcs, (seen, "".join(log[-20:]))
        assert not gcs_accepts(gcs[0], "not-the-token-0123456789abcdef")  # token authentication is on
        assert gcs_accepts(gcs[0], None)  # and the machine's own token is the one it takes
    finally:
        rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(log[-20:]) + rest[-3000:]
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in seen}, seen
    exposed = sorted(x for x in seen if not is_loopback(x[1]))
    assert exposed == [], exposed
