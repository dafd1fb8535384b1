"""Schemes that change who teaches: deep mutual learning (peers teach each other) and born-again generations."""
from __future__ import annotations

import pytest
import torch
from sweep_helpers import straight_and_resumed

from kdray.config import ConfigError, RunConfig, validate
from kdray.data import load_dataset
from kdray.models import model_from_record
from kdray.train.loop import STUDENT_FILE, evaluate, train_run
from kdray.train.mutual import mutual_kl
from kdray.train.session import Session


# -- the mutual loss ---------------------------------------------------------------------------------------
def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per sample, from probabilities, in float64."""
    return (p * (p.log() - q.log())).sum(1)


@pytest.mark.parametrize("peers,t", [(2, 1.0), (3, 2.5)])
def test_mutual_kl_is_each_peers_mean_kl_to_the_others(peers, t):
    g = torch.Generator().manual_seed(peers)
    logits = [torch.randn(6, 5, generator=g) * 3 for _ in range(peers)]
    got = mutual_kl(logits, t)
    p = [torch.softmax(z.double() / t, 1) for z in logits]
    for k in range(peers):
        want = sum(_kl64(p[l], p[k]).mean() for l in range(peers) if l != k) / (peers - 1) * t * t
        assert got[k].item() == pytest.approx(want.item(), rel=1e-5)


def test_mutual_kl_moves_each_peer_only_by_its_own_term():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    kl_a, _ = mutual_kl([a, b])
    kl_a.backward()
    assert b.grad is None and a.grad is not None and a.grad.abs().sum() > 0
    same = torch.randn(4, 3)
    assert [v.item() for v in mutual_kl([same, same.clone()])] == pytest.approx([0.0, 0.0], abs=1e-7)


# -- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,extra,field", [
    ({"type": "dml"}, {}, "scheme.peers"),
    ({"type": "dml", "peers": [{"name": "mlp"}]}, {"teacher": {"checkpoint": "t.pt"}, "knowledge": [{"type": "kd"}]},
     "teacher"),
    ({"type": "distill", "generations": 3}, {}, "scheme.generations"),
    ({"type": "born_again", "generations": 2}, {"teacher": {"checkpoint": "t.pt"}}, "knowledge"),
    ({"type": "born_again", "generations": 2}, {"teacher": {"checkpoint": "t.pt"}, "knowledge": [{"type": "kd"}],
     "student": {"name": "mlp", "init_from_teacher": "every_other_layer"}}, "student.init_from_teacher"),
])
def test_a_scheme_with_the_wrong_fields_is_refused_naming_the_field(scheme, extra, field):
    with pytest.raises(ConfigError) as e:
        validate(RunConfig, {"student": {"name": "mlp"}, "scheme": scheme, **extra}, "run.yaml")
    assert e.value.fields == [field] and "run.yaml" in str(e.value)


# -- deep mutual learning, run as the loop runs it ------------------------------------------------------------
def dml_cfg(epochs: int = 3, **scheme) -> RunConfig:
    """Two peers of different families on augmented images: a BatchNorm CNN with dropout and an MLP."""
    return RunConfig.model_validate({
        "dataset": {"name": "test_images"},
        "student": {"name": "small_cnn", "options": {"widths": [8, 16], "dropout": 0.2}},
        "scheme": {"type": "dml", "peers": [{"name": "mlp", "options": {"hidden": [32], "dropout": 0.2}}], **scheme},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.01, "optimizer": "sgd"},
    })


def test_dml_trains_every_peer_and_keeps_the_best_one(tmp_path):
    cfg = dml_cfg()
    session = Session(checkpoint_root=tmp_path)
    last = train_run({"run": cfg.model_dump(mode="json")}, session)
    assert {"loss_dml", "loss_ce_peer0", "loss_ce_peer1", "val_accuracy_peer0", "val_accuracy_peer1"} <= set(last)
    assert last["loss_dml"] > 0
    peers = [last["val_accuracy_peer0"], last["val_accuracy_peer1"]]
    assert last["val_accuracy"] == max(peers) and last["best_peer"] == peers.index(max(peers))
    record = torch.load(session.last_checkpoint / STUDENT_FILE, weights_only=True)
    assert record["model"] == ("small_cnn", "mlp")[last["best_peer"]]
    # What is saved is that peer: its accuracy on the validation split is the one reported.
    val = evaluate(model_from_record(record), load_dataset(cfg.dataset).val, 256, torch.device("cpu"))
    assert val["accuracy"] == pytest.approx(last["val_accuracy"])
    assert max(peers) > 0.5  # 3 classes: chance is 0.33


def test_a_resumed_dml_run_continues_every_peer_exactly(tmp_path):
    loop = {"run": dml_cfg().model_dump(mode="json")}
    straight, resumed, _ = straight_and_resumed(loop, tmp_path)
    assert [r["epoch"] for r in resumed.reports] == [3]
    for k in ("val_accuracy_peer0", "val_accuracy_peer1", "train_loss"):
        assert resumed.reports[-1][k] == pytest.approx(straight.reports[-1][k], rel=1e-6), k


# -- born-again generations -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images_teacher(tmp_path_factory) -> dict:
    from conftest import train_record

    return train_record({"dataset": {"name": "test_images"}, "student": {"name": "small_cnn",
                         "options": {"widths": [16, 32]}}, "train": {"epochs": 3, "batch_size": 32, "lr": 0.01}},
                        tmp_path_factory.mktemp("bt"))


def born_again(generations: int = 3) -> dict:
    """Run config (as a dict) of a BatchNorm+dropout CNN student taught by kd on augmented images."""
    return {"dataset": {"name": "test_images"}, "teacher": {"checkpoint": "unused.pt"},
            "student": {"name": "small_cnn", "options": {"widths": [8, 16], "dropout": 0.2}},
            "knowledge": [{"type": "kd", "temperature": 4.0}],
            "scheme": {"type": "born_again", "generations": generations},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "keep_checkpoints": 10}}


def test_each_generation_is_taught_by_the_final_student_of_the_one_before(tmp_path, images_teacher):
    run = RunConfig.model_validate(born_again()).model_dump(mode="json")
    session = Session(checkpoint_root=tmp_path / "ban")
    last = train_run({"run": run, "teacher_records": [images_teacher]}, session)
    r = session.reports
    assert [m["epoch"] for m in r] == [1, 2, 3, 4, 5, 6] and {m["epochs_planned"] for m in r} == {6}
    assert [m["generation"] for m in r] == [1, 1, 2, 2, 3, 3]
    assert last["val_accuracy_gen1"] == r[1]["val_accuracy"] and last["val_accuracy_gen2"] == r[3]["val_accuracy"]
    # Generation 2 is exactly a plain distillation (with its own seed) whose teacher is generation 1's last student.
    gen1 = torch.load(tmp_path / "ban" / "checkpoint_000002" / STUDENT_FILE, weights_only=True)
    plain_cfg = RunConfig.model_validate({**born_again(), "scheme": {"type": "distill"},
                                          "seed": 1_000_003}).model_dump(mode="json")  # generation 2's own seed
    plain = Session(checkpoint_root=tmp_path / "plain")
    train_run({"run": plain_cfg, "teacher_records": [gen1]}, plain)
    for a, b in zip(plain.reports, r[2:4]):
        assert a["val_accuracy"] == b["val_accuracy"] and a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-6)
    # ... and not one taught by the original teacher (which would make the test above vacuous).
    first = Session()
    train_run({"run": plain_cfg, "teacher_records": [images_teacher]}, first)
    assert first.reports[0]["loss_kd"] != pytest.approx(r[2]["loss_kd"], rel=1e-3)


@pytest.mark.parametrize("stop_at", [2, 3])  # at the end of generation 1; inside generation 2
def test_a_born_again_run_resumes_in_the_right_generation_with_the_right_teacher(tmp_path, images_teacher, stop_at):
    loop = {"run": RunConfig.model_validate(born_again(2)).model_dump(mode="json"),
            "teacher_records": [images_teacher]}
    straight, resumed, last = straight_and_resumed(loop, tmp_path, stop_at)
    assert [m["epoch"] for m in resumed.reports] == list(range(stop_at + 1, 5))
    for k in ("val_accuracy", "loss_kd", "val_accuracy_gen1"):
        assert last[k] == pytest.approx(straight.reports[-1][k], rel=1e-6), k


def test_kdray_check_runs_every_dml_peer_on_the_data_and_names_the_one_that_fails():
    from kdray.check import dry_run

    ok = {"dataset": {"name": "test_images"}, "student": {"name": "small_cnn"},
          "scheme": {"type": "dml", "peers": [{"name": "mlp"}, {"name": "resnet8"}]}}
    report = dry_run(RunConfig.model_validate(ok))
    assert [n for n, _ in report.peers] == ["mlp", "resnet8"] and all(p > 0 for _, p in report.peers)
    bad = {**ok, "scheme": {"type": "dml", "peers": [{"name": "mlp"}, {"name": "test_cnn1d"}]}}  # 1-D on images
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate(bad), file="run.yaml")
    assert e.value.fields == ["scheme.peers.1.name"]


def test_sweep_choices_may_name_a_scheme_with_run_level_keys(tmp_path):
    from kdray.config import load_config
    from kdray.sweep.space import SearchSpace

    path = tmp_path / "s.yaml"
    path.write_text("""
name: s
base: {dataset: {name: test_blobs}, teacher: {checkpoint: t.pt}, student: {name: test_mlp}, train: {epochs: 3}}
space:
  knowledge:
    dml: {scheme.peers: [{name: mlp}], ce_weight: {type: float, low: 0.5, high: 1.0}}
    born_again+kd: {scheme.generations: 2, temperature: 2}
    born_again: {}
""")
    with pytest.raises(ConfigError) as e:  # born_again alone has nothing to pass on
        load_config(path, SearchSpace)
    assert e.value.fields == ["space.knowledge.born_again"]
    path.write_text(path.read_text().replace("    born_again: {}\n", ""))
    space = load_config(path, SearchSpace)
    dml = space.resolve({"knowledge": "dml", "dml:ce_weight": 0.7})
    assert (dml.scheme.type, dml.teacher, dml.ce_weight, [p.name for p in dml.scheme.peers]) == ("dml", None, 0.7,
                                                                                                 ["mlp"])
    ban = space.resolve({"knowledge": "born_again+kd"})
    assert (ban.scheme.generations, ban.knowledge[0]["temperature"], ban.knowledge_label) == (2, 2, "born_again+kd")
    assert space.max_epochs == 6  # ASHA's max_t: two generations of three epochs
