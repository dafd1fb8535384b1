"""MLflow plumbing shared by the sweep, ``best``, ``compare`` and ``final``.

Layout in MLflow: one experiment per search space; one parent run per sweep (tag ``kdray.kind=sweep``,
``kdray.sweep=<name>``); one child run per trial (tag ``mlflow.parentRunId``, ``kdray.trial_id``);
``kdray final`` adds a child run tagged ``kdray.kind=final``.
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kdray.errors import TrackingUnavailable
from kdray.goal import TAG_METRIC, Goal, goal_of

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

TAG_KIND = "kdray.kind"
TAG_SWEEP = "kdray.sweep"
TAG_TRIAL = "kdray.trial_id"
TAG_STATUS = "kdray.status"  # completed | stopped_early | failed | error | retrying | running
TAG_KNOWLEDGE = "kdray.knowledge"
TAG_PARENT = "mlflow.parentRunId"


def tracking_uri(explicit: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in this folder."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def probe(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, if MLflow at ``uri`` cannot be reached or used.

    http(s): the server's ``/health`` endpoint must answer within ``timeout`` seconds (MLflow's own
    client would retry for minutes). sqlite: the folder must exist and be writable. The plain
    ``./mlruns`` file store is refused by MLflow 3.17, so it is refused here first.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - the user's own server
                if r.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({reason}). Start it (mlflow server ...) or "
                f"pass another --tracking-uri (e.g. sqlite:///mlflow.db)"
            ) from None
        return
    if uri.startswith("sqlite:///"):
        folder = _sqlite_file(uri).parent
        if not folder.is_dir():
            raise TrackingUnavailable(f"the folder of the MLflow database {uri} does not exist: {folder}")
        if not os.access(folder, os.W_OK):
            raise TrackingUnavailable(f"the folder of the MLflow database {uri} is not writable: {folder}")
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingUnavailable(
            f"{uri!r} is a file store, which MLflow 3.17 no longer accepts; use sqlite:///mlflow.db locally "
            "or an http:// tracking server"
        )


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the kdray code that ran (``+dirty`` with local changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_params(resolved: dict[str, Any]) -> dict[str, str]:
    """MLflow params of a run: the resolved config flattened, knowledge keyed by type (``kd.temperature``)
    so every trial of a sweep uses the same names and the MLflow UI can compare them."""
    cfg = dict(resolved)
    knowledge = cfg.pop("knowledge", []) or []
    flat = flatten(cfg)
    flat["knowledge"] = "+".join(k["type"] for k in knowledge) or "none"
    for k in knowledge:
        for p, v in k.items():
            if p != "type":
                flat[f"{k['type']}.{p}"] = v
    return {k: _param(v) for k, v in flat.items()}


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database, not in the current folder.

    MLflow's default for a SQLite backend is ``./mlruns`` of whichever folder the process runs in, which
    scatters a sweep's plots and models over the user's working folders; a tracking server chooses its own.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (_sqlite_file(uri).parent / "mlartifacts").as_uri()


def _sqlite_file(uri: str) -> Path:
    """The absolute path of the database file of a ``sqlite:///`` URI (relative paths: to this folder)."""
    path = Path(uri[len("sqlite:///"):])
    return path if path.is_absolute() else Path.cwd() / path


def _param(v: Any) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _SCHEMA_READY:
        _create_schema_once(uri)
    return MlflowClient(tracking_uri=uri)


_SCHEMA_READY: set[str] = set()
_SCHEMA_LOCK = threading.Lock()


def _create_schema_once(uri: str) -> None:
    """Create (or migrate) a SQLite store's schema one process at a time.

    MLflow creates the schema of a new SQLite store on first use, with alembic migrations. Two sweeps
    starting together on a fresh file ran them at the same time and left the database half-migrated for
    good ("table _alembic_tmp_tags already exists" on every later call; measured with two concurrent
    ``kdray sweep``). So the first use in each process holds an exclusive lock file (in the system's temp
    folder, named after the database) while MLflow opens the tracking and registry stores (a client
    opens its store when it is made).
    """
    import hashlib
    import tempfile

    from mlflow import MlflowClient

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        fcntl = None
    db = _sqlite_file(uri)
    with _SCHEMA_LOCK:
        if uri in _SCHEMA_READY:
            return
        if not db.parent.is_dir():
            return  # probe() explains; MLflow's own error follows
        name = hashlib.sha1(str(db.resolve()).encode()).hexdigest()[:16]
        with open(Path(tempfile.gettempdir()) / f"kdray-mlflow-schema-{name}.lock", "a") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            # MLflow announces the creation and each migration of a store at INFO level, on every new store
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
            try:
                c = MlflowClient(tracking_uri=uri)  # opens the store: creates the tables, default experiment
                c.search_experiments(max_results=1)
                c.search_registered_models(max_results=1)  # the registry's store checks them too
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)
        _SCHEMA_READY.add(uri)


def find_sweep(c, sweep: str | None = None, experiment: str | None = None):
    """The parent run of sweep ``sweep``, or of the newest *finished* sweep; ``None`` if there is none.

    Without a name only a sweep that ended with its champion chosen (tag ``kdray.status=completed``, run
    status FINISHED) qualifies: ``best`` / ``final`` / ``compare`` must not pick a sweep that another
    process is still running on the same store, nor one that was interrupted. By name, any sweep.
    """
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    if not ids:
        return None
    flt = f"tags.`{TAG_KIND}` = 'sweep'" + (
        f" and tags.`{TAG_SWEEP}` = '{sweep}'" if sweep
        else f" and tags.`{TAG_STATUS}` = 'completed' and attributes.status = 'FINISHED'")
    runs = c.search_runs(ids, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


TAG_ORPHANED = "kdray.orphaned"


def sweep_goal(parent: Any) -> Goal:
    """What a sweep selected on, as its MLflow run recorded it (older sweeps: validation accuracy)."""
    return goal_of(parent.data.tags.get(TAG_METRIC) or parent.data.params.get("space.metric"))


def sweep_children(c, parent, kind: str | None = None) -> list:
    """Every child run of a sweep's parent run (trials, and ``final`` runs when ``kind='final'``); with
    ``kind='trial'`` not the orphaned ones, which ``final``, ``best`` and ``compare`` must not count."""
    flt = f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'"
    runs, token = [], None
    while True:
        page = c.search_runs([parent.info.experiment_id], filter_string=flt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if kind:
        runs = [r for r in runs if r.data.tags.get(TAG_KIND) == kind]
    if kind == "trial":  # a run a restored sweep no longer knows (finished after its last saved state) is no trial
        runs = [r for r in runs if not r.data.tags.get(TAG_ORPHANED)]
    return runs


# -- transient failures of the store ---------------------------------------------------------------------
# MLflow error codes that no retry can fix (the request itself is wrong); everything else a store can
# answer (5xx, TEMPORARILY_UNAVAILABLE for SQLite's "database is locked", connection refused) may pass.
_PERMANENT_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST",
    "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND", "MALFORMED_REQUEST", "FEATURE_DISABLED",
})
_TRANSIENT_WORDS = ("database is locked", "timed out", "connection refused", "connection reset", "connection aborted",
                    "max retries exceeded", "temporarily unavailable", "too many requests")


def transient(e: BaseException) -> bool:
    """True if ``e`` from an MLflow call may pass when the call is repeated later (store down or busy)."""
    text = str(e).lower()
    code = getattr(e, "error_code", None)
    if code is not None:  # an MlflowException: 5xx, TEMPORARILY_UNAVAILABLE, connection failures pass later
        return code not in _PERMANENT_CODES or "database is locked" in text
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    mod = type(e).__module__
    # requests / urllib3 network errors; sqlalchemy's OperationalError (locked, disk I/O)
    return (mod.startswith(("requests", "urllib3", "http.client")) or type(e).__name__ == "OperationalError"
            or any(w in text for w in _TRANSIENT_WORDS))


def already_exists(e: BaseException) -> bool:
    """An MLflow error saying the thing to create exists (two sweeps creating one experiment at once)."""
    text = str(e).lower()
    return getattr(e, "error_code", None) == "RESOURCE_ALREADY_EXISTS" or "already exists" in text or \
        "unique constraint" in text


def retrying(fn, *args, what: str = "an MLflow call", timeout_s: float = 120.0, say=None, **kwargs):
    """``fn(*args, **kwargs)``, repeated with exponential backoff (0.5 s doubling to 15 s) while it fails
    with a transient error, for at most ``timeout_s``; then (or at once for a permanent error) it raises."""
    delay, deadline, told = 0.5, time.monotonic() + timeout_s, False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            if say is not None and not told:
                say(f"{what} failed ({first_line(e)}); retrying for up to {timeout_s:.0f} s")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def metric_key(name: str) -> str:
    """``name`` as part of an MLflow metric key, which takes letters, digits, '_', '-', '.', ' ' and '/' only:
    ``kd+sp`` -> ``kd_sp``."""
    import re

    return re.sub(r"[^\w\-. /]", "_", name)


def log_metrics(c, run_id: str, metrics: dict[str, float]) -> None:
    """The finite values of ``metrics`` on ``run_id`` in one ``log_batch`` call (MLflow takes 1000 per call)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and
             float(v) == float(v) and abs(float(v)) != float("inf")]
    for i in range(0, len(batch), 1000):
        retrying(c.log_batch, run_id, metrics=batch[i:i + 1000], what="logging metrics")
