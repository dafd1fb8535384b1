"""LoRA students (``student.peft``): only the adapters train, the frozen weights are the student's initial ones, the
delivered record is W + (α/r)·BA computed here from the checkpoint's own adapter tensors and loads in a process where
peft cannot be imported, a resumed run ends where a straight one ends, and ``kdray check`` names the field of what
cannot work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sweep_helpers import straight_and_resumed

from kdray.check import dry_run
from kdray.config import ConfigError, RunConfig, TeacherRunConfig
from kdray.models import Preprocess, build_model, model_from_record
from kdray.runfiles import STATE_FILE, STUDENT_FILE
from kdray.train.loop import train_run
from kdray.train.session import Session
from kdray.train.setup import seeded_init

TINY = {"layers": 1, "hidden": 32, "heads": 2}
RUN = {"dataset": {"name": "lm_tasks", "options": {"train_examples": 300, "test_examples": 30}}, "seed": 5,
       "student": {"name": "tiny_llama", "options": TINY, "peft": {"r": 4, "alpha": 8, "target_modules": ["q_proj",
                                                                                                         "v_proj"]}},
       "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.01}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    cfg = RunConfig.model_validate(RUN)
    session = Session(checkpoint_root=tmp_path_factory.mktemp("lora"))
    last = train_run({"run": cfg.model_dump(mode="json")}, session)
    record = torch.load(session.last_checkpoint / STUDENT_FILE, weights_only=True)
    state = torch.load(session.last_checkpoint / STATE_FILE, weights_only=True)["student"]
    return cfg, last, record, state


def test_only_the_adapters_train_and_the_rest_stays_the_initial_student(lora_run):
    cfg, _, _, state = lora_run
    with seeded_init(cfg.seed):  # the student as the run built it, before its adapters
        init = build_model("tiny_llama", 17, Preprocess((12,), passthrough=True), TINY).state_dict()
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in lora} == {"q_proj", "v_proj"}
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".lora_B." in k)  # B starts at 0: it trained
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert base.keys() == init.keys()
    for k, v in init.items():
        assert torch.equal(base[k], v), k


def test_the_record_is_the_merged_model_and_loads_without_peft(lora_run, tmp_path):
    _, last, record, state = lora_run
    assert not any("lora" in k or "base_layer" in k for k in record["state_dict"])
    scale = 8 / 4  # alpha / r
    for key, w in record["state_dict"].items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            stem = key[:-len(".weight")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            want = state[f"{stem}.base_layer.weight"] + scale * (b @ a)
            torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-7)
    # the cost is the delivered model's: the plain student's parameters, no adapters
    assert last["student_params"] == sum(p.numel() for p in model_from_record(record).parameters())
    path = tmp_path / "student.pt"
    torch.save(record, path)
    x = torch.tensor([[0, 0, 14, 3, 4, 12, 5, 6, 13, 2, 3, 4]])
    code = ("import sys, torch; sys.modules['peft'] = None\n"
            "from kdray.models import model_from_record\n"
            f"net = model_from_record(torch.load({str(path)!r}, weights_only=True)).eval()\n"
            f"print(net(torch.tensor({x.tolist()})).sum().item())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    with torch.no_grad():
        assert float(p.stdout.strip().splitlines()[-1]) == pytest.approx(
            model_from_record(record).eval()(x).sum().item(), rel=1e-5)


def test_a_resumed_lora_run_ends_where_a_straight_one_ends(tmp_path):
    run = RunConfig.model_validate({**RUN, "train": {**RUN["train"], "epochs": 3}}).model_dump(mode="json")
    straight, resumed, _ = straight_and_resumed({"run": run}, tmp_path, stop_after=1)
    a = torch.load(Path(straight.last_checkpoint) / STATE_FILE, weights_only=True)["student"]
    b = torch.load(Path(resumed.last_checkpoint) / STATE_FILE, weights_only=True)["student"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0)


def test_lora_where_it_cannot_work_is_refused_naming_the_field():
    teacher = {"train": {"model": {"name": "tiny_llama", "options": TINY, "peft": {"r": 2}}}}
    with pytest.raises(ConfigError, match="teacher.train.model.peft"):
        RunConfig.model_validate({**RUN, "teacher": teacher, "knowledge": [{"type": "tkd"}]})
    with pytest.raises(ConfigError, match="model.peft"):
        TeacherRunConfig.model_validate({"dataset": RUN["dataset"], "model": RUN["student"]})
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate({"dataset": {"name": "test_blobs"},
                                          "student": {"name": "test_mlp", "peft": {"r": 2}}}))
    assert "student.peft" in str(e.value) and "Hugging Face" in str(e.value)
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate({**RUN, "student": {**RUN["student"],
                                                              "peft": {"target_modules": ["nope_proj"]}}}))
    assert "student.peft.target_modules" in str(e.value)


def test_a_teacher_stored_before_student_options_existed_is_still_found():
    """The stored teacher's name is keyed by its config: a field added for students (``peft``) must not rename every
    teacher a sweep trained before, or each would be trained again. The name below is the one kdray gave this
    config before ``peft`` existed (at 39d1c8d)."""
    from kdray.teachers import trained_teacher_path

    cfg = RunConfig.model_validate({
        "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"}, "knowledge": [{"type": "kd"}],
        "teacher": {"train": {"model": {"name": "test_cnn1d"}, "train": {"epochs": 6, "batch_size": 64, "lr": 0.01}}}})
    assert trained_teacher_path(cfg, "/runs", "abc") == "/runs/teachers/test_cnn1d-39b839cdf12d.pt"


def test_lora_on_a_classifier_or_on_the_embeddings_is_refused(tmp_path):
    """A Hugging Face classifier's head is new: frozen under LoRA it would stay random. An adapter on the embeddings or
    the head would never reach kdray's chunked loss (it reads the head's weight itself)."""
    from transformers import BertConfig, BertForSequenceClassification

    from kdray.models.lora import LoraUnavailable, apply_lora

    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=50, num_labels=3)
                                  ).save_pretrained(tmp_path / "bert")
    clf = build_model(f"hf/{tmp_path / 'bert'}", 3, Preprocess((8,), passthrough=True))
    with pytest.raises(LoraUnavailable, match="classifier's new head"):
        apply_lora(clf.net, 2, 4.0, 0.0, "all-linear")
    with pytest.raises(ConfigError) as e:
        dry_run(RunConfig.model_validate({**RUN, "student": {**RUN["student"],
                                                              "peft": {"target_modules": ["embed_tokens"]}}}))
    assert "student.peft.target_modules" in str(e.value) and "embeddings" in str(e.value)
