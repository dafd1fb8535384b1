"""Where a run's teacher comes from: a checkpoint (or an ensemble of them), a model by name (a Hugging Face
fine-tune, a timm model), the MLflow registry, or trained on labels for the sweep and reused by later sweeps.

``teacher_records`` answers it for a run (model records, loaded or trained once); ``load_teacher_records`` for a
ready-made teacher, with config errors naming ``teacher.*``. Whether a trial then reads the teacher's *outputs*
from a shared cache or runs it live is the cache's answer (:mod:`kdray.cache`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kdray import storage
from kdray.config import ConfigError, RunConfig, TeacherRunConfig
from kdray.data import describe_dataset
from kdray.data.retokenize import cross_tokenizer, tokenizer_spec
from kdray.errors import DatasetUnavailable, TrainingFailed
from kdray.models import build_model, load_record, model_record, save_model
from kdray.train.runner import final_student, fit, fit_inline, new_run_name


def teacher_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_run_config(cfg: RunConfig) -> TeacherRunConfig:
    """The labels-only run that trains ``cfg.teacher.train`` on ``cfg``'s data set."""
    t = cfg.teacher.train
    # the teacher learns from labels: a transfer set's samples have none; its share of labels is its own if given
    data = cfg.dataset.model_copy(update={"transfer": None, "labelled_fraction": (
        t.labelled_fraction if t.labelled_fraction is not None else cfg.dataset.labelled_fraction)})
    return TeacherRunConfig(name=f"teacher-{t.model.name}", seed=t.seed, dataset=data, model=t.model,
                            train=t.train, resources=cfg.resources.model_copy(update={"execution": "train"}))


def trained_teacher_path(cfg: RunConfig, storage_path: str, data_fingerprint: str) -> str:
    """Where the teacher trained for ``cfg`` lives in the run storage (a folder or a URI): keyed by its
    config *and* the data's content, so changed data (a re-exported image folder) trains a new teacher."""
    tcfg = teacher_run_config(cfg)
    # Fields added since teachers were first stored are left out at their defaults, so those teachers keep their
    # name: `peft` and `quantize` (a student's, refused for teachers), hidden labels and a transfer set (the
    # teacher's data).
    d = tcfg.dataset
    later = {k for k, default in (("labelled_fraction", 1.0), ("transfer", None)) if getattr(d, k) == default}
    key = teacher_key({"model": tcfg.model.model_dump(exclude={"peft", "quantize"}), "train": tcfg.train.model_dump(),
                       "seed": tcfg.seed, "dataset": d.model_dump(exclude=later), "data": data_fingerprint})
    return storage.join(storage_path, "teachers", f"{tcfg.model.name}-{key}.pt")


def train_teacher(tcfg: TeacherRunConfig, *, storage_path: str, output: str | Path, local: bool = False,
                  progress: bool = True, inline: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """Train a teacher on labels and save its model record at ``output`` (a path or storage URI, written
    whole or not at all).

    ``inline``: one process as a Ray task (what a sweep uses for one-CPU-worker configs); otherwise a
    TorchTrainer with the config's workers, under a new run name unless ``run_name`` resumes one.
    """
    if inline:
        metrics, record = fit_inline(tcfg.as_run(), progress)
        if record is None:
            raise TrainingFailed(f"teacher training failed: {metrics.get('failed', 'no checkpoint')}")
    else:
        result = fit(tcfg.as_run(), storage_path=storage_path, name=run_name or new_run_name(tcfg.name),
                     local=local, progress=progress)
        if result.failed:
            raise TrainingFailed(f"teacher training failed: {result.failed}")
        record = final_student(result)
    save_model(record, output)
    return record


def teacher_records(cfg: RunConfig, storage_path: str, *, local: bool = False, progress: bool = True,
                    inline: bool = False, tracking_uri: str | None = None,
                    log=lambda m: print(f"[kdray] {m}", flush=True)) -> list[dict[str, Any]]:
    """The teacher of ``cfg``: loaded (checkpoints, a model by name, the MLflow registry), or trained once and
    reused afterwards."""
    if cfg.teacher is None:
        return []
    if cfg.teacher.ready_made:
        return load_teacher_records(cfg, tracking_uri=tracking_uri)
    from kdray.data import load_dataset

    path = trained_teacher_path(cfg, storage_path, load_dataset(teacher_run_config(cfg).dataset).fingerprint)
    if storage.exists(path):
        log(f"using the teacher trained earlier for this config and data: {path}")
        return [load_record(path)]
    log(f"training the teacher ({cfg.teacher.train.model.name}, {cfg.teacher.train.train.epochs} epochs); "
        f"it is saved to {path} and reused by later runs")
    return [train_teacher(teacher_run_config(cfg), storage_path=storage_path, output=path, local=local,
                          progress=progress, inline=inline)]


def load_teacher_records(cfg: RunConfig, file: str | Path | None = None,
                         tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The records of a ready-made teacher (checkpoints, a model by name, an MLflow model); config errors name
    ``teacher.checkpoint``, ``teacher.name`` or ``teacher.mlflow``."""
    t = cfg.teacher
    if t is None or t.train is not None:
        return []
    if t.name is not None or t.mlflow is not None:
        try:
            info = describe_dataset(cfg.dataset)
        except (DatasetUnavailable, ValueError) as e:
            raise ConfigError(str(e), file, "dataset") from None
    if t.name is not None:
        # a language model of another tokenizer keeps its own vocabulary, and its record carries the tokenizer
        try:
            cross = cross_tokenizer(t.name, info.tokenizer) if info.causal_lm else None
            tokenizer = tokenizer_spec(cross) if cross is not None else None
        except ValueError as e:
            raise ConfigError(str(e), file, "teacher.name") from None
        classes = tokenizer["vocab"] if tokenizer else info.num_classes
        try:
            model = build_model(t.name, classes, info.preprocess(), t.options)
        except (TypeError, ValueError, RuntimeError, OSError) as e:
            raise ConfigError(f"cannot build teacher {t.name!r}: {e}", file, "teacher.name") from None
        record = model_record(model, model_name=t.name, model_options=t.options, num_classes=classes,
                              dataset={}, config={"teacher": t.name})
        if tokenizer:
            record["tokenizer"] = tokenizer
        return [record]
    if t.mlflow is not None:
        from kdray.tracking.store import tracking_uri as default_uri
        from kdray.tracking.teacher import MlflowTeacherError, load_mlflow_teacher

        try:
            return [load_mlflow_teacher(t.mlflow, info, default_uri(t.tracking_uri or tracking_uri))]
        except MlflowTeacherError as e:
            raise ConfigError(str(e), file, "teacher.mlflow") from None
    recs = []
    for i, p in enumerate(t.checkpoints):
        where = "teacher.checkpoint" if isinstance(t.checkpoint, str) else f"teacher.checkpoint.{i}"
        try:
            recs.append(load_record(p))
        except FileNotFoundError:
            raise ConfigError(f"teacher checkpoint {p} does not exist", file, where) from None
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input at fault
            raise ConfigError(f"cannot read teacher checkpoint {p}: {e}", file, where) from None
    return recs
