"""MLflow plumbing shared by the sweep, ``best``, ``compare`` and ``final``.

Layout in MLflow: one experiment per search space; one parent run per sweep (tag ``kdray.kind=sweep``,
``kdray.sweep=<name>``); one child run per trial (tag ``mlflow.parentRunId``, ``kdray.trial_id``);
``kdray final`` adds a child run tagged ``kdray.kind=final``.
"""
from __future__ import annotations

import functools
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

TAG_KIND = "kdray.kind"
TAG_SWEEP = "kdray.sweep"
TAG_TRIAL = "kdray.trial_id"
TAG_STATUS = "kdray.status"  # completed | stopped_early | failed | error | retrying | running
TAG_KNOWLEDGE = "kdray.knowledge"
TAG_PARENT = "mlflow.parentRunId"


class TrackingUnavailable(RuntimeError):
    """The tracking URI cannot be used; raised before any trial runs."""


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

    return MlflowClient(tracking_uri=uri)


def find_sweep(c, sweep: str | None = None, experiment: str | None = None):
    """The parent run of sweep ``sweep`` (or of the most recent sweep); ``None`` if there is none."""
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    if not ids:
        return None
    flt = f"tags.`{TAG_KIND}` = 'sweep'" + (f" and tags.`{TAG_SWEEP}` = '{sweep}'" if sweep else "")
    runs = c.search_runs(ids, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def sweep_children(c, parent, kind: str | None = None) -> list:
    """Every child run of a sweep's parent run (trials, and ``final`` runs when ``kind='final'``)."""
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
    return runs
