"""Teacher assistants (``scheme: assistant``, Mirzadeh et al. 2020): each stage trains the chain's model, taught by
the final model of the stage before (the first by the teacher), the last stage the student; a stage equals a plain
distillation of that model from that teacher; a resumed run continues in the right stage; the chain's length is what
a sweep searches (a comma-joined categorical), and what cannot work is refused naming the field."""
from __future__ import annotations

import pytest
import torch
from sweep_helpers import straight_and_resumed
from test_schemes import images_teacher  # noqa: F401 (the fixture)

from kdray.config import ConfigError, RunConfig
from kdray.runfiles import STUDENT_FILE
from kdray.train.loop import train_run
from kdray.train.session import Session

SMALL = {"name": "small_cnn", "options": {"widths": [4, 8], "dropout": 0.2}}
MID = {"name": "small_cnn", "options": {"widths": [12, 12]}}


def assistant(chain: list | str) -> dict:
    return {"dataset": {"name": "test_images"}, "teacher": {"checkpoint": "unused.pt"}, "student": SMALL,
            "knowledge": [{"type": "kd", "temperature": 4.0}], "scheme": {"type": "assistant", "chain": chain},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "keep_checkpoints": 10}}


def test_each_stage_trains_the_chains_model_taught_by_the_stage_before(tmp_path, images_teacher):  # noqa: F811
    session = Session(checkpoint_root=tmp_path / "ta")
    last = train_run({"run": RunConfig.model_validate(assistant([MID])).model_dump(mode="json"),
                      "teacher_records": [images_teacher]}, session)
    r = session.reports
    assert [m["generation"] for m in r] == [1, 1, 2, 2] and last["val_accuracy_gen1"] == r[1]["val_accuracy"]
    stage1 = torch.load(tmp_path / "ta" / "checkpoint_000002" / STUDENT_FILE, weights_only=True)
    final = torch.load(tmp_path / "ta" / "checkpoint_000004" / STUDENT_FILE, weights_only=True)
    assert stage1["model_options"]["widths"] == [12, 12] and final["model_options"]["widths"] == [4, 8]
    # stage 2 is exactly the student distilled from stage 1's model (with stage 2's seed) ...
    plain = Session(checkpoint_root=tmp_path / "plain")
    cfg = {**assistant([MID]), "scheme": {"type": "distill"}, "seed": 1_000_003}
    train_run({"run": RunConfig.model_validate(cfg).model_dump(mode="json"), "teacher_records": [stage1]}, plain)
    for a, b in zip(plain.reports, r[2:]):
        assert a["val_accuracy"] == b["val_accuracy"] and a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-6)
    # ... and not from the original teacher
    direct = Session()
    train_run({"run": RunConfig.model_validate(cfg).model_dump(mode="json"), "teacher_records": [images_teacher]},
              direct)
    assert direct.reports[0]["loss_kd"] != pytest.approx(r[2]["loss_kd"], rel=1e-3)


def test_a_run_resumed_inside_the_students_stage_keeps_the_assistant_as_its_teacher(tmp_path, images_teacher):  # noqa: F811
    loop = {"run": RunConfig.model_validate(assistant([MID])).model_dump(mode="json"),
            "teacher_records": [images_teacher]}
    straight, resumed, last = straight_and_resumed(loop, tmp_path, 3)
    assert [m["epoch"] for m in resumed.reports] == [4]
    for k in ("val_accuracy", "loss_kd", "val_accuracy_gen1"):
        assert last[k] == pytest.approx(straight.reports[-1][k], rel=1e-6), k


def test_the_chain_searched_as_names_sets_the_stages_and_a_sweeps_epochs():
    from kdray.sweep.space import SearchSpace

    cfg = RunConfig.model_validate(assistant("mlp, small_cnn"))
    assert [m.name for m in cfg.scheme.chain] == ["mlp", "small_cnn"] and cfg.scheme.stages == 3
    assert cfg.knowledge_label == "assistant+kd"
    space = SearchSpace.model_validate({
        "name": "ta", "base": {k: v for k, v in assistant([MID]).items() if k not in ("scheme", "knowledge")},
        "scheduler": {"type": "fifo"},
        "space": {"knowledge": {"kd": {}, "assistant+kd": {
            "scheme.chain": {"type": "categorical", "choices": ["small_cnn", "mlp,small_cnn"]}}}}})
    assert space.max_epochs == 2 * 3  # the longest chain: two assistants, then the student
    point = {"knowledge": "assistant+kd", "assistant+kd:scheme.chain": "mlp,small_cnn"}
    assert [m.name for m in space.resolve(point).scheme.chain] == ["mlp", "small_cnn"]


@pytest.mark.parametrize("run, field", [
    ({**assistant([]), "scheme": {"type": "assistant"}}, "scheme.chain"),
    ({**assistant([MID]), "knowledge": []}, "knowledge"),
    ({**assistant([MID]), "scheme": {"type": "distill", "chain": [MID]}}, "scheme.chain"),
    ({**assistant([{**MID, "init_from_teacher": "every_other_layer"}])}, "scheme.chain.0"),
])
def test_what_cannot_work_is_refused_naming_the_field(run, field):
    with pytest.raises(ConfigError) as e:
        RunConfig.model_validate(run)
    assert field in str(e.value)


def test_check_runs_every_stage_and_names_the_assistant_a_layer_is_missing_from(images_teacher):  # noqa: F811
    from kdray.check import dry_run

    fitnet = {**assistant([MID]), "knowledge": [{"type": "fitnet", "teacher_layer": "stage2",
                                                  "student_layer": "stage2"}]}
    report = dry_run(RunConfig.model_validate(fitnet), teacher_records=[images_teacher])
    assert report.knowledge == "assistant+fitnet"
    bad = {**fitnet, "scheme": {"type": "assistant", "chain": [{"name": "mlp"}]}}  # an MLP has no stage2
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate(bad), teacher_records=[images_teacher])
    assert e.value.fields == ["scheme.chain.0"] and "assistant 0 (mlp)" in str(e.value)
