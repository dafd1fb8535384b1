"""The one thread that writes a sweep's records to MLflow, in order, retrying until they are in.

The tracker's callbacks (:mod:`kdray.tracking.tracker`) never call MLflow themselves: they put records on this
ordered queue, so a slow or absent store neither holds up Tune's loop nor fails a trial. Per-epoch metrics are
coalesced per run into ``log_batch`` calls. A failing call is retried with exponential backoff (0.5 s doubling to
30 s) while the queue keeps growing in memory and training goes on; the first failure and the recovery are
announced on one line each. A record leaves the queue only once MLflow has it.
"""
from __future__ import annotations

import atexit
import itertools
import os
import sys
import threading
import time
import uuid

from kdray.tracking.store import TAG_PARENT, TAG_TRIAL, client, first_line, transient

BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0
BATCH_METRICS, BATCH_TAGS, BATCH_ENTITIES = 1000, 100, 1000  # MLflow's log_batch limits
ROUND_OPS = 5000  # records coalesced per round of the writer
PERMANENT_TRIES = 3  # a record MLflow refuses outright (4xx) is tried this often, then dropped loudly
EXIT_FLUSH_S = float(os.environ.get("KDRAY_MLFLOW_EXIT_FLUSH_S", "30"))

# MLflow's own HTTP client retries a failing call 7 times over ~4 minutes (a blocked callback took 62 s
# here during an 8-s server outage). kdray retries on its own, so one attempt must fail fast; a user's own
# setting of these variables wins.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

_WRITERS: dict[tuple[str, str], "Writer"] = {}
_WRITERS_LOCK = threading.Lock()
_OP_IDS = itertools.count()
_OP_PREFIX = uuid.uuid4().hex[:8]


def writer_for(uri: str, sweep: str, quiet: bool) -> "Writer":
    with _WRITERS_LOCK:
        w = _WRITERS.get((uri, sweep))
        if w is None:
            w = _WRITERS[(uri, sweep)] = Writer(uri, quiet)
            if len(_WRITERS) == 1:
                atexit.register(_flush_at_exit)
        return w


def _flush_at_exit() -> None:
    """Records still queued when the driver exits (an error escaped the sweep): a last chance to write
    them, then a clear word about what was not written (Tune's saved state still holds it)."""
    for w in list(_WRITERS.values()):
        if w.pending and not w.gave_up and not w.flush(EXIT_FLUSH_S):  # (gave_up: the sweep has said so)
            w.warn(f"exiting with {w.describe_pending()} not written to MLflow at {w.uri}; `kdray sweep ... "
                   "--resume --name NAME` writes them from Tune's saved state once the store is back")


def quick_http_retries() -> None:
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)


class Writer:
    """One thread that writes a sweep's queued records to MLflow, in order, retrying until they are in.

    Records (plain dicts, so Tune can pickle the queue with its experiment state):
    ``create`` a trial's child run (tags, params, resolved config); ``log`` metrics and tags, optionally
    ending the run (``terminate``). Each names its trial by Tune's trial id; the run id is resolved when
    the record is written, so a create record always goes before the records that use its run.
    """

    def __init__(self, uri: str, quiet: bool) -> None:
        self.uri, self.quiet = uri, quiet
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.runs: dict[str, str] = {}  # trial id -> child run id (written)
        self.known: set[str] = set()  # trial ids whose child run exists or is queued
        self.tagged: set[str] = set()  # trial ids whose node/teacher tags are queued
        self.last_step: dict[str, int] = {}  # trial id -> last epoch recorded (idempotent across resumes)
        self.pending: dict[str, dict] = {}  # op id -> record, in order; removed once MLflow has it
        self.cond = threading.Condition()
        self.ready = threading.Event()  # set once the parent run is known: nothing is written before
        self._tries: dict[str, int] = {}  # op id -> refusals (permanent errors) so far
        self._attempted: set[str] = set()  # create records sent at least once (the answer may have been lost)
        self._client = None
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._last_warned = 0.0
        self._written_since_down = 0
        self.dropped = 0
        self.gave_up = False  # a flush timed out (the sweep said so): no second wait at exit

    # -- producer side (Tune's loop thread) ------------------------------------------------------------
    def attach_parent(self, experiment_id: str | None, parent_id: str | None) -> None:
        self.experiment_id, self.parent_id = experiment_id, parent_id
        if parent_id:
            self.ready.set()
            self._start()

    def known_run(self, tid: str, rid: str, last_step: int) -> None:
        self.runs[tid] = rid
        self.known.add(tid)
        self.last_step[tid] = max(self.last_step.get(tid, 0), last_step)

    def put(self, op: dict) -> None:
        op["id"] = f"{_OP_PREFIX}-{next(_OP_IDS)}"
        if op["kind"] == "create":
            self.known.add(op["tid"])
        with self.cond:
            self.pending[op["id"]] = op
            self.cond.notify_all()
        self._start()

    def snapshot(self) -> list[dict]:
        with self.cond:
            return list(self.pending.values())

    def replay(self, ops: list[dict]) -> None:
        """Records a checkpoint of Tune held that MLflow may not have: queued ahead of anything new."""
        with self.cond:
            fresh = [op for op in ops if op.get("id") not in self.pending]
            if not fresh:
                return
            rest = self.pending
            self.pending = {op["id"]: dict(op, replayed=True) for op in fresh}
            self.pending.update(rest)
            self.cond.notify_all()
        for op in fresh:
            self.known.add(op["tid"])
            steps = [m[3] for m in op.get("metrics", ()) if m[0] == "val_accuracy"]
            if steps:
                self.last_step[op["tid"]] = max(self.last_step.get(op["tid"], 0), *steps)
            if op.get("tags", {}).keys() & {"kdray.node_ip", "kdray.teacher_source"}:
                self.tagged.add(op["tid"])
        self.warn(f"{len(fresh)} MLflow records saved with Tune's state of the earlier run are queued (again) "
                  "for writing")
        self._start()

    def flush(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        with self.cond:
            while self.pending:
                left = end - time.monotonic()
                if left <= 0:
                    self.gave_up = True
                    return False
                self.cond.wait(min(left, 1.0))
        self.gave_up = False
        return True

    def outage(self) -> int:
        """Records waiting while the store is down (0 when it is up)."""
        return len(self.pending) if self._down_since is not None else 0

    def describe_pending(self) -> str:
        ops = self.snapshot()
        trials = {op["tid"] for op in ops}
        metrics = sum(len(op.get("metrics", ())) for op in ops)
        return f"{len(ops)} records ({metrics} metric values) of {len(trials)} trial(s)"

    def warn(self, msg: str) -> None:
        print(f"[kdray] {msg}", file=sys.stderr if self.quiet else sys.stdout, flush=True)

    # -- the thread ---------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.ready.is_set() and (self._thread is None or not self._thread.is_alive()):
            with _WRITERS_LOCK:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="kdray-mlflow-writer", daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        quick_http_retries()
        delay = BACKOFF_START_S
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                ops = list(itertools.islice(self.pending.values(), ROUND_OPS))
            failed = False
            for group in _coalesce(ops):
                try:
                    self._write(group)
                except Exception as e:  # noqa: BLE001 - every failure is retried or reported
                    failed = True
                    if self._failed(group, e):
                        continue  # dropped: go on with the next record
                    time.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    break
                self._done(group)
            if not failed:
                delay = BACKOFF_START_S
                if self._down_since is not None:
                    self.warn(f"MLflow back: wrote {self._written_since_down} buffered records "
                              f"(unreachable for {time.time() - self._down_since:.0f} s)")
                    self._down_since = None

    def _done(self, group: dict) -> None:
        with self.cond:
            for op_id in group["ids"]:
                self.pending.pop(op_id, None)
                self._tries.pop(op_id, None)
                self._attempted.discard(op_id)
            self.cond.notify_all()
        if self._down_since is not None:
            self._written_since_down += len(group["ids"])

    def _failed(self, group: dict, e: Exception) -> bool:
        """Count a failed write; True if the record is dropped (MLflow refuses it, retrying cannot help)."""
        self._client = None  # a fresh connection next time
        if not transient(e):
            key = group["ids"][0]
            self._tries[key] = self._tries.get(key, 0) + 1
            if self._tries[key] >= PERMANENT_TRIES:
                self.dropped += len(group["ids"])
                self.warn(f"MLflow refused a record of trial {group['tid']} {PERMANENT_TRIES} times "
                          f"({first_line(e)}); it is dropped")
                self._done(group)
                return True
            return False
        now = time.time()
        if self._down_since is None:
            self._down_since, self._last_warned, self._written_since_down = now, now, 0
            self.warn(f"MLflow at {self.uri} unreachable ({first_line(e)}); buffering {len(self.pending)} records, "
                      "will retry")
        elif now - self._last_warned > 60:
            self._last_warned = now
            self.warn(f"MLflow at {self.uri} still unreachable after {now - self._down_since:.0f} s; "
                      f"buffering {len(self.pending)} records; training goes on")
        return False

    # -- MLflow calls ---------------------------------------------------------------------------------
    @property
    def c(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _run_id(self, group: dict) -> str:
        tid = group["tid"]
        rid = self.runs.get(tid)
        if rid is None:  # written by an earlier process (replayed records) or lost with a failed response
            rid = self._lookup(tid)
            if rid is None:
                raise _Missing(f"no MLflow run for trial {tid} under sweep run {self.parent_id}")
        return rid

    def _lookup(self, tid: str, parent: str | None = None) -> str | None:
        """The run of ``tid`` under ``parent`` (the sweep's run; a trial's run for a generation's)."""
        if parent is None and "/" in tid:  # a generation: nested in its trial's run
            parent = self._run_id({"tid": tid.split("/", 1)[0]})
        found = self.c.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`{TAG_PARENT}` = '{parent or self.parent_id}' and tags.`{TAG_TRIAL}` = '{tid}'"))
        if found:
            self.runs[tid] = found[0].info.run_id
            return found[0].info.run_id
        return None

    def _write(self, group: dict) -> None:
        if group["kind"] == "create":
            self._create(group)
        else:
            self._log(group)

    def _create(self, op: dict) -> None:
        tid, c = op["tid"], self.c
        rid = self.runs.get(tid)
        parent = self._run_id({"tid": op["parent_tid"]}) if op.get("parent_tid") else self.parent_id
        if rid is None and (op.get("replayed") or op.get("lookup_first") or op["id"] in self._attempted):
            rid = self._lookup(tid, parent)  # a create whose answer was lost must not make a second run
        if rid is None:
            self._attempted.add(op["id"])
            tags = dict(op["tags"], **{TAG_PARENT: parent})
            rid = c.create_run(op["experiment_id"] or self.experiment_id, tags=tags,
                               run_name=tags["mlflow.runName"]).info.run_id
            self.runs[tid] = rid
        log_params(c, rid, op["params"])
        c.log_dict(rid, op["resolved"], "resolved_config.json")  # the whole config, to rerun it exactly

    def _log(self, group: dict) -> None:
        from mlflow.entities import Metric, RunTag

        rid, c = self._run_id(group), self.c
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in group["metrics"]]
        tags = [RunTag(k, v) for k, v in group["tags"].items()]
        for m, t in _batches(metrics, tags):  # a batch re-sent after a lost answer adds nothing (same rows)
            c.log_batch(rid, metrics=m, tags=t)
        if group.get("terminate"):
            c.set_terminated(rid, group["terminate"], end_time=group.get("end_time"))


class _Missing(RuntimeError):
    """A record for a trial whose run is in no store: MLflow cannot take it (retried, then dropped)."""


def _coalesce(ops: list[dict]) -> list[dict]:
    """Merge consecutive-per-run ``log`` records into one group per run (one ``log_batch``), keeping each
    run's own order: a run's group closes at its ``create`` record and at a record that ends the run."""
    groups: list[dict] = []
    open_for: dict[str, dict] = {}
    for op in ops:
        tid = op["tid"]
        if op["kind"] != "log":
            groups.append(dict(op, ids=[op["id"]]))
            open_for.pop(tid, None)
            continue
        g = open_for.get(tid)
        if g is None:
            g = {"kind": "log", "tid": tid, "metrics": [], "tags": {}, "ids": []}
            groups.append(g)
            open_for[tid] = g
        g["metrics"].extend(op["metrics"])
        g["tags"].update(op["tags"])
        g["ids"].append(op["id"])
        if op.get("terminate"):
            g["terminate"], g["end_time"] = op["terminate"], op.get("end_time")
            open_for.pop(tid, None)
    return groups


def _batches(metrics: list, tags: list) -> list[tuple[list, list]]:
    """``log_batch`` calls within MLflow's limits: 1000 metrics, 100 tags, 1000 entities per call."""
    out = []
    while tags:
        t, tags = tags[:BATCH_TAGS], tags[BATCH_TAGS:]
        room = BATCH_ENTITIES - len(t)
        out.append((metrics[:room], t))
        metrics = metrics[room:]
    for i in range(0, len(metrics), BATCH_METRICS):
        out.append((metrics[i:i + BATCH_METRICS], []))
    return out


def log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k[:250], v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])
