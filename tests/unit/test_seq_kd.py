"""Sequence-level KD (``scheme: seq_kd``): the training rows become the teacher's greedy answers, derived here from a
teacher whose answers are known; a student trained that way reproduces its teacher's answers (even wrong ones) while
validation keeps the data's; and what cannot work is refused naming the field."""
from __future__ import annotations

import pytest
import torch
from test_on_policy import TINY, NextIsPlusOne

from kdray.check import dry_run
from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import Split, load_dataset
from kdray.data.lm_tasks import END
from kdray.knowledge.token import IGNORE
from kdray.models import Preprocess, build_model, model_record
from kdray.models.generate import complete
from kdray.train.loop import train_run
from kdray.train.seq_kd import teacher_rows
from kdray.train.session import Session

DATA = {"name": "lm_tasks", "options": {"tasks": ["copy"], "items": 3, "train_examples": 400, "test_examples": 40}}


def untrained_teacher():
    """The task data, a randomly initialised (seeded) tiny Llama that answers wrongly but deterministically, and its
    record."""
    data = load_dataset(DatasetConfig.model_validate(DATA))
    info = data.info
    torch.manual_seed(3)
    teacher = build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True), TINY).eval()
    return data, teacher, model_record(teacher, model_name="tiny_llama", model_options=TINY,
                                       num_classes=info.num_classes, dataset=DATA)


def test_the_rows_are_the_prompts_then_the_teachers_answer_up_to_its_end_token():
    x = torch.tensor([[3, 4, 9, 9, 9], [15, 16, 9, 9, 9]])
    rows = teacher_rows(NextIsPlusOne(), Split(torch.zeros_like(x), x, prompt_len=2), 2, END, pad=0, batch_size=1)
    # the teacher continues +1: 3 4 | 5 6 7 8 (no end); 15 16 | 0 1(end) then padding
    assert rows["x"].tolist() == [[3, 4, 5, 6, 7], [15, 16, 0, 1, 0]]
    assert rows["y"].tolist() == [[IGNORE, 5, 6, 7, 8], [IGNORE, 0, 1, IGNORE, IGNORE]]


def test_a_seq_kd_student_learns_its_teachers_answers_not_the_datas(tmp_path):
    """An untrained teacher answers wrongly but always the same way: the seq_kd student copies those answers (its
    greedy completions of validation prompts agree with the teacher's), so it never answers the data right."""
    data, teacher, rec = untrained_teacher()
    info = data.info
    run = RunConfig.model_validate({"dataset": DATA, "teacher": {"checkpoint": "unused.pt"}, "seed": 1,
                                    "student": {"name": "tiny_llama", "options": TINY}, "scheme": {"type": "seq_kd"},
                                    "train": {"epochs": 8, "batch_size": 32, "optimizer": "adamw", "lr": 0.01}})
    session = Session(checkpoint_root=tmp_path)
    last = train_run({"run": run.model_dump(mode="json"), "teacher_records": [rec]}, session)
    assert last["teacher_generations"] == "made here" and last["val_exact_match"] == 0.0
    from kdray.models import model_from_record
    from kdray.runfiles import STUDENT_FILE

    student = model_from_record(torch.load(session.last_checkpoint / STUDENT_FILE, weights_only=True)).eval()
    prompts = data.val.x[:, :info.prompt_len]
    n = data.val.x.shape[1] - info.prompt_len + 1
    want, _ = complete(teacher, prompts, n, eos=END)
    got, _ = complete(student, prompts, n, eos=END)
    assert (got == want).all(1).float().mean() > 0.9


def test_seq_kd_where_it_cannot_work_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="teacher"):
        RunConfig.model_validate({"dataset": DATA, "student": {"name": "tiny_llama", "options": TINY},
                                  "scheme": {"type": "seq_kd"}})
    packed = {"dataset": {"name": "synthetic_lm", "options": {"seq_len": 16}}, "scheme": {"type": "seq_kd"},
              "student": {"name": "tiny_llama", "options": TINY},
              "teacher": {"train": {"model": {"name": "tiny_llama", "options": TINY}}}}
    cfg = RunConfig.model_validate(packed)
    assert cfg.knowledge_label == "seq_kd"
    with pytest.raises(ConfigError) as e:
        dry_run(cfg)
    assert "scheme.type" in str(e.value) and "prompt" in str(e.value)


def test_a_sweeps_answers_for_other_data_are_not_used(tmp_path):
    """The rows a sweep shares carry the key of the teacher and data they answer; a trial whose data differ (a searched
    data option) makes its own instead of training on answers to other prompts."""
    data, teacher, rec = untrained_teacher()
    info = data.info
    rows = {**teacher_rows(teacher, data.train, info.prompt_len, END), "key": "another teacher or data"}
    run = RunConfig.model_validate({"dataset": DATA, "teacher": {"checkpoint": "unused.pt"},
                                    "student": {"name": "tiny_llama", "options": TINY}, "scheme": {"type": "seq_kd"},
                                    "train": {"epochs": 1, "batch_size": 64}})
    last = train_run({"run": run.model_dump(mode="json"), "teacher_records": [rec], "teacher_generations": rows},
                     Session(checkpoint_root=tmp_path))
    assert last["teacher_generations"].startswith("made here (the sweep's answers are for another")
