"""Search spaces: every shipped one loads and dry-runs; malformed ones fail naming file and field."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from kdray.config import ConfigError
from kdray.sweep.space import NONE, check_space, load_space

SPACES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))
BIG = {"CPU": 64.0, "GPU": 8.0}  # the GPU-scale spaces are checked against a cluster, not this laptop


def test_the_shipped_spaces_are_all_there():
    names = {p.name for p in SPACES}
    assert {"default.yaml", "digits.yaml", "cifar10_resnet56_resnet20.yaml",
            "cifar100_resnet32x4_resnet8x4.yaml"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_dry_runs(path):
    space = check_space(path, BIG)
    # at least 3 kinds of knowledge against labels only: knowledge choices, or a language model's divergences
    divergences = sum(len(d.choices) - 1 for sub in space.choices.values() for k, d in sub.items()
                      if k.endswith(".divergence") and getattr(d, "choices", None))
    assert NONE in space.choices and len(space.choices) - 1 + divergences >= 3
    for point in space.representative_points():
        cfg = space.resolve(point)
        assert cfg.knowledge_label == point["knowledge"]


def test_gpu_spaces_search_the_published_ranges():
    space = load_space(SPACES[[p.name for p in SPACES].index("cifar100_resnet32x4_resnet8x4.yaml")])
    t = space.choices["kd"]["kd.temperature"]
    assert (t.low, t.high, t.log) == (1, 20, True)
    for key, default in (("fitnet.weight", 100), ("at.weight", 1000), ("sp.weight", 3000)):
        d = space.choices[key.split(".")[0]][key]
        assert d.log and d.high / d.low >= 10 and d.low <= default <= d.high


def test_define_by_run_gives_each_choice_its_own_conditional_parameters():
    space = load_space(SPACES[[p.name for p in SPACES].index("default.yaml")])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = {}
    for _ in range(40):
        trial = study.ask()
        fixed = space.define_by_run(trial)
        params = {**trial.params, **fixed}
        seen[params["knowledge"]] = params
        cfg = space.resolve(params)
        assert cfg.knowledge_label == params["knowledge"]
        study.tell(trial, 0.5)
    assert set(seen) == set(space.choices)
    run_level = {"knowledge", "train.lr", "student.options.width"}  # the default space searches its student too
    assert all(k in run_level or k.startswith("kd:") for k in seen["kd"])
    assert not any(k.startswith("kd:") for k in seen["none"])


def test_none_is_added_when_a_space_forgets_it(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "base": {"dataset": {"name": "test_blobs"},
                                                       "student": {"name": "test_mlp"},
                                                        "teacher": {"train": {"model": {"name": "test_cnn1d"}}}},
                                 "space": {"knowledge": {"kd": {"kd.temperature": 3.0}}}}))
    assert list(load_space(p).choices) == ["none", "kd"]


def write(tmp: Path, data) -> Path:
    p = tmp / "space.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


BASE = {"name": "bad", "base": {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                "teacher": {"train": {"model": {"name": "test_cnn1d"}}}}}


@pytest.mark.parametrize("space,field", [
    ({"knowledge": {"kd": {"kd.temperature": {"type": "float", "low": 0, "high": 4}}}},
     "space.knowledge.kd.kd.temperature"),
    ({"knowledge": {"kd": {"kd.temperature": {"type": "float", "low": 4, "high": 1}}}},
     "space.knowledge.kd.kd.temperature"),
    ({"knowledge": {"kd": {"kd.temperature": {"type": "float", "low": -1, "high": 4, "log": True}}}},
     "space.knowledge.kd.kd.temperature"),
    ({"knowledge": {"kd": {"kd.tempreture": 3.0}}}, "space.knowledge.kd"),
    ({"knowledge": {"kdd": {}}}, "space.knowledge.kdd"),
    ({"knowledge": {"kd": {"at.weight": 10.0}}}, "space.knowledge.kd.at.weight"),
    ({"knowledge": {"kd": {"kd.temperature": {"type": "categorical", "choices": []}}}},
     "space.knowledge.kd.kd.temperature"),
    ({"train.lrr": {"type": "float", "low": 0.1, "high": 1.0}}, "space.train.lrr"),
    ({"knowledge": {"fitnet": {"fitnet.student_layer": "block9"}}}, "space.knowledge.fitnet.fitnet.student_layer"),
    # the teacher-output cache is one per sweep: a choice's own cache settings would be ignored
    ({"knowledge": {"kd": {"cache.max_bytes": 1000}}}, "space.knowledge.kd.cache.max_bytes"),
    ({"cache.top_k": {"type": "int", "low": 2, "high": 8}}, "space.cache.top_k"),
])
def test_a_malformed_space_names_file_and_field(tmp_path, space, field):
    p = write(tmp_path, {**BASE, "space": space})
    with pytest.raises(ConfigError) as e:
        check_space(p)
    assert str(p) in str(e.value)
    assert any(f.startswith(field) for f in e.value.fields), (e.value.fields, str(e.value))


def test_a_relative_data_dir_is_made_absolute_where_the_space_is_read(tmp_path, monkeypatch):
    """Tune runs each trial in a folder of its own: a relative ``dataset.data_dir`` would name another folder in
    every trial (a download per trial, or a data set not found). It is made absolute while the space is read: next
    to the space file when the folder is there, else in the working directory."""
    import yaml
    from sweep_helpers import TINY_SPACE

    from kdray.config import RunConfig
    from kdray.sweep.space import load_space

    (tmp_path / "spaces" / "data").mkdir(parents=True)
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["base"]["dataset"]["data_dir"] = "data"
    (tmp_path / "spaces" / "s.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    loaded = load_space(tmp_path / "spaces" / "s.yaml")
    want = str(tmp_path / "spaces" / "data")
    assert loaded.base["dataset"]["data_dir"] == want
    trial_dir = tmp_path / "a-trial-folder"
    trial_dir.mkdir()
    monkeypatch.chdir(trial_dir)  # where Tune runs a trial, which resolves its config there
    assert loaded.resolve({"knowledge": "none"}).dataset.data_dir == want
    # a folder that does not exist yet (a download's target) is placed in the working directory
    assert RunConfig.model_validate({"dataset": {"name": "test_blobs", "data_dir": "later"},
                                    "student": {"name": "test_mlp"}}).dataset.data_dir == str(
        trial_dir / "later")
