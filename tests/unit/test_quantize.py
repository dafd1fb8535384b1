"""``student.quantize: int8``: a student distilled with fake quantisation and delivered as an int8 model. What the run
reports (validation accuracy and loss, latency) is the int8 model's, the record rebuilds it, and a checkpoint resumes
to the same end; ``kdray check`` refuses what cannot be quantised or tapped, naming the field."""
from __future__ import annotations

import pytest
import torch
from sweep_helpers import straight_and_resumed

from kdray.check import dry_run
from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.data.evaluate import evaluate
from kdray.models import model_from_record
from kdray.models.quantize import is_int8
from kdray.train.loop import STUDENT_FILE, train_run
from kdray.train.session import Session


def q_cfg(**over) -> dict:
    base = {"dataset": {"name": "test_blobs"}, "teacher": {"checkpoint": "unused.pt"},
            "student": {"name": "test_mlp", "options": {"hidden": [32, 32]}, "quantize": "int8"},
            "knowledge": [{"type": "kd", "temperature": 4.0}],
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.01}}
    return RunConfig.model_validate({**base, **over}).model_dump(mode="json")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, blobs_teacher):
    session = Session(checkpoint_root=tmp_path_factory.mktemp("q"))
    last = train_run({"run": q_cfg(), "teacher_records": [blobs_teacher]}, session)
    record = torch.load(session.last_checkpoint / STUDENT_FILE, weights_only=True)
    return last, record


def test_the_record_rebuilds_the_int8_model_whose_validation_the_run_reported(int8_run):
    last, record = int8_run
    model = model_from_record(record)
    assert is_int8(model)
    kinds = {type(m).__module__ for m in model.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds), kinds  # int8 kernels, not fake quantisation
    data = load_dataset(DatasetConfig.model_validate(record["dataset"]))
    here = evaluate(model, data.val, 256, torch.device("cpu"))
    assert here["accuracy"] == last["val_accuracy"] and here["loss"] == pytest.approx(last["val_loss"], rel=1e-9)
    assert last["val_accuracy"] > 0.6  # three classes: it learned


def test_a_resumed_int8_run_ends_where_a_straight_one_ends(tmp_path, blobs_teacher):
    loop = {"run": q_cfg(train={"epochs": 3, "batch_size": 64, "lr": 0.01}), "teacher_records": [blobs_teacher]}
    straight, resumed, last = straight_and_resumed(loop, tmp_path, stop_after=2)
    a = torch.load(straight.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    b = torch.load(resumed.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert last["val_accuracy"] == straight.reports[-1]["val_accuracy"]


def test_the_reported_latency_is_the_int8_models(int8_run):
    """What a run times (setup's ``deliverable``, before its first epoch) is the int8 model, not the float graph."""
    from kdray.models import Preprocess, build_model
    from kdray.models.quantize import example_input, prepare_int8
    from kdray.train.setup import deliverable

    student = build_model("test_mlp", 3, Preprocess((1, 16), passthrough=True), {"hidden": [32, 32]})
    student.net = prepare_int8(student.net, example_input(student.preprocess))
    assert is_int8(deliverable(student, torch.randn(8, 1, 16))) and not is_int8(student)
    last, _ = int8_run
    # the int8 model's weights are packed in its quantised layers, not parameters: they count all the same
    assert last["latency_ms"] > 0 and last["student_params"] == (16 * 32 + 32) + (32 * 32 + 32) + (32 * 3 + 3)


@pytest.mark.parametrize("over,field,words", [
    ({"knowledge": [{"type": "fitnet", "student_layer": "block1", "teacher_layer": "block1"}]}, "knowledge.0.type",
     "logit"),
    ({"dataset": {"name": "synthetic_lm"}, "student": {"name": "tiny_llama", "quantize": "int8"},
      "teacher": {"name": "tiny_llama"}, "knowledge": [{"type": "tkd"}]}, "student.quantize", "classifier"),
    ({"scheme": {"type": "dml", "peers": [{"name": "test_mlp"}], "mutual_weight": 1.0}, "teacher": None,
      "knowledge": []},
     "scheme.type", "dml"),
    ({"latency": {"device": "cuda"}}, "latency.device", "CPU"),
])
def test_check_refuses_what_int8_cannot_do_naming_the_field(over, field, words):
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate({**q_cfg(teacher={"name": "test_cnn1d"}), **over}), file="run.yaml")
    assert e.value.fields == [field] and words in str(e.value), str(e.value)


def test_check_accepts_logit_knowledge_into_an_int8_student_and_says_what_is_measured():
    report = dry_run(RunConfig.model_validate(q_cfg(teacher={"name": "test_cnn1d"})), file="run.yaml")
    assert report.knowledge == "kd" and any("int8 model's" in n for n in report.notes), report.notes


def test_check_refuses_a_student_fx_cannot_trace_naming_the_field(tmp_path, monkeypatch):
    """A network whose forward branches on its input's values cannot be symbolically traced."""
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = tmp_path / "kdray_test_branchy.py"
    plugin.write_text(
        "import torch\nfrom kdray.models.zoo import register_model\n\n"
        "@register_model('branchy', 'any', (1, 16), 'branches on its input')\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self, num_classes, input_shape):\n"
        "        super().__init__()\n        self.fc = torch.nn.Linear(16, num_classes)\n"
        "    def forward(self, x):\n        x = x.flatten(1)\n"
        "        return self.fc(x) if x.sum() > 0 else -self.fc(x)\n")
    cfg = q_cfg(teacher={"name": "test_cnn1d"}, plugins=["kdray_test_branchy"],
                student={"name": "branchy", "quantize": "int8"})
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate(cfg), file="run.yaml")
    assert e.value.fields == ["student.quantize"] and "traced" in str(e.value), str(e.value)


@pytest.mark.parametrize("over,field", [
    ({"teacher": {"train": {"model": {"name": "test_cnn1d", "quantize": "int8"}}}}, "teacher.train.model.quantize"),
    ({"teacher": None, "knowledge": [], "scheme": {"type": "dml", "peers": [{"name": "test_mlp", "quantize": "int8"}],
                                                 "mutual_weight": 1.0}}, "scheme.peers.0.quantize"),
])
def test_int8_is_refused_for_what_is_not_the_student(over, field):
    with pytest.raises(ConfigError) as e:
        RunConfig.model_validate({**q_cfg(), **over})
    assert field in e.value.fields, str(e.value)


def test_an_int8_student_cannot_teach(int8_run):
    """Its packed weights run only on the CPU, and FX left it no named layers: refused, naming the teacher's field."""
    _, record = int8_run
    cfg = RunConfig.model_validate({"dataset": {"name": "test_blobs"}, "teacher": {"checkpoint": "int8.pt"},
                                    "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd"}]})
    with pytest.raises(ConfigError) as e:
        dry_run(cfg, file="run.yaml", teacher_records=[record])
    assert e.value.fields == ["teacher.checkpoint"] and "int8" in str(e.value), str(e.value)
