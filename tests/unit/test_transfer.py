"""Unlabelled training samples (a transfer set): which labels are hidden and which samples join, derived here; the
cross-entropy over the labelled samples only (an all-unlabelled batch trains on the knowledge terms alone, never NaN);
the teacher's own share of labels; and the combinations that need every label, refused naming the field."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.teachers import teacher_run_config


def test_a_seeded_tenth_of_the_training_labels_is_kept_and_nothing_else_changes():
    full = load_dataset(DatasetConfig.model_validate({"name": "digits"}))
    part = load_dataset(DatasetConfig.model_validate({"name": "digits", "labelled_fraction": 0.1}))
    again = load_dataset(DatasetConfig.model_validate({"name": "digits", "labelled_fraction": 0.1}))
    kept = part.train.y != -100
    assert int(kept.sum()) == round(0.1 * len(full.train))
    assert torch.equal(part.train.y[kept], full.train.y[kept]) and torch.equal(part.train.x, full.train.x)
    assert torch.equal(again.train.y, part.train.y)  # seeded
    for split in ("val", "test"):  # selection and final see every label
        assert torch.equal(getattr(part, split).y, getattr(full, split).y)
    assert part.fingerprint != full.fingerprint  # a teacher-output cache of one is never read for the other


def test_a_transfer_set_joins_the_training_split_unlabelled():
    base = load_dataset(DatasetConfig.model_validate({"name": "digits"}))
    extra = load_dataset(DatasetConfig.model_validate({"name": "digits", "split_seed": 3}))
    both = load_dataset(DatasetConfig.model_validate({"name": "digits", "transfer": {"name": "digits",
                                                                                       "split_seed": 3}}))
    n = len(base.train)
    held = {r.numpy().tobytes() for r in torch.cat([base.val.x, base.test.x])}
    pool = torch.cat([extra.train.x, extra.val.x])
    kept = pool[torch.tensor([r.numpy().tobytes() not in held for r in pool])]
    # the same source split another way: its samples that are this split's validation ones never train
    assert 0 < len(kept) < len(pool) and len(both.train) == n + len(kept)
    assert torch.equal(both.train.y[:n], base.train.y) and (both.train.y[n:] == -100).all()
    assert torch.equal(both.train.x[n:], kept) and both.details["transfer"] == len(kept)
    with pytest.raises(ValueError, match="shape"):
        load_dataset(DatasetConfig.model_validate({"name": "digits", "transfer": {"name": "mnist1d"}}))
    with pytest.raises(ValueError, match="shape"):  # images against rows of floats: refused
        load_dataset(DatasetConfig.model_validate({"name": "test_blobs", "transfer": {"name": "test_images"}}))
    with pytest.raises(ValueError, match="no labels to hide"):
        load_dataset(DatasetConfig.model_validate({"name": "synthetic_lm", "labelled_fraction": 0.5}))


def test_the_cross_entropy_is_the_mean_over_the_labelled_samples_and_kd_is_over_all():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([2, -100, 0, -100, -100, 4])
    obj = DistillObjective.from_specs([{"type": "kd", "temperature": 2.0}], ModelLayout((), ""), ModelLayout((), ""))
    obj.partial_labels = True
    terms = obj(TapOutputs(zs, {}), TapOutputs(zt, {}), y)
    want = -(torch.log_softmax(zs, 1)[[0, 2, 5], [2, 0, 4]]).mean()
    assert terms["ce"].item() == pytest.approx(want.item(), rel=1e-6)
    kd = KNOWLEDGE.get("kd")(temperature=2.0)(zs, zt)  # every sample, labelled or not
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    none = obj(TapOutputs(zs, {}), TapOutputs(zt, {}), torch.full((6,), -100))
    assert none["ce"].item() == 0.0 and torch.isfinite(none["loss"])
    assert F.cross_entropy(zs, torch.full((6,), -100)).isnan()  # what PyTorch's own mean would have given


def test_the_teacher_kdray_trains_learns_from_its_own_share_of_labels_without_the_transfer_set():
    run = {"dataset": {"name": "digits", "labelled_fraction": 0.1, "transfer": {"name": "digits", "split_seed": 3}},
           "student": {"name": "digits_mlp"}, "knowledge": [{"type": "kd"}],
           "teacher": {"train": {"model": {"name": "digits_cnn"}, "labelled_fraction": 1.0}}}
    t = teacher_run_config(RunConfig.model_validate(run))
    assert t.dataset.labelled_fraction == 1.0 and t.dataset.transfer is None
    run["teacher"]["train"].pop("labelled_fraction")
    assert teacher_run_config(RunConfig.model_validate(run)).dataset.labelled_fraction == 0.1


@pytest.mark.parametrize("extra, field", [
    ({"knowledge": [{"type": "dkd"}]}, "knowledge.0.type"),
    ({"knowledge": [{"type": "crd", "negatives": "other_class"}]}, "knowledge.0.negatives"),
    ({"scheme": {"type": "dml", "peers": [{"name": "digits_mlp"}]}, "teacher": None}, "dataset.labelled_fraction"),
])
def test_what_needs_every_label_is_refused_naming_the_field(extra, field):
    run = {"dataset": {"name": "digits", "labelled_fraction": 0.1}, "student": {"name": "digits_mlp"},
           "teacher": {"train": {"model": {"name": "digits_cnn"}}}, **extra}
    run = {k: v for k, v in run.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        RunConfig.model_validate(run)
    assert field in str(e.value)
