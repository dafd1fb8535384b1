"""Born-again networks: the run is repeated for N generations, generation k+1 taught by generation k; and teacher
assistants (Mirzadeh, Farajtabar, Li, Levine, Matsukawa & Ghasemzadeh, "Improved Knowledge Distillation via Teacher
Assistant", AAAI 2020, arXiv:1902.03393): the same stages with another model each, ``scheme.chain`` then the student.

Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born Again Neural Networks", ICML 2018, arXiv:1805.04770.
Generation 1 is taught by the run's teacher; every later one by the final student of the generation before,
with the same student architecture, knowledge terms and schedule. What the run delivers is the last
generation's student (the paper also reports the ensemble of generations, which kdray does not build).

One run, one report stream: epoch e of generation g is reported as epoch ``(g-1)·E + e`` of ``N·E`` (with
``generation`` and ``generation_epoch``), so ASHA, the leaderboard and resuming see one long run. Every
checkpoint records its generation and, from generation 2 on, the record of the student that teaches it, so a
run resumed from any checkpoint continues with the right teacher.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kdray.models import load_record
from kdray.models.checkpoint import atomic_torch_save
from kdray.runfiles import PLANNED_EPOCHS, STATE_FILE, STUDENT_FILE
from kdray.train.session import Session

GEN_FILE = "generation.json"  # {"generation": g} in every checkpoint of a born-again run
TEACHER_FILE = "teacher.pt"  # the record that teaches that generation (generation >= 2)
GENERATION_SEED_STEP = 1_000_003


class GenerationSession(Session):
    """The run's session as seen by one generation: epochs shifted by the generations before it."""

    def __init__(self, inner: Session, generation: int, generations: int, epochs: int,
                 teacher: dict[str, Any] | None, restore: str | None, finished: dict[str, float]) -> None:
        # No Session.__init__: every attribute the loop reads is the inner session's (delegated below).
        self.inner, self.generation, self.generations, self.epochs = inner, generation, generations, epochs
        self.teacher, self.restore, self.finished = teacher, restore, finished
        self.final_record: dict[str, Any] | None = None
        self.last_report: dict[str, Any] = {}

    # -- topology: the inner session's ----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def local_rank(self) -> int:
        return self.inner.local_rank

    def device(self, use_gpu: bool) -> torch.device:
        return self.inner.device(use_gpu)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.inner.all_reduce_sum(t)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        self.inner.broadcast_buffers(module)

    @property
    def keep_checkpoints(self) -> int | None:
        return self.inner.keep_checkpoints

    @keep_checkpoints.setter
    def keep_checkpoints(self, value: int | None) -> None:
        self.inner.keep_checkpoints = value

    # -- reporting ------------------------------------------------------------------------------------
    def _shift(self, metrics: dict[str, Any]) -> dict[str, Any]:

        m = dict(metrics)
        e = int(m.get("epoch", 0))
        m.update(generation=self.generation, generation_epoch=e, generations=self.generations,
                 epoch=(self.generation - 1) * self.epochs + e)
        m[PLANNED_EPOCHS] = self.generations * self.epochs
        if e == self.epochs and not m.get("failed"):
            self.finished[f"val_accuracy_gen{self.generation}"] = float(m["val_accuracy"])
        m.update(self.finished)  # every finished generation's last validation accuracy, in every report
        self.last_report = m
        return m

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:

        m = self._shift(metrics)
        if checkpoint_dir:
            d = Path(checkpoint_dir)
            (d / GEN_FILE).write_text(json.dumps({"generation": self.generation, "epochs": self.epochs,
                                                  "finished": self.finished}))
            if self.teacher is not None:
                atomic_torch_save(self.teacher, d / TEACHER_FILE)
            if m["generation_epoch"] == self.epochs:
                self.final_record = load_record(d / STUDENT_FILE)
        self.inner.report(m, checkpoint_dir)

    def report_failure(self, metrics: dict[str, Any]) -> None:
        self.inner.report_failure(self._shift(metrics))

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        yield self.restore


def _share_from_rank0(session: Session, record: dict[str, Any] | None) -> dict[str, Any]:
    """Only rank 0 writes (and so reads back) the final checkpoint; every rank needs the next teacher."""
    if session.world_size > 1:
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = box[0]
    if record is None:
        raise RuntimeError("the generation ended without a final checkpoint to teach the next one")
    return record


def generation_run(run: dict[str, Any], generation: int) -> dict[str, Any]:
    """Generation ``generation``'s run config: the run's, with its own seed (``seed + 1_000_003·(g-1)``, far
    from the seeds a user runs side by side); with teacher assistants, stage g < the last trains ``chain[g-1]``."""
    out = {**run, "seed": int(run.get("seed", 0)) + GENERATION_SEED_STEP * (generation - 1)}
    chain = (run.get("scheme") or {}).get("chain") or []
    if (run.get("scheme") or {}).get("type") == "assistant" and generation <= len(chain):
        out["student"] = chain[generation - 1]
    return out


def run_generations(config: dict[str, Any], session: Session,
                    train_one: Callable[[dict[str, Any], Session], dict[str, Any]]) -> dict[str, Any]:
    """Train ``scheme.generations`` generations one after the other with ``train_one`` (the training loop's
    ``train_run``, passed in: the loop calls this module, not the other way round); return the last metrics."""
    from kdray.config import RunConfig

    cfg = RunConfig.model_validate(config["run"])
    n, epochs = cfg.scheme.stages, cfg.train.epochs
    what = "teacher-assistant stage" if cfg.scheme.type == "assistant" else "born-again generation"
    finished: dict[str, float] = {}
    with session.restored_checkpoint() as d:
        start, teacher, restore = 1, None, None
        if d:
            state = json.loads((Path(d) / GEN_FILE).read_text())
            g, finished = int(state["generation"]), {k: float(v) for k, v in state.get("finished", {}).items()}
            done = int(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)["epoch"])
            if done >= epochs and g < n:  # that generation is complete: its student teaches the next
                start, teacher = g + 1, load_record(Path(d) / STUDENT_FILE)
            else:
                start, restore = g, str(d)
                teacher = load_record(Path(d) / TEACHER_FILE) if g > 1 else None
        last: dict[str, Any] = {}
        for g in range(start, n + 1):
            sub = GenerationSession(session, g, n, epochs, teacher, restore, finished)
            # Each generation is a new network (its own initial weights and data order), as in the paper.
            run = dict(config, _generation=g, run=generation_run(config["run"], g))
            if g > 1:
                run.update(teacher_records=[teacher], teacher_cache=None, teacher_servers=None)  # taught by stage g-1
            if session.rank == 0 and config.get("progress"):
                print(f"[kdray] {what} {g}/{n}: {run['run']['student']['name']}"
                      + (" (taught by stage %d)" % (g - 1) if g > 1 else " (taught by the teacher)"), flush=True)
            last = train_one(run, sub)
            last = sub.last_report or last  # as reported: in the run's epochs, with the generation
            if last.get("failed"):
                return last
            restore = None
            if g < n:
                teacher = _share_from_rank0(session, sub.final_record if session.rank == 0 else None)
    return last

