"""A language-model teacher served by Ray actors of its own (``teacher.serve``), as users run it: a run whose batches
go to real actors learns exactly what a run with the teacher loaded and cut to the same top-k learns, never building
the teacher itself; and a sweep starts the actors once, every trial reads from them, and they are gone at its end."""
from __future__ import annotations

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request
from test_on_policy_lm import whole_batches

from kdray.config import DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.models import Preprocess, build_model, model_record, save_model
from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

TINY = {"layers": 1, "hidden": 32, "heads": 2}


def teacher_record(dataset: dict) -> dict:
    torch.manual_seed(1)
    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    teacher = build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True),
                          {**TINY, "layers": 2})
    return model_record(teacher, model_name="tiny_llama", model_options={**TINY, "layers": 2},
                        num_classes=info.num_classes, dataset=dataset)


def alive_servers() -> int:
    from ray.util.state import list_actors

    return sum(1 for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "TeacherServer")


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_served_by_teacher_actors_learns_what_the_loaded_teacher_cut_to_its_top_k_teaches(tmp_path,
                                                                                                ray_cluster):
    import ray

    from kdray.cache.served import start_servers, stop_servers
    from kdray.train.loop import STUDENT_FILE, train_run
    from kdray.train.session import Session

    dataset = whole_batches(tmp_path)
    rec = teacher_record(dataset)

    def run(serve: bool) -> RunConfig:
        return RunConfig.model_validate({
            "dataset": dataset, "teacher": {"checkpoint": "unused.pt", **({"serve": {"cpus": 0}} if serve else {})},
            "student": {"name": "tiny_llama", "options": TINY},
            "knowledge": [{"type": "tkd", "divergence": "jsd", "beta": 0.5, "temperature": 2.0}], "ce_weight": 0.5,
            "cache": {"top_k": 4, "tail": "uniform"},
            "train": {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                      "scheduler": "none"}})

    served_cfg = run(True)
    servers = start_servers([rec], {}, served_cfg.teacher.serve)
    try:
        a, b = Session(checkpoint_root=tmp_path / "served"), Session(checkpoint_root=tmp_path / "loaded")
        train_run({"run": served_cfg.model_dump(mode="json"), "teacher_records": [rec], "teacher_servers": servers},
                  a)
        train_run({"run": run(False).model_dump(mode="json"), "teacher_records": [rec]}, b)
        batches = len(load_dataset(DatasetConfig.model_validate(dataset)).train) // 8
        assert ray.get(servers[0].stats.remote())["served_batches"] == batches
    finally:
        stop_servers(servers)
    sa = torch.load(a.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    sb = torch.load(b.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    for k, v in sb.items():
        torch.testing.assert_close(sa[k], v, rtol=1e-5, atol=1e-6)
    ra, rb = a.reports[-1], b.reports[-1]
    assert ra["teacher_source"] == "served" and rb["teacher_source"] == "live"
    assert ra["loss_tkd"] == pytest.approx(rb["loss_tkd"], rel=1e-5) and ra["loss_tkd"] > 0
    from kdray.train.setup import seeded_init

    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    with seeded_init(served_cfg.seed):  # the student's first weights, as the run made them
        init = build_model("tiny_llama", info.num_classes, info.preprocess(), TINY).state_dict()
    moved = max((sa[k] - v).abs().max().item() for k, v in init.items() if k in sa and v.is_floating_point())
    assert moved > 1e-3  # the epoch did train


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_serves_its_teacher_from_actors_it_starts_once_and_stops(tmp_path, ray_cluster):
    from kdray.sweep.runner import run_sweep

    dataset = {"name": "lm_tasks", "options": {"tasks": ["copy"], "items": 4, "train_examples": 300,
                                               "test_examples": 50}}
    rec = teacher_record(dataset)
    save_model(rec, tmp_path / "teacher.pt")
    space = {
        "name": "served", "metric": "val_nll", "num_samples": 2, "seed": 0,
        "base": {"dataset": dataset, "teacher": {"checkpoint": str(tmp_path / "teacher.pt"), "serve": {"cpus": 0}},
                 "student": {"name": "tiny_llama", "options": TINY}, "cache": {"top_k": 4},
                 "train": {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.003}},
        "space": {"knowledge": {"tkd": {"divergence": {"type": "categorical", "choices": ["fkl", "rkl"]}}}},
    }
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    run_sweep(request(tmp_path, path, "served"))
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = [t for t in sweep_children(c, find_sweep(c, "served"), kind="trial")
              if t.data.tags.get(TAG_STATUS) == "completed"]
    assert len(trials) == 2  # the tkd trial and the sweep's baseline without distillation (which needs no teacher)
    for t in trials:
        if t.data.tags["kdray.knowledge"] == "tkd":
            assert t.data.tags["kdray.teacher_source"] == "served" and t.data.metrics["loss_tkd"] > 0
        else:
            assert t.data.tags["kdray.knowledge"] == "none" and t.data.tags["kdray.teacher_source"] == "none"
    assert {t.data.tags["kdray.knowledge"] for t in trials} == {"tkd", "none"}
    assert alive_servers() == 0


@pytest.mark.ray
def test_a_teacher_its_actors_cannot_build_fails_at_start_and_leaves_no_actor(tmp_path, ray_cluster):
    """A record whose weights do not fit its model: every actor's construction fails; start_servers raises (it does
    not wait for ever on actors restarted for good) and kills the others."""
    from kdray.cache.served import start_servers
    from kdray.config.parts import TeacherServeConfig

    dataset = whole_batches(tmp_path)
    rec = teacher_record(dataset)
    bad = {**rec, "state_dict": {k: v[..., :1] if v.dim() else v for k, v in rec["state_dict"].items()}}
    with pytest.raises(Exception, match="size mismatch"):
        start_servers([bad], {}, TeacherServeConfig(actors=2, cpus=0))
    assert alive_servers() == 0


@pytest.mark.slow
def test_kdray_distill_serves_its_teacher_to_two_train_workers_and_stops_it(tmp_path):
    """As users start it: ``kdray distill`` (Ray started by kdray, no --local) with ``teacher.serve``: its two Ray
    Train workers (DDP) read the teacher from the actor the run started; the summary says so."""
    import json
    import subprocess
    import sys

    dataset = {"name": "lm_tasks", "options": {"tasks": ["copy"], "items": 4, "train_examples": 200,
                                               "test_examples": 20}, "data_dir": str(tmp_path / "data")}
    save_model(teacher_record(dataset), tmp_path / "teacher.pt")
    cfg = {"dataset": dataset, "teacher": {"checkpoint": str(tmp_path / "teacher.pt"), "serve": {"cpus": 0}},
           "student": {"name": "tiny_llama", "options": TINY}, "knowledge": [{"type": "tkd"}],
           "cache": {"top_k": 4}, "train": {"epochs": 1, "batch_size": 16},
           "resources": {"num_workers": 2, "cpus_per_worker": 1}}
    (tmp_path / "served.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "kdray", "distill", "served.yaml", "--storage", str(tmp_path / "runs"),
                        "--output", str(tmp_path / "out"), "--json"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["teacher_source"] == "served" and "1 teacher actor" in summary["teacher_reason"]
    assert (tmp_path / "out" / "student.pt").is_file()
