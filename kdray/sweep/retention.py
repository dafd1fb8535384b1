"""Checkpoint retention that a killed driver cannot break: delete a checkpoint only behind saved sweep state.

Ray Tune's own retention (``CheckpointConfig(num_to_keep=K)``) deletes the oldest checkpoint as soon as a new
one registers, while Tune uploads its experiment state (what ``--resume`` restores from) only later, in a
background thread that it skips while an earlier upload is in flight (``tune/execution/experiment_state.py``).
A driver killed in between leaves a saved state naming a deleted checkpoint, and the trial can never be
restored ("Could not recover from checkpoint as it does not exist on storage anymore"). So Tune keeps every
checkpoint (``num_to_keep=None``) and :class:`CheckpointPruner`, a callback in the driver, deletes one only
when the experiment state *on storage* restores that trial from a newer checkpoint.

Trials that drive a ``TorchTrainer`` report no Tune checkpoint: Ray Train V2 keeps theirs, and it writes its
own snapshot before it deletes (``train/v2/.../checkpoint_manager.py``), so they need nothing here.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from typing import Any

from ray.tune import Callback

CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{6})$")
STATE_FILES = "experiment_state-*.json"  # Tune's TuneController.CKPT_FILE_TMPL
PRUNE_EVERY_S = 2.0
# Test fault injection (never set in normal use): SIGKILL-like exit of the driver right after a trial's checkpoint
# registers while the state on storage restores that trial from a checkpoint this many epochs older.
FAULT_ENV = "KDRAY_TEST_KILL_WHEN_STATE_LAGS"
PACE_S = 0.3  # with the fault set: the driver's pause after each registered checkpoint


def checkpoint_index(path: str | None) -> int | None:
    m = CHECKPOINT_DIR.search(str(path or "").rstrip("/"))
    return int(m.group(1)) if m else None


def stored_state(fs: Any, experiment_path: str) -> dict | None:
    """The newest ``experiment_state-*.json`` on storage (what ``--resume`` restores), chosen by name as Tune's own
    restore does; None when there is none yet or it cannot be read now (an upload in progress)."""
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(experiment_path, allow_not_found=True))
        names = [i.base_name for i in infos if fnmatch.fnmatch(i.base_name, STATE_FILES)]
        if not names:
            return None
        with fs.open_input_stream(f"{experiment_path}/{max(names)}") as f:
            return json.loads(f.readall())
    except (OSError, ValueError):  # mid-upload
        return None


def stored_latest(fs: Any, experiment_path: str) -> dict[str, int | None] | None:
    """For each trial of the experiment state on storage: the index of the checkpoint it restores from.

    None when there is no state yet or it cannot be read now: callers try again later. The file is the sweep's own
    (trusted) state; its checkpoint manager is a cloudpickle blob, which Tune reads the same way."""
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    state = stored_state(fs, experiment_path)
    if state is None:
        return None
    try:
        out: dict[str, int | None] = {}
        for trial_json, meta_json in state["trial_data"]:
            trial_id = json.loads(trial_json)["trial_id"]
            manager = _loads_with_cloudpickle(meta_json).get("checkpoint_manager")
            latest = getattr(manager, "latest_checkpoint_result", None)
            out[trial_id] = checkpoint_index(latest.checkpoint.path) if latest is not None else None
        return out
    except (ValueError, KeyError, TypeError, EOFError):  # a layout this code does not know
        return None


def checkpoint_dirs(fs: Any, trial_path: str) -> list[int]:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
    return sorted(i for i in (checkpoint_index(x.base_name) for x in infos
                              if x.type == pyarrow.fs.FileType.Directory) if i is not None)


class CheckpointPruner(Callback):
    """Keep each trial's newest ``keep`` checkpoints, deleting older ones only once the experiment state on storage
    restores the trial from a newer one (``keep=None``: keep all)."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.keep and time.monotonic() - self._last >= PRUNE_EVERY_S:
            self._last = time.monotonic()
            self.prune(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.keep:  # Tune has saved its final state (waited) before this call
            self.prune(trials)

    def prune(self, trials: list) -> int:
        """Delete what the stored state no longer needs; returns how many checkpoints went."""
        if not trials:
            return 0
        st = trials[0].storage
        fs = st.storage_filesystem
        restores_from = stored_latest(fs, st.experiment_fs_path)
        if not restores_from:
            return 0
        gone = 0
        for trial in trials:
            needed = restores_from.get(trial.trial_id)
            if needed is None:
                continue
            try:
                present = checkpoint_dirs(fs, trial.path)
            except OSError:
                continue
            deleted = set()
            for i in present[:-self.keep]:
                if i < needed:
                    try:
                        fs.delete_dir(f"{trial.path}/checkpoint_{i:06d}")
                    except OSError:
                        continue
                    deleted.add(i)
            if deleted:
                gone += len(deleted)
                _forget(trial, deleted)
        return gone


def _forget(trial: Any, deleted: set[int]) -> None:
    """Drop deleted checkpoints from Tune's in-memory list of them, so its saved state stays small (with
    ``num_to_keep=None`` it would otherwise list every epoch's checkpoint). Best effort: a private list."""
    manager = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
    results = getattr(manager, "_checkpoint_results", None)
    if results is None:
        return
    manager._checkpoint_results = [r for r in results if checkpoint_index(r.checkpoint.path) not in deleted]
    invalidate = getattr(trial.run_metadata, "invalidate_cache", None)
    if invalidate:
        invalidate()


class KillWhenStateLags(Callback):
    """Fault injection for tests: end the driver at once (as a SIGKILL would) when a trial's newly registered
    checkpoint is ``lag`` or more epochs ahead of the one the experiment state on storage restores it from: the
    window in which Tune's own retention had already deleted that one. Set ``KDRAY_TEST_KILL_WHEN_STATE_LAGS``."""

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        lag = os.environ.get(FAULT_ENV)  # read now: Tune restores this callback pickled into a resumed sweep
        if not lag:
            return
        now = checkpoint_index(getattr(trial.checkpoint, "path", None))
        st = trial.storage
        restores_from = (stored_latest(st.storage_filesystem, st.experiment_fs_path) or {}).get(trial.trial_id)
        if now is not None and restores_from is not None and now - restores_from >= int(lag):
            print(f"[kdray] test fault: killing the driver (checkpoint {now} registered, stored state restores "
                  f"from {restores_from})", flush=True)
            os._exit(77)
        # Pace the driver: a test trial's epochs take ~20 ms, so all its checkpoints could register between two
        # of Tune's state saves (TUNE_GLOBAL_CHECKPOINT_S=1) and the window would open only by chance (it did not,
        # once in a loaded CI run). At this pace saves interleave with checkpoints, and the window always opens.
        time.sleep(PACE_S)


def fault_callbacks() -> list[Callback]:
    return [KillWhenStateLags()] if os.environ.get(FAULT_ENV) else []
