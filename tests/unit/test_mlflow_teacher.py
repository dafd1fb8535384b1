"""A teacher from the MLflow registry (issue 11): loaded as registered, checked against the data set by its
signature and a forward pass before anything trains, errors on `teacher.mlflow`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdray.check import dry_run
from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.teachers import load_teacher_records


class RawRowsNet(nn.Module):
    """A production model that takes test_blobs' raw rows (16 floats) and returns 3 logits."""

    def __init__(self, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.net(x)


def _register(uri: str, name: str, net: nn.Module, width: int = 16, **log_kw) -> str:
    import mlflow
    from mlflow.models import infer_signature

    from kdray.tracking.store import artifact_location

    mlflow.set_tracking_uri(uri)
    c = mlflow.MlflowClient(uri)
    if c.get_experiment_by_name("production-models") is None:  # its models beside the database, not in ./mlruns
        c.create_experiment("production-models", artifact_location=artifact_location(uri))
    mlflow.set_experiment("production-models")  # not an experiment id left active by another test's store
    net.eval()
    x = torch.randn(5, width)
    with torch.no_grad():
        sig = infer_signature(x.numpy(), net(x).numpy())
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(net, name="model", signature=sig, registered_model_name=name,
                                        pip_requirements=["torch"], **log_kw)  # no (slow) inference of them
    mlflow.MlflowClient(uri).set_registered_model_alias(name, "prod", info.registered_model_version)
    return f"models:/{name}@prod"


def _cfg(model_uri: str, uri: str, **teacher) -> RunConfig:
    return RunConfig.model_validate({
        "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
        "teacher": {"mlflow": model_uri, "tracking_uri": uri, **teacher}, "knowledge": [{"type": "kd"}]})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One registry with a model that fits test_blobs (exported, MLflow's default), two that do not, and one
    saved in the older pickle format."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    torch.manual_seed(0)
    net = RawRowsNet()
    models = {
        "fits": _register(uri, "blobs-prod", net, input_example=torch.randn(5, 16).numpy()),
        # the signature is checked before the model is loaded: these need no (slow) export
        "wide": _register(uri, "wide", RawRowsNet(width=20), width=20, serialization_format="pickle"),
        "five": _register(uri, "five-classes", RawRowsNet(classes=5), serialization_format="pickle"),
        "pickled": _register(uri, "pickled", RawRowsNet(), serialization_format="pickle"),
    }
    return uri, models, net


def test_a_registered_exported_model_teaches_with_its_own_outputs(registry):
    uri, models, net = registry
    cfg = _cfg(models["fits"], uri)
    records = load_teacher_records(cfg)
    assert dry_run(cfg, teacher_records=records).teacher == models["fits"]
    from kdray.models import Teacher

    teacher = Teacher.from_records(records)  # as a worker builds it: the program rebuilt from its bytes
    x = load_dataset(DatasetConfig(name="test_blobs")).val.x[:20]
    with torch.no_grad():
        assert torch.allclose(teacher(x).logits, net.eval()(x), atol=1e-5)  # raw rows in, its logits out


def test_a_model_that_does_not_fit_the_data_set_is_refused_by_its_signature(registry):
    uri, models, _ = registry
    with pytest.raises(ConfigError) as e:
        load_teacher_records(_cfg(models["wide"], uri))
    assert e.value.fields == ["teacher.mlflow"] and "(20,)" in str(e.value) and "(16,)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_teacher_records(_cfg(models["five"], uri))
    assert "returns 5 outputs" in str(e.value) and "3 classes" in str(e.value)


def test_a_pickled_model_loads_only_where_mlflow_allows_unpickling(registry, monkeypatch):
    uri, models, _ = registry
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(ConfigError) as e:
        load_teacher_records(_cfg(models["pickled"], uri))
    assert e.value.fields == ["teacher.mlflow"] and "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" in str(e.value)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    (record,) = load_teacher_records(_cfg(models["pickled"], uri))
    assert isinstance(record["module"], RawRowsNet)


def test_a_missing_model_names_the_registry_it_looked_in(registry):
    uri, _, _ = registry
    with pytest.raises(ConfigError) as e:
        load_teacher_records(_cfg("models:/nobody@prod", uri))
    assert e.value.fields == ["teacher.mlflow"] and uri in str(e.value)
