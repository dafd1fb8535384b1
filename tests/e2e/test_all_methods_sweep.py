"""One sweep over every knowledge type kdray registers for CNNs, plus the schemes dml and born_again, on CIFAR-shaped
images augmented with crops and flips, with a BatchNorm+dropout student: every trial runs end to end (1-epoch
trials) and MLflow shows each method's own loss term, born-again's nested generation runs and dml's peers. The
teacher's outputs on the augmented views come from the sweep's per-(epoch, sample) cache, feature maps included."""
from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient
from sweep_helpers import request

from kdray.knowledge import KNOWLEDGE
from kdray.sweep.runner import run_sweep
from kdray.tracking.store import TAG_KNOWLEDGE, TAG_PARENT, TAG_STATUS, sweep_children

pytestmark = pytest.mark.ray

# Transformer-only types (attention taps) do not apply to a CNN pair; they are dry-run in test_every_method.
TYPES = sorted(n for n, _ in KNOWLEDGE.items() if KNOWLEDGE.origin(n) == "kdray" and n not in ("attn", "minilm"))


def test_a_sweep_over_every_method_and_scheme_runs_end_to_end(ray_cluster, tmp_path):
    choices = {t: {} for t in TYPES}
    choices["dml"] = {"scheme.peers": [{"name": "small_cnn", "options": {"widths": [8, 16]}}]}
    choices["born_again+kd"] = {"scheme.generations": 2}
    space = {
        "name": "every-method", "seed": 0, "num_samples": len(choices) + 1,
        "base": {
            "dataset": {"name": "test_images"},
            "teacher": {"train": {"model": {"name": "small_cnn", "options": {"widths": [32, 64]}},
                                  "train": {"epochs": 3, "batch_size": 64, "lr": 0.003}}},
            # Same widths as the teacher (32/64): FSP matches Gram matrices of equal channel counts.
            "student": {"name": "small_cnn", "options": {"widths": [32, 64], "dropout": 0.1}},
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.003},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
        },
        "scheduler": {"type": "fifo"},
        "searcher": {"type": "grid", "grid_points": 1},
        "space": {"knowledge": choices},
    }
    path = tmp_path / "every.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    result = run_sweep(request(tmp_path, path, "every-method"))

    by_choice = {o.knowledge: o for o in result.outcomes}
    assert set(by_choice) == {"none", *choices}
    assert {k: o.status for k, o in by_choice.items() if o.status != "completed"} == {}
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.data.tags[TAG_KNOWLEDGE]: r for r in sweep_children(c, c.get_run(result.parent_run_id), kind="trial")}
    for t in TYPES:  # each method's own term was computed and is finite
        assert f"loss_{t}" in runs[t].data.metrics, t
        assert runs[t].data.tags[TAG_STATUS] == "completed"
    assert {"val_accuracy_peer0", "val_accuracy_peer1", "loss_dml"} <= set(runs["dml"].data.metrics)
    ban = runs["born_again+kd"]
    assert ban.data.metrics["generation"] == 2 and "val_accuracy_gen1" in ban.data.metrics
    nested = c.search_runs([ban.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{ban.info.run_id}'")
    assert sorted(r.data.tags["kdray.generation"] for r in nested) == ["1", "2"]
    assert all(r.info.status == "FINISHED" and "loss_kd" in r.data.metrics for r in nested)
    # Every distilling trial read the sweep's teacher outputs for the augmented views, feature maps included.
    sources = {k: r.data.tags.get("kdray.teacher_source") for k, r in runs.items() if k not in ("none", "dml")}
    assert {k: v for k, v in sources.items() if v != "view_cache"} == {}, sources
    assert max(r.data.metrics["teacher_cached_fraction"] for k, r in runs.items() if k in sources) == 1.0
    parent = c.get_run(result.parent_run_id).data
    n = 480  # training samples of test_images
    computed = parent.metrics["teacher_cache.rows_by_producer"] + parent.metrics["teacher_cache.rows_by_trials"]
    assert n <= computed <= 3 * n  # epoch 1's views once (twice or thrice where trials raced the producer)
    assert parent.metrics["teacher_cache.rows_read"] >= (len(TYPES) - 3) * n
