"""The shared teacher-output cache: same losses as the live teacher, keyed by sample index, never stale."""
from __future__ import annotations

import copy

import pytest
import torch

from kdray.cache import TeacherOutputs, build_cache
from kdray.config import DatasetConfig
from kdray.data import Batches, load_dataset
from kdray.knowledge import DistillObjective, ModelLayout
from kdray.models import FeatureTaps, Preprocess, Teacher, build_model

LAYERS = ["block2", "block3", "flatten"]


@pytest.fixture(scope="module")
def setup(mnist1d_teacher):
    data = load_dataset(DatasetConfig(name="mnist1d"))
    cache = build_cache([mnist1d_teacher], data, LAYERS, max_bytes=2**30)
    return data, cache


def live(record):
    t = Teacher.from_records([record])
    t.tap(LAYERS)
    return t


def test_cached_and_live_outputs_give_the_same_losses_on_the_same_samples(setup, mnist1d_teacher):
    data, cache = setup
    assert cache.dtype == "float32" and set(cache.features) == set(LAYERS) and len(cache) == len(data.train)
    teacher = live(mnist1d_teacher)
    cached = TeacherOutputs.create(teacher, cache, [mnist1d_teacher], data, LAYERS, torch.device("cpu"))
    assert cached.source == "cache"
    student = build_model("mnist1d_mlp", 10, Preprocess((1, 40)))
    specs = [{"type": "kd", "temperature": 4.0}, {"type": "fitnet", "teacher_layer": "block2"},
             {"type": "rkd"}, {"type": "at", "teacher_layers": ["block3"], "student_layers": ["block2"]}]
    obj = DistillObjective.from_specs(specs, ModelLayout.of(teacher.members[0]), ModelLayout.of(student))
    taps = FeatureTaps(student.net, obj.student_layers)
    batches = Batches(data.train, 100, train=True, seed=5)  # shuffled: positions differ from sample indices
    batches.set_epoch(3)
    for i, (idx, x, y) in enumerate(batches):
        t_live, t_cached = teacher(x), cached(idx, x)
        torch.testing.assert_close(t_cached.logits, t_live.logits, rtol=1e-5, atol=1e-5)
        s = taps.run(student, x)
        if i == 0:
            obj.bind(t_live.features, s.features)
        a, b = obj(s, t_live, y), obj(s, t_cached, y)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        if i == 3:
            break


def test_changing_the_teacher_weights_invalidates_the_cache(setup, mnist1d_teacher):
    data, cache = setup
    changed = copy.deepcopy(mnist1d_teacher)
    changed["state_dict"]["net.fc.bias"] = changed["state_dict"]["net.fc.bias"] + 0.01
    out = TeacherOutputs.create(live(changed), cache, [changed], data, LAYERS, torch.device("cpu"))
    assert out.source == "live" and "stale" in out.reason


def test_other_data_or_augmentation_or_missing_layers_run_the_teacher_live(setup, mnist1d_teacher):
    data, cache = setup
    other = load_dataset(DatasetConfig(name="mnist1d", split_seed=1))
    assert TeacherOutputs.create(live(mnist1d_teacher), cache, [mnist1d_teacher], other, LAYERS,
                                 torch.device("cpu")).reason.startswith("stale")
    augmented = copy.copy(data)
    augmented.augment = lambda x, idx, key: x
    assert "augmentation" in TeacherOutputs.create(live(mnist1d_teacher), cache, [mnist1d_teacher], augmented,
                                                   LAYERS, torch.device("cpu")).reason
    assert "not cached" in TeacherOutputs.create(live(mnist1d_teacher), cache, [mnist1d_teacher], data,
                                                 ["block1"], torch.device("cpu")).reason


def test_the_cache_fits_its_memory_budget_exactly(mnist1d_teacher):
    data = load_dataset(DatasetConfig(name="mnist1d"))
    full = build_cache([mnist1d_teacher], data, LAYERS, max_bytes=2**40)
    assert full.dtype == "float32" and set(full.features) == set(LAYERS)
    exact = build_cache([mnist1d_teacher], data, LAYERS, max_bytes=full.nbytes)  # fits to the byte
    assert exact.dtype == "float32" and exact.nbytes == full.nbytes
    half = build_cache([mnist1d_teacher], data, LAYERS, max_bytes=full.nbytes - 1)
    assert half.dtype == "float16" and half.nbytes <= full.nbytes - 1
    logits_only = build_cache([mnist1d_teacher], data, LAYERS, max_bytes=full.logits.nbytes)
    assert logits_only.features == {} and logits_only.nbytes == full.logits.nbytes
    assert build_cache([mnist1d_teacher], data, LAYERS, max_bytes=full.logits.nbytes - 1) is None


def test_fp16_features_stay_within_half_precision_of_live(mnist1d_teacher):
    data = load_dataset(DatasetConfig(name="mnist1d"))
    small = build_cache([mnist1d_teacher], data, LAYERS,
                        max_bytes=len(data.train) * (10 * 4 + 500 * 2 + 2 * 125 * 2) + 100)
    assert small.dtype == "float16"
    out = TeacherOutputs.create(live(mnist1d_teacher), small, [mnist1d_teacher], data, LAYERS, torch.device("cpu"))
    idx = torch.arange(50)
    ref = live(mnist1d_teacher)(data.train.x[idx])
    got = out(idx, data.train.x[idx])
    torch.testing.assert_close(got.features["block2"], ref.features["block2"], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)  # logits stay float32
