"""``resources.strategy: fsdp``: what ``kdray check`` refuses with it, naming the field, and what it accepts."""
from __future__ import annotations

import pytest

from kdray.check import dry_run
from kdray.config import ConfigError, RunConfig

TINY = {"layers": 1, "hidden": 32, "heads": 2}


def lm_cfg(**over) -> RunConfig:
    base = {"dataset": {"name": "synthetic_lm"}, "teacher": {"name": "tiny_llama", "options": TINY},
            "student": {"name": "tiny_llama", "options": TINY}, "knowledge": [{"type": "tkd"}],
            "resources": {"num_workers": 2, "strategy": "fsdp"}}
    return RunConfig.model_validate({**base, **over})


@pytest.mark.parametrize("over,field,words", [
    ({"dataset": {"name": "mnist1d"}, "student": {"name": "mlp"}, "teacher": {"name": "mlp"},
      "knowledge": [{"type": "kd"}]}, "resources.strategy", "classifiers"),
    ({"student": {"name": "tiny_llama", "options": TINY, "peft": {"r": 4}}}, "student.peft", "LoRA"),
    ({"teacher": None, "knowledge": [], "scheme": {"type": "dml", "peers": [{"name": "tiny_llama", "options": TINY}]}},
     "scheme.type", "dml"),
    ({"scheme": {"type": "born_again", "generations": 2}}, "scheme.type", "born_again"),
    ({"train": {"precision": "fp16"}}, "train.precision", "bf16"),
])
def test_check_refuses_what_fsdp_cannot_shard_naming_the_field(over, field, words):
    with pytest.raises(ConfigError) as e:
        dry_run(lm_cfg(**over), file="run.yaml")
    assert e.value.fields == [field] and words in str(e.value), str(e.value)


def test_check_accepts_a_sharded_causal_lm_and_says_when_one_worker_has_nothing_to_shard():
    assert dry_run(lm_cfg(), file="run.yaml").knowledge == "tkd"
    notes = dry_run(lm_cfg(resources={"num_workers": 1, "strategy": "fsdp"}), file="run.yaml").notes
    assert any("nothing to shard" in n for n in notes), notes


def test_an_unknown_strategy_is_refused_naming_the_field():
    with pytest.raises(Exception) as e:
        lm_cfg(resources={"strategy": "zero3"})
    assert "strategy" in str(e.value) and "fsdp" in str(e.value)


def test_a_sweep_cannot_trade_accuracy_against_a_sharded_students_latency():
    """A sharded student's latency is not measured: a sweep with it as the second objective would have no value."""
    from kdray.sweep.space import SearchSpace

    space = {"name": "s", "metric": "val_nll", "base": {"dataset": {"name": "lm_tasks"},
                                                        "student": {"name": "tiny_llama"},
                                                        "resources": {"num_workers": 2, "strategy": "fsdp"}},
             "space": {"knowledge": {"none": {}}}, "scheduler": {"type": "fifo"}}
    SearchSpace.model_validate({**space, "objectives": ["val_nll", "student_params"]})  # accepted
    with pytest.raises(ConfigError) as e:
        SearchSpace.model_validate({**space, "objectives": ["val_nll", "latency_ms"]})
    assert e.value.fields == ["objectives"] and "not measured" in str(e.value)
