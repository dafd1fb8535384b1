"""Starting or joining Ray the way kdray needs it.

* Reporting latency: Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
  (2 s by default), and every ``ray.train.report`` waited about that long here (FIELD-NOTES). kdray
  sets 0.1 s for its jobs, locally through the environment the cluster inherits and on an existing
  cluster through the job's runtime environment.
* A sweep trial that drives a TorchTrainer needs no CPU of its own, but Tune will not schedule a
  trial on zero resources. kdray gives such trials a custom resource, ``kdray_driver``, that a local
  Ray declares and that ``cluster.yaml`` declares on the head node, so trials never compete with
  their own workers for CPUs (the deadlock in FIELD-NOTES).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

DRIVER_RESOURCE = "kdray_driver"
FAST_REPORTING_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # Tune writes its experiment state at most this often; short, so an interrupted sweep loses little.
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
}
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "0",
    # Per-epoch checkpoints with num_to_keep force frequent state snapshots; cheap here, so no warning.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "1",
    # Train re-routes print() through its logger, which echoed every progress line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def job_env() -> dict[str, str]:
    env = dict(FAST_REPORTING_ENV)
    env.update(QUIET_ENV)
    for key in list(env):
        if key in os.environ:  # a user's own setting wins
            env[key] = os.environ[key]
    return env


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    driver_slots: int = 64,
    log_to_driver: bool = True,
) -> dict[str, float]:
    """Start a local Ray (``address=None``) or join one (``"auto"``, ``"ray://..."``, ``host:port``).

    Returns the cluster's total resources. Idempotent: an already initialised Ray is reused.
    """
    import ray

    env = job_env()
    os.environ.update(env)  # inherited by a local cluster's raylet and so by every worker and actor
    from kdray import plugins

    if ray.is_initialized() and plugins.local_sources() and plugins.ENV not in os.environ:
        logging.getLogger("kdray").warning(
            "Ray was started before kdray imported the plugins %s: workers on other nodes will not find them. "
            "Pass kdray.plugins.runtime_env() to your ray.init(runtime_env=...)", plugins.imported())
    if not ray.is_initialized():

        # Plugins imported here (config, --plugin, entry points) are imported by every worker process as it
        # starts, and shipped to every node unless installed there (kdray.plugins).
        runtime_env = plugins.runtime_env()
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
        if plugins.imported():
            os.environ[plugins.ENV] = ",".join(plugins.imported())
        kwargs: dict[str, Any] = dict(
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        if address and on_loopback(address):  # a cluster of this machine on 127.0.0.1 (tests' Cluster nodes)
            with loopback_only():
                ray.init(address=address, _node_ip_address=LOOPBACK, **kwargs)
        elif address:
            ray.init(address=address, **kwargs)
        else:
            # The dashboard stays on: Ray Train's placement-group cleaner needs its State API to free the
            # workers of an early-stopped trial (FIELD-NOTES).
            # address="local": a new Ray of its own, never a cluster some `ray start` left on this machine
            with loopback_only(), quiet_logger(AUTH_LOGGER):
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                         resources={DRIVER_RESOURCE: driver_slots}, _node_ip_address=LOOPBACK,
                         dashboard_host=LOOPBACK, **kwargs)
    return cluster_resources()


LOOPBACK = "127.0.0.1"
# A new local Ray turns token authentication on and says so in a warning on every run; kdray wants it on
# (and documents it), so on a local Ray the notice is noise. On a cluster (--address) it stays.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Warnings of logger ``name`` are not shown while inside (errors are)."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def on_loopback(address: str) -> bool:
    """Is ``address`` (``host:port``, ``ray://host:port`` or ``auto``) a Ray cluster listening on 127.0.0.1?"""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # noqa: BLE001 - no cluster to find: ray.init says so
            return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in (LOOPBACK, "localhost")


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """A local Ray whose every service listens on 127.0.0.1 only (defence in depth: its token authentication,
    on by default for a local cluster, stays on). Ray binds its gRPC servers to all interfaces unless the node's
    address is exactly 127.0.0.1, and on Linux ``ray.init`` rewrites 127.0.0.1 to the machine's routable address
    while ``ENABLE_RAY_CLUSTER`` holds (``ray/_private/services.py: resolve_ip_for_localhost``). A single-machine
    Ray needs no routable address, so the rewrite is off while it starts; processes that join it later read the
    node's address from the cluster itself."""
    import ray._private.ray_constants as constants

    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def autoscaler_max_resources() -> dict[str, float] | None:
    """What the cluster can grow to: the autoscaler's node types x their max workers, as the autoscaler
    publishes them in Ray's GCS (the API Ray Train itself reads before it waits for workers). ``None`` when
    no autoscaler has published a config (a static cluster, or one started by hand)."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - older Ray or no GCS access: treat as unknown
        most = None
    most = most or max_resources_of_cluster_yaml(os.path.expanduser(BOOTSTRAP_CONFIG))
    if not most:
        return None
    now = cluster_resources()  # a node outside the autoscaler's groups (the head) counts as well
    return {k: max(float(v), now.get(k, 0.0)) for k, v in {**now, **most}.items()}


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config on the head


def max_resources_of_cluster_yaml(path: str) -> dict[str, float] | None:
    """The most a ``ray up`` cluster config can offer: each worker type's ``resources`` x ``max_workers``
    (the head once). ``None`` if there is no such file or a worker type leaves its resources to detection."""
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError:
        return None
    total: dict[str, float] = {}
    for name, node in (cfg.get("available_node_types") or {}).items():
        count = 1 if name == cfg.get("head_node_type") else int(node.get("max_workers", 0))
        if count and not node.get("resources"):
            return None  # detected at start: unknown until such a node exists
        for key, value in (node.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + float(value) * count
    return total or None


def trials_that_fit(res: dict[str, float], resources: Any) -> int:
    """How many runs of ``resources`` (a ResourcesConfig) fit in ``res`` at once; 0 if not one."""
    import math

    r = resources
    fits = [math.floor(res.get("CPU", 0) / (r.num_workers * r.cpus_per_worker) + 1e-9)]
    if r.use_gpu:
        fits.append(math.floor(res.get("GPU", 0) / (r.num_workers * r.gpus_per_worker) + 1e-9))
    return min(fits)


def has_driver_resource() -> bool:
    return cluster_resources().get(DRIVER_RESOURCE, 0) > 0


def quiet_ray_loggers() -> None:
    """Lower Ray Train/Tune's per-report INFO logs ("Reporting training result", "Checkpoint successfully
    created") in a worker or trial process. Some of those loggers are named by file path
    (``getLogger(__file__)``), so names are matched by package as well as by path."""
    for name in ["ray.train", "ray.tune", *list(logging.root.manager.loggerDict)]:
        if (name in ("ray.train", "ray.tune") or name.startswith(("ray.train.", "ray.tune."))
                or "/ray/train/" in name or "/ray/tune/" in name):
            logging.getLogger(name).setLevel(logging.WARNING)


def resolve_ref(obj: Any) -> Any:
    """Values handed to workers may be Ray object references (shared through the object store)."""
    try:
        import ray

        if isinstance(obj, ray.ObjectRef):
            return ray.get(obj)
    except ImportError:  # pragma: no cover
        pass
    return obj
