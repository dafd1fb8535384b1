"""On-policy distillation as users run it: 2 gloo ranks draw the same on-policy steps and learn what one process learns
on the whole batch; a sweep over off- and on-policy choices (λ, the divergence) and sequence-level KD (the teacher's
answers made once by the sweep, shared by its trials) on the generated task set selects on
validation exact match, and the registered champion, loaded with Hugging Face's own classes and completing the test
prompts with ``generate``, scores the test exact match kdray recorded."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request
from test_lm_training import run_group

from kdray.config import DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.data.lm_tasks import END, PAD, decode
from kdray.knowledge.token import IGNORE
from kdray.models import Preprocess, build_model, model_record
from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

TINY = {"layers": 1, "hidden": 32, "heads": 2}


def whole_batches(tmp_path, multiple: int = 8) -> dict:
    """A task set whose training split is a whole number of ``multiple`` rows (no partial batch on either side)."""
    for n in range(200, 400):
        spec = {"name": "lm_tasks", "options": {"train_examples": n, "test_examples": 50}, "data_dir": str(tmp_path)}
        if len(load_dataset(DatasetConfig.model_validate(spec)).train) % multiple == 0:
            return spec
    raise AssertionError("no example count gives whole batches")


@pytest.mark.slow
def test_two_gloo_ranks_take_the_same_on_policy_steps_and_learn_what_one_process_learns(tmp_path):
    """λ = 0.5 with greedy completions: a rank that drew another branch than the other at some step would train on
    other rows than the one process does there, and the weights would part. Normalised by the target tokens of both
    ranks (the student's own, on an on-policy step), one SGD epoch ends at the same weights and the same count of
    generated tokens."""
    dataset = whole_batches(tmp_path)
    torch.manual_seed(1)
    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    teacher = build_model("tiny_llama", info.num_classes, Preprocess(info.input_shape, passthrough=True),
                          {**TINY, "layers": 2})
    rec = model_record(teacher, model_name="tiny_llama", model_options={**TINY, "layers": 2},
                       num_classes=info.num_classes, dataset=dataset)

    def run(batch: int, workers: int) -> dict:
        return RunConfig.model_validate({
            "dataset": dataset, "teacher": {"checkpoint": "unused.pt"},
            "student": {"name": "tiny_llama", "options": TINY},
            "knowledge": [{"type": "tkd", "divergence": "jsd", "beta": 0.5}], "ce_weight": 0.5,
            "scheme": {"type": "on_policy", "lmbda": 0.5, "sampling": {"temperature": 0.0}},
            "train": {"epochs": 1, "batch_size": batch, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                      "scheduler": "none"},
            "resources": {"num_workers": workers}}).model_dump(mode="json")

    one = run_group(1, run(8, 1), [rec], tmp_path / "one")
    two = run_group(2, run(4, 2), [rec], tmp_path / "two")
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    a, b = one["reports"][-1], two["reports"][-1]
    assert 0.2 < a["on_policy_fraction"] < 0.8 and a["on_policy_fraction"] == b["on_policy_fraction"]
    assert a["generated_tokens"] == b["generated_tokens"] > 0
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_exact_match"] == b["val_exact_match"]



def test_a_runs_budget_in_tokens_counts_what_it_trained_on_and_what_it_generated_and_survives_a_resume(tmp_path):
    """``budget_tokens``: every target token trained on plus every token the student generated; ``budget_epochs``:
    that in epochs of the training split's target tokens. Off-policy, epoch e has spent e epochs' worth exactly; with
    every batch on-policy (λ = 1) each generated token is also a target, so an epoch spends twice what it generated.
    A run resumed from its first checkpoint reports the same spend at its second epoch as the run that went on."""
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    dataset = whole_batches(tmp_path)
    data = load_dataset(DatasetConfig.model_validate(dataset))
    per_epoch = int((data.train.y != IGNORE).sum())
    torch.manual_seed(1)
    teacher = build_model("tiny_llama", data.info.num_classes, Preprocess(data.info.input_shape, passthrough=True),
                          TINY)
    rec = model_record(teacher, model_name="tiny_llama", model_options=TINY, num_classes=data.info.num_classes,
                       dataset=dataset)

    def run(lmbda: float, root, resume=None) -> list[dict]:
        cfg = RunConfig.model_validate({
            "dataset": dataset, "teacher": {"checkpoint": "unused.pt"},
            "student": {"name": "tiny_llama", "options": TINY}, "knowledge": [{"type": "tkd"}],
            "scheme": {"type": "on_policy", "lmbda": lmbda, "sampling": {"temperature": 0.0}},
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "checkpoint_every": 1}})
        session = Session(checkpoint_root=root, resume_from=resume)
        train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [rec]}, session)
        return session.reports

    off = run(0.0, tmp_path / "off")
    assert [r["budget_tokens"] for r in off] == [per_epoch, 2 * per_epoch]
    assert [r["budget_epochs"] for r in off] == [1.0, 2.0]
    resumed = run(0.0, tmp_path / "again", resume=tmp_path / "off" / "checkpoint_000001")
    assert [r["epoch"] for r in resumed] == [2] and resumed[0]["budget_tokens"] == 2 * per_epoch
    on = run(1.0, tmp_path / "on")
    assert on[0]["on_policy_fraction"] == 1.0 and on[0]["generated_tokens"] > 0
    assert on[0]["budget_tokens"] == 2 * on[0]["generated_tokens"]
    assert on[1]["budget_tokens"] == on[0]["budget_tokens"] + 2 * on[1]["generated_tokens"]
    assert on[1]["budget_epochs"] == pytest.approx(on[1]["budget_tokens"] / per_epoch)
    # a run whose loss became non-finite reports what it spent up to and with its last epoch (the budget table
    # counts failed trials' tokens as their epochs)
    cfg = RunConfig.model_validate({
        "dataset": dataset, "student": {"name": "tiny_llama", "options": TINY},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": "sgd", "lr": 1e12, "momentum": 0.0,
                  "scheduler": "none"}})
    session = Session()
    failed = train_run({"run": cfg.model_dump(mode="json")}, session)
    assert "non-finite" in failed["failed"]
    assert failed["budget_tokens"] == failed["epoch"] * per_epoch and failed["budget_epochs"] == failed["epoch"]

SPACE = {
    "name": "tasks-lm", "metric": "val_exact_match", "num_samples": 6, "seed": 0, "min_trials_per_type": 1,
    "base": {
        "dataset": {"name": "lm_tasks", "options": {"tasks": ["copy", "sort"], "items": 4, "train_examples": 1500,
                                                    "test_examples": 100}},
        "teacher": {"train": {"model": {"name": "tiny_llama", "options": {**TINY, "layers": 2, "hidden": 64}},
                              "train": {"epochs": 6, "batch_size": 32, "optimizer": "adamw", "lr": 0.003}}},
        "student": {"name": "tiny_llama", "options": TINY},
        "train": {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.003},
    },
    # the budget in tokens: a trial that generates meets ASHA's rungs (1 and 2 epochs' worth) sooner
    "scheduler": {"type": "asha", "grace_period": 1, "unit": "tokens"},
    "searcher": {"type": "tpe", "n_startup_trials": 6},
    "space": {"knowledge": {
        "none": {},
        "tkd": {"divergence": {"type": "categorical", "choices": ["fkl", "rkl"]}},
        "on_policy+tkd": {"divergence": {"type": "categorical", "choices": ["rkl", "rkl_sampled"]},
                          "scheme.lmbda": {"type": "float", "low": 0.3, "high": 1.0}},
        "seq_kd": {}}},
}


@pytest.fixture(scope="module")
def task_sweep(tmp_path_factory, ray_cluster):
    from kdray.sweep.runner import run_sweep

    tmp = tmp_path_factory.mktemp("tasksweep")
    path = tmp / "tasks-lm.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return tmp, run_sweep(request(tmp, path, "tasks"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_over_lambda_and_divergence_ranks_on_exact_match_and_logs_what_was_generated(task_sweep):
    tmp, result = task_sweep
    board = result.leaderboard
    assert list(board["val_exact_match"]) == sorted(board["val_exact_match"], reverse=True)  # higher first
    # the budget table says what each type trained on and generated; the shares are of the sweep's tokens
    budget = result.budget.set_index("knowledge")
    assert budget["tokens"].sum() == int(board["budget_tokens"].sum()) > 0
    assert budget["token_share"].sum() == pytest.approx(1.0)
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = find_sweep(c, "tasks")
    assert parent.data.tags["kdray.metric"] == "val_exact_match"
    trials = [t for t in sweep_children(c, parent, kind="trial") if t.data.tags.get(TAG_STATUS) == "completed"]
    train = load_dataset(DatasetConfig.model_validate(SPACE["base"]["dataset"])).train
    kinds = {t.data.tags["kdray.knowledge"] for t in trials}
    assert kinds == {"none", "tkd", "on_policy+tkd", "seq_kd"}
    for t in trials:
        m, searched = t.data.metrics, json.loads(t.data.tags["kdray.searched"])
        if t.data.tags["kdray.knowledge"] == "on_policy+tkd":
            lmbda = searched["scheme.lmbda"]
            assert 0.3 <= lmbda <= 1.0 and m["generated_tokens"] > 0
            history = c.get_metric_history(t.info.run_id, "on_policy_fraction")
            assert len(history) == 3
            mean = sum(h.value for h in history) / len(history)
            draws = 3 * -(-len(train) // 32)  # epochs x batches, each on-policy with probability λ
            assert abs(mean - lmbda) <= 4 * (lmbda * (1 - lmbda) / draws) ** 0.5
        else:
            assert "generated_tokens" not in m
            # off-policy (seq_kd: on the teacher's rows, its training split): epoch e has spent e epochs' worth
            spent = sorted((h.step, h.value) for h in c.get_metric_history(t.info.run_id, "budget_epochs"))
            assert spent == [(1, 1.0), (2, 2.0), (3, 3.0)], spent
        assert m["budget_tokens"] > 0
        # seq_kd: the teacher's answers were made once by the sweep and read by the trial
        assert t.data.tags.get("kdray.teacher_generations") == (
            "shared" if t.data.tags["kdray.knowledge"] == "seq_kd" else None)


@pytest.mark.ray
@pytest.mark.slow
def test_the_champion_loaded_by_hugging_face_answers_the_test_prompts_as_kdray_recorded(task_sweep, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, result = task_sweep
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    p = subprocess.run([sys.executable, "-m", "kdray", "best", "--sweep", "tasks", "--json", "--tracking-uri", uri],
                       capture_output=True, text=True, timeout=300, cwd=tmp)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout)
    assert info["metric"] == "val_exact_match"
    mlflow.set_tracking_uri(uri)
    folder = mlflow.artifacts.download_artifacts("models:/kdray-tasks-lm@champion", dst_path=str(tmp_path / "reg"))
    model = AutoModelForCausalLM.from_pretrained(f"{folder}/model").eval()
    tok = AutoTokenizer.from_pretrained(f"{folder}/components/tokenizer")
    data = load_dataset(DatasetConfig.model_validate(SPACE["base"]["dataset"]))
    p_len = data.info.prompt_len
    right = 0
    for x, y in zip(data.test.x, data.test.y):
        prompt = decode(x[:p_len])
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == x[:p_len].tolist()  # the tokenizer gives the rows' own ids
        out = model.generate(ids, max_new_tokens=x.shape[0] - p_len + 1, do_sample=False, eos_token_id=END,
                             pad_token_id=PAD)
        answer = decode([t for t in y.tolist() if t != IGNORE])  # the answer and its end token
        right += tok.decode(out[0, p_len:]).startswith(answer)
    assert right / len(data.test.x) == pytest.approx(info["test_exact_match"], abs=1e-9)
