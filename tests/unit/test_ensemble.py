"""Weighted ensembles of teachers: each rule against its formula computed here (a confidence weight worked by hand),
the shared cache giving what the live ensemble gives under every rule (it keeps each member's logits), the feature
knowledge tapping the chosen member, and the configurations that cannot work refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import train_record

from kdray.cache import TeacherOutputs, build_cache
from kdray.config import DatasetConfig, RunConfig
from kdray.data import Batches, load_dataset
from kdray.models import Teacher
from kdray.models.checkpoint import combine


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    base = {"dataset": {"name": "test_blobs"}, "student": {"name": "test_cnn1d"},
            "train": {"epochs": 4, "batch_size": 64, "lr": 0.01}}
    return [train_record({**base, "seed": s}, tmp_path_factory.mktemp(f"m{s}")) for s in (1, 2)]


def test_each_rule_is_its_formula():
    z1, z2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert torch.allclose(combine([z1, z2], "mean"), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(combine([z1, z2], "fixed", [3.0, 1.0]), torch.tensor([[1.5, 0.0]]))
    # member 1 is sure of class 0 with p = e^2 / (e^2 + 1) = 0.8808, member 2 gives 0.5: weights 0.638 / 0.362
    p1 = math.exp(2) / (math.exp(2) + 1)
    w1 = p1 / (p1 + 0.5)
    assert torch.allclose(combine([z1, z2], "confidence"), torch.tensor([[2.0 * w1, 0.0]]))
    assert w1 == pytest.approx(0.638, abs=1e-3)


@pytest.mark.parametrize("rule, weights", [("mean", None), ("fixed", [0.2, 0.8]), ("confidence", None)])
def test_the_shared_cache_gives_what_the_live_ensemble_gives_under_every_rule(members, rule, weights):
    data = load_dataset(DatasetConfig(name="test_blobs"))
    cache = build_cache(members, data, [], max_bytes=2**30)
    assert cache.members.shape == (len(data.train), 2, cache.logits.shape[1])
    live = Teacher.from_records(members, rule, weights)
    cached = TeacherOutputs.create(live, cache, members, data, [], torch.device("cpu"))
    assert cached.source == "cache"
    for idx, x, _ in Batches(data.train, 64, train=True, seed=3):
        torch.testing.assert_close(cached(idx, x).logits, live(x).logits, rtol=1e-5, atol=1e-5)
        m = [r(x) for r in live.members]
        torch.testing.assert_close(live(x).logits, combine(m, rule, weights))
    if rule != "mean":  # the rule matters: not the mean
        assert not torch.allclose(live(x).logits, combine(m, "mean"), atol=1e-3)


def test_feature_knowledge_taps_the_chosen_member_and_a_cache_of_another_members_maps_is_not_read(members):
    data = load_dataset(DatasetConfig(name="test_blobs"))
    x = data.train.x[:8]
    t = Teacher.from_records(members, feature_member=1)
    t.tap(["block2"])
    own = Teacher.from_records(members[1:])
    own.tap(["block2"])
    torch.testing.assert_close(t(x).features["block2"], own(x).features["block2"])
    cache = build_cache(members, data, ["block2"], max_bytes=2**30)  # member 0's maps
    out = TeacherOutputs.create(t, cache, members, data, ["block2"], torch.device("cpu"))
    assert out.source == "live" and "another ensemble member" in out.reason


@pytest.mark.parametrize("ensemble, match", [
    ({"rule": "fixed"}, "weights"),
    ({"rule": "mean", "weights": [1, 1]}, "weights"),
    ({"rule": "fixed", "weights": [1, 1, 1]}, "3 weights for 2"),
    ({"feature_member": 2}, "feature_member"),
])
def test_an_ensemble_that_cannot_work_is_refused(ensemble, match):
    run = {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd"}],
           "teacher": {"checkpoint": ["a.pt", "b.pt"], "ensemble": ensemble}}
    with pytest.raises(Exception, match=match):
        RunConfig.model_validate(run)


def test_a_sweep_searches_the_rule():
    from kdray.sweep.space import SearchSpace

    space = SearchSpace.model_validate({
        "name": "ens", "base": {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                "teacher": {"checkpoint": ["a.pt", "b.pt"]}},
        "space": {"teacher.ensemble.rule": {"type": "categorical", "choices": ["mean", "confidence"]},
                  "knowledge": {"kd": {}}}})
    cfg = space.resolve({"knowledge": "kd", "teacher.ensemble.rule": "confidence"})
    assert cfg.teacher.ensemble.rule == "confidence"



def test_a_sweep_keeps_each_members_logits_only_when_some_trial_combines_them_by_another_rule(members):
    """M members' logits are M times the cache's logits: kept when the base's rule, or one the space sets or searches,
    is not the mean; a sweep whose every trial averages holds the mean alone, and its trials read it."""
    from kdray.sweep.space import SearchSpace
    from kdray.sweep.teacher_outputs import combines_members

    def space(teacher: dict, extra: dict) -> SearchSpace:
        return SearchSpace.model_validate({
            "name": "ens", "base": {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                    "teacher": {"checkpoint": ["a.pt", "b.pt"], **teacher}},
            "space": {**extra, "knowledge": {"kd": {}}}})

    searched = {"teacher.ensemble.rule": {"type": "categorical", "choices": ["mean", "confidence"]}}
    cases = [({}, {}, False), ({"ensemble": {"rule": "confidence"}}, {}, True), ({}, searched, True),
             ({}, {"teacher.ensemble.rule": "mean"}, False)]
    for teacher, extra, want in cases:
        sp = space(teacher, extra)
        assert combines_members(sp, sp.resolve({"knowledge": "kd"})) is want, (teacher, extra)
    data = load_dataset(DatasetConfig(name="test_blobs"))
    both, mean = build_cache(members, data, [], max_bytes=2**30), build_cache(members, data, [], 2**30, members=False)
    assert mean.members is None and both.members.shape == (len(data.train), 2, data.info.num_classes)
    assert mean.nbytes == both.nbytes - both.members.nbytes and "every trial averages them" in mean.note
    np.testing.assert_array_equal(mean.logits, both.logits)
    out = TeacherOutputs.create(Teacher.from_records(members), mean, members, data, [], torch.device("cpu"))
    assert out.source == "cache"

def test_a_cache_too_small_for_every_members_logits_keeps_the_mean_and_another_rule_runs_live(members):
    data = load_dataset(DatasetConfig(name="test_blobs"))
    full = build_cache(members, data, [], max_bytes=2**30)
    small = build_cache(members, data, [], max_bytes=full.logits.nbytes * 2 + 1)  # the members need 2x the logits
    assert small is not None and small.members is None and "mean only" in small.note
    live = Teacher.from_records(members, "confidence")
    out = TeacherOutputs.create(live, small, members, data, [], torch.device("cpu"))
    assert out.source == "live" and "mean only" in out.reason
    mean = TeacherOutputs.create(Teacher.from_records(members), small, members, data, [], torch.device("cpu"))
    assert mean.source == "cache"


def test_a_born_again_run_of_an_ensemble_teacher_with_a_feature_member_reaches_its_second_generation(members,
                                                                                                    tmp_path):
    """From generation 2 the teacher is one record (the generation before): the ensemble's settings no longer apply."""
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    run = RunConfig.model_validate({
        "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd"}],
        "teacher": {"checkpoint": ["a.pt", "b.pt"], "ensemble": {"rule": "fixed", "weights": [1, 3],
                                                                  "feature_member": 1}},
        "scheme": {"type": "born_again", "generations": 2}, "train": {"epochs": 1, "batch_size": 64}})
    last = train_run({"run": run.model_dump(mode="json"), "teacher_records": members},
                     Session(checkpoint_root=tmp_path))
    assert last["generation"] == 2 and not last.get("failed")
