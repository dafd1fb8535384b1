"""Pre-flight checks: everything that can be wrong with a run, found before Ray or MLflow start.

``dry_run`` builds the teacher and student, resolves every tapped layer, infers the connectors and runs
one forward pass of the whole objective on a zero batch; ``check_resources`` compares the workers
asked for with the machine or cluster. Each failure is a ``ConfigError`` naming the file and field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdray.config import ConfigError, RunConfig
from kdray.data import DatasetUnavailable, describe_dataset
from kdray.data.loaders import to_float
from kdray.knowledge import KNOWLEDGE, ModelLayout
from kdray.models import (
    Classifier,
    FeatureTaps,
    LayerNotFound,
    Teacher,
    build_model,
    load_record,
    model_from_record,
    model_record,
)
from kdray.models.taps import check_layers


@dataclass
class DryRun:
    """What a dry run learned: tapped shapes, connectors and model sizes."""

    knowledge: str
    teacher: str | None
    student: str
    teacher_params: int = 0
    student_params: int = 0
    teacher_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    student_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    connectors: dict[str, str] = field(default_factory=dict)
    peers: list[tuple[str, int]] = field(default_factory=list)  # dml: (model, parameters) of each peer

    def lines(self) -> list[str]:
        if self.peers:  # dml: no teacher, the peers learn together
            out = [f"knowledge {self.knowledge}: student {self.student} ({self.student_params:,} params) and peers "
                   + ", ".join(f"{n} ({p:,} params)" for n, p in self.peers)]
        else:
            out = [f"knowledge {self.knowledge}: teacher {self.teacher or '-'} ({self.teacher_params:,} params) -> "
                   f"student {self.student} ({self.student_params:,} params)"]
        for k, s in self.teacher_shapes.items():
            out.append(f"  teacher tap {k}: {s}")
        for k, s in self.student_shapes.items():
            out.append(f"  student tap {k}: {s}")
        for k, c in self.connectors.items():
            out.append(f"  connector {k}: {c}")
        return out


LAYER_PARAMS = ("teacher_layer", "teacher_layers", "student_layer", "student_layers")


def _layer_field(i: int, spec: dict[str, Any], missing: list[str], side: str) -> str:
    for p in (f"{side}_layer", f"{side}_layers"):
        v = spec.get(p)
        names = v if isinstance(v, list) else [v]
        if any(m in names for m in missing):
            return f"knowledge.{i}.{p}"
    return f"knowledge.{i}"


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
        try:
            model = build_model(t.name, info.num_classes, info.preprocess(), t.options)
        except (TypeError, ValueError, RuntimeError, OSError) as e:
            raise ConfigError(f"cannot build teacher {t.name!r}: {e}", file, "teacher.name") from None
        return [model_record(model, model_name=t.name, model_options=t.options, num_classes=info.num_classes,
                             dataset={}, config={"teacher": t.name})]
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


def student_from_teacher(cfg: RunConfig, teacher: Teacher | None, info, file: str | Path | None = None) -> Classifier:
    """``student.init_from_teacher``: the student built from the teacher's own weights (DistilBERT)."""
    from kdray.models.hf import init_from_teacher

    if teacher is None:
        raise ConfigError("needs a teacher", file, "student.init_from_teacher")
    try:
        return Classifier(info.preprocess(), init_from_teacher(teacher.members[0], cfg.student.init_from_teacher))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), file, "student.init_from_teacher") from None


def dry_run(cfg: RunConfig, *, file: str | Path | None = None,
            teacher_records: list[dict[str, Any]] | None = None) -> DryRun:
    """Build everything a run needs and push a zero batch through it; raise ``ConfigError`` on failure."""
    try:
        info = describe_dataset(cfg.dataset)
    except DatasetUnavailable as e:
        raise ConfigError(str(e), file, "dataset.download" if "download" in str(e) else "dataset.options") from None
    except ValueError as e:
        raise ConfigError(str(e), file, "dataset.options") from None

    def build(name: str, options: dict[str, Any], where: str):
        try:
            return build_model(name, info.num_classes, info.preprocess(), options)
        except TypeError as e:
            raise ConfigError(f"bad options for model {name!r}: {e}", file, f"{where}.options") from None
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"model {name!r} cannot be used on data set {cfg.dataset.name!r}: {e}", file,
                              f"{where}.name") from None

    student = build(cfg.student.name, cfg.student.options, "student")
    report = DryRun(cfg.knowledge_label, None, cfg.student.name,
                    student_params=sum(p.numel() for p in student.parameters()))
    for j, peer in enumerate(cfg.scheme.peers):  # dml: every peer must build and run on this data
        net = build(peer.name, peer.options, f"scheme.peers.{j}")
        try:
            with torch.no_grad():
                out = net.eval()(to_float(info.example_input(2)))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model {peer.name!r} fails on inputs of shape {tuple(info.model_input)}: {e}", file,
                              f"scheme.peers.{j}.name") from None
        if out.shape != (2, info.num_classes):
            raise ConfigError(f"peer outputs {tuple(out.shape[1:])}, expected ({info.num_classes},)", file,
                              f"scheme.peers.{j}.name")
        report.peers.append((peer.name, sum(p.numel() for p in net.parameters())))
    teacher = None
    if cfg.teacher is not None:
        if cfg.teacher.ready_made:
            records = teacher_records if teacher_records is not None else load_teacher_records(cfg, file)
            members = []
            for i, rec in enumerate(records):
                where = ("teacher.name" if cfg.teacher.name else "teacher.mlflow" if cfg.teacher.mlflow else
                         "teacher.checkpoint" if len(records) == 1 else f"teacher.checkpoint.{i}")
                if rec["num_classes"] != info.num_classes:
                    raise ConfigError(f"the teacher predicts {rec['num_classes']} classes but data set "
                                      f"{cfg.dataset.name!r} has {info.num_classes}", file, where)
                if not rec["preprocess"].get("passthrough") and tuple(rec["preprocess"]["shape"]) != tuple(info.model_input):
                    raise ConfigError(f"the teacher takes inputs of shape {tuple(rec['preprocess']['shape'])} "
                                      f"but data set {cfg.dataset.name!r} gives {info.model_input}", file, where)
                # A kdray checkpoint knows its split; a model by name or from MLflow was trained elsewhere.
                diff = cfg.dataset.split_differences(rec.get("dataset") or {}) if cfg.teacher.checkpoint else []
                if diff and not cfg.teacher.allow_split_mismatch:
                    raise ConfigError(
                        f"the teacher was trained on another train/validation split ({'; '.join(diff)}): it has "
                        "seen this run's validation samples, which favours distillation in selection. Retrain it "
                        "on this split, or set teacher.allow_split_mismatch: true to accept that", file, where)
                members.append(model_from_record(rec))
            teacher = Teacher(members)
            report.teacher = "+".join(r["model"] for r in records)
        else:
            t = cfg.teacher.train.model
            teacher = Teacher([build(t.name, t.options, "teacher.train.model")])
            report.teacher = t.name
        report.teacher_params = sum(p.numel() for p in teacher.members[0].parameters())
    if cfg.student.init_from_teacher:
        student = student_from_teacher(cfg, teacher, info, file)
        report.student_params = sum(p.numel() for p in student.parameters())

    t_layout = ModelLayout.of(teacher.members[0]) if teacher else ModelLayout((), "")
    s_layout = ModelLayout.of(student)
    modules = {}
    for i, spec in enumerate(cfg.knowledge):
        cls = KNOWLEDGE.get(spec["type"])
        try:
            k = cls.from_params({p: v for p, v in spec.items() if p != "type"}, t_layout, s_layout)
        except ValueError as e:
            raise ConfigError(str(e), file, f"knowledge.{i}") from None
        try:
            check_layers(teacher.members[0].net, k.teacher_layers, report.teacher)
        except LayerNotFound as e:
            raise ConfigError(f"teacher {e}", file, _layer_field(i, spec, e.missing, "teacher")) from None
        try:
            check_layers(student.net, k.student_layers, cfg.student.name)
        except LayerNotFound as e:
            raise ConfigError(f"student {e}", file, _layer_field(i, spec, e.missing, "student")) from None
        modules[i] = k

    if teacher is not None:  # before the dry forward pass, which a type may watch (OFD: the teacher's BatchNorms)
        for i, k in modules.items():
            try:
                k.bind_models(teacher.members[0].net, student.net)
            except Exception as e:  # noqa: BLE001 - a layer the loss cannot use is a config problem
                raise ConfigError(f"{spec_name(cfg, i)} cannot use these models: {e}", file,
                                  f"knowledge.{i}") from None

    x = to_float(info.example_input(2))  # as training batches hold them: 8-bit images as floats in [0, 1]
    student.eval()
    with torch.no_grad():
        s_taps = FeatureTaps(student.net, [n for k in modules.values() for n in k.student_layers])
        try:
            s_out = s_taps.run(student, x)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model {cfg.student.name!r} fails on inputs of shape {tuple(info.model_input)}: {e}",
                              file, "student.name") from None
        # MLKD's strong augmentation runs both models on a RandAugment copy of each batch: images only.
        strong = next((i for i, k in modules.items() if k.wants_strong_view), None)
        x_strong = None
        if strong is not None:
            from kdray.data.views import ViewKey, strong_view

            try:
                x_strong = strong_view(x, torch.arange(len(x)), ViewKey(cfg.seed, 1))
            except ValueError as e:
                raise ConfigError(f"{spec_name(cfg, strong)}: strong_augment {e}", file, f"knowledge.{strong}") from None
            s_out = s_out._replace(strong=s_taps.run(student, x_strong))
        s_taps.remove()
        if s_out.logits.shape != (2, info.num_classes):
            raise ConfigError(f"student outputs {tuple(s_out.logits.shape[1:])}, expected ({info.num_classes},)",
                              file, "student.name")
        report.student_shapes = {k: tuple(v.shape[1:]) for k, v in s_out.features.items()}
        if teacher is not None:
            teacher.tap([n for k in modules.values() for n in k.teacher_layers])
            try:
                t_out = teacher(x)
                if x_strong is not None:
                    t_out = t_out._replace(strong=teacher(x_strong))
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"the teacher fails on inputs of shape {tuple(info.model_input)}: {e}", file,
                                  "teacher") from None
            report.teacher_shapes = {k: tuple(v.shape[1:]) for k, v in t_out.features.items()}
            y = torch.zeros(2, dtype=torch.long)
            for i, k in modules.items():
                try:
                    # Without loading the data set its training split's size is unknown: the dry batch stands in
                    # (a two-row memory bank for CRD, K capped at 1) and no labels (CRD: uniform negatives).
                    k.bind_data(2)
                    k.bind(t_out.features, s_out.features)
                    value = (k.compute(s_out, t_out, y, index=torch.arange(2)) if k.uses_index
                             else k.compute(s_out, t_out, y))
                except Exception as e:  # noqa: BLE001 - a shape mismatch in a loss is a config problem
                    raise ConfigError(f"{spec_name(cfg, i)} cannot combine these layers: {e}", file,
                                      f"knowledge.{i}") from None
                if value.dim() != 0:
                    raise ConfigError(f"{spec_name(cfg, i)} returned a {tuple(value.shape)} tensor, not a scalar",
                                      file, f"knowledge.{i}")
                reg = getattr(k, "regressor", None)
                if reg is not None:
                    report.connectors[k.name] = f"{reg.kind} {reg.student_shape} -> {reg.teacher_shape}"
    return report


def spec_name(cfg: RunConfig, i: int) -> str:
    return f"knowledge type {cfg.knowledge[i]['type']!r}"


def local_capacity() -> dict[str, float]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(cfg: RunConfig, capacity: dict[str, float] | None = None, file: str | Path | None = None,
                    where: str = "resources", holder: str | None = None) -> None:
    """A run whose workers cannot fit on the machine or cluster would wait forever: refuse it now.

    ``holder`` says what ``capacity`` is ("the cluster can grow to" for an autoscaler's maximum)."""
    cap = capacity or local_capacity()
    holder = holder or ("the cluster has" if capacity else "the machine has")
    res = cfg.resources
    cpus = res.num_workers * res.cpus_per_worker
    if cpus > cap.get("CPU", 0):
        raise ConfigError(
            f"{res.num_workers} workers x {res.cpus_per_worker:g} CPUs = {cpus:g} CPUs, but {holder} "
            f"{cap.get('CPU', 0):g}", file, f"{where}.num_workers")
    gpus = res.num_workers * res.gpus_per_worker
    if gpus > cap.get("GPU", 0):
        raise ConfigError(
            f"{res.num_workers} workers x {res.gpus_per_worker:g} GPUs = {gpus:g} GPUs, but {holder} "
            f"{cap.get('GPU', 0):g}", file, f"{where}.gpus_per_worker")
