"""A language-model sweep end to end, as `kdray sweep` runs it: a teacher trained in the sweep, its top-k outputs cached
once and read by every trial (each at its own top-k), trials ranked on validation NLL (lower is better), the champion
registered as a Hugging Face folder with its tokenizer that loads with ``AutoModelForCausalLM``, gives the recorded
validation NLL and generates text; ``kdray compare`` and ``kdray final --per-type --by tkd.divergence`` on it."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request

from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

TINY = {"layers": 1, "hidden": 32, "heads": 2}
SPACE = {
    "name": "hmm-lm", "metric": "val_nll", "num_samples": 6, "seed": 0, "min_trials_per_type": 1,
    "base": {
        "dataset": {"name": "synthetic_lm", "options": {"train_sequences": 300, "seq_len": 16}},
        "teacher": {"train": {"model": {"name": "tiny_llama", "options": {**TINY, "layers": 2, "hidden": 48}},
                              "train": {"epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 0.005}}},
        "student": {"name": "tiny_llama", "options": TINY},
        "train": {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.005},
        "cache": {"top_k": 8},
    },
    "scheduler": {"type": "fifo"},
    "searcher": {"type": "tpe", "n_startup_trials": 6},
    "space": {"knowledge": {"none": {}, "tkd": {
        "divergence": {"type": "categorical", "choices": ["fkl", "rkl"]},
        "temperature": {"type": "float", "low": 1.0, "high": 3.0},
        "cache.top_k": {"type": "categorical", "choices": [4, 8, None]}}}},
}


@pytest.fixture(scope="module")
def lm_sweep(tmp_path_factory, ray_cluster):
    from kdray.sweep.runner import run_sweep

    tmp = tmp_path_factory.mktemp("lmsweep")
    path = tmp / "hmm-lm.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    result = run_sweep(request(tmp, path, "lm"))
    return tmp, result


@pytest.mark.ray
@pytest.mark.slow
def test_an_lm_sweep_ranks_on_validation_nll_and_shares_the_teachers_top_k(lm_sweep):
    tmp, result = lm_sweep
    board = result.leaderboard
    assert list(board["val_nll"]) == sorted(board["val_nll"])  # lower first
    assert result.champion.run_id == board.iloc[0]["run_id"] and result.champion.metrics["val_nll"] > 0
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = find_sweep(c, "lm")
    assert parent.data.tags["kdray.metric"] == "val_nll"
    # every token was stored (a trial reads all of them), so every trial read the cache, each at its own top-k
    assert parent.data.metrics["teacher_cache.top_k"] == 64
    assert 0 < parent.data.metrics["teacher_cache.truncation_kl.k4.T1"]
    assert parent.data.metrics["teacher_cache.truncation_kl.k8.T1"] < parent.data.metrics[
        "teacher_cache.truncation_kl.k4.T1"]
    trials = [t for t in sweep_children(c, parent, kind="trial") if t.data.tags["kdray.knowledge"] == "tkd"]
    assert trials and all(t.data.tags["kdray.teacher_source"] == "cache" for t in trials)
    for t in trials:
        m = t.data.metrics
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_nll"]), rel=1e-6)
        assert 0 < m["val_kl_teacher"] and 0 < m["val_rkl_teacher"] and 0 < m["val_top1_agree"] <= 1
        assert m["val_kl_true"] > 0  # synthetic_lm: the KL to the true next-token distribution


@pytest.mark.ray
@pytest.mark.slow
def test_the_lm_champion_loads_as_a_hugging_face_model_with_its_recorded_nll_and_generates(lm_sweep, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset

    tmp, result = lm_sweep
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    folder = mlflow.artifacts.download_artifacts("models:/kdray-hmm-lm@champion", dst_path=str(tmp_path / "reg"))
    model = AutoModelForCausalLM.from_pretrained(f"{folder}/model").eval()
    tok = AutoTokenizer.from_pretrained(f"{folder}/components/tokenizer")
    val = load_dataset(DatasetConfig.model_validate(SPACE["base"]["dataset"])).val
    with torch.no_grad():  # Hugging Face's own loss: the mean NLL of the next tokens
        logits = model(input_ids=val.x).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val.y.reshape(-1)).item()
    assert nll == pytest.approx(result.champion.metrics["val_nll"], rel=1e-4)
    out = model.generate(**tok("t1 t2 t3", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0])
    assert text.startswith("t1 t2 t3") and len(text.split()) == 11

    p = subprocess.run([sys.executable, "-m", "kdray", "best", "--sweep", "lm", "--export", str(tmp_path / "ex"),
                        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--json"], capture_output=True,
                       text=True, timeout=300, cwd=tmp)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout)
    assert info["metric"] == "val_nll" and info["val_nll"] == pytest.approx(result.champion.metrics["val_nll"])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ex").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=val.x[:4]).logits, model(input_ids=val.x[:4]).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "ex")("t5 t6")["input_ids"] == [5, 6]


@pytest.mark.ray
@pytest.mark.slow
def test_compare_and_final_per_divergence_rank_by_nll(lm_sweep):
    from kdray.final import format_per_type, run_final_per_type

    tmp, result = lm_sweep
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    p = subprocess.run([sys.executable, "-m", "kdray", "compare", "--sweep", "lm", "--json", "--tracking-uri", uri],
                       capture_output=True, text=True, timeout=300, cwd=tmp)
    assert p.returncode == 0, p.stderr[-2000:]
    cmp = json.loads(p.stdout)
    nll = [t["val_nll"] for t in cmp["trials"]]
    assert nll == sorted(nll)
    assert {s["knowledge"] for s in cmp["by_knowledge"]} == {"none", "tkd"}

    res = run_final_per_type(uri, "lm", 2, str(tmp / "runs"), say=lambda m: None, by="tkd.divergence")
    labels = {e["knowledge"] for e in res.table}
    c = MlflowClient(uri)
    searched = {json.loads(t.data.tags["kdray.searched"]).get("tkd.divergence")
                for t in sweep_children(c, find_sweep(c, "lm"), kind="trial")
                if t.data.tags.get(TAG_STATUS) in ("completed", "stopped_early")} - {None}
    assert labels == {"none"} | {f"tkd[divergence={d}]" for d in searched}
    for e in res.table:
        assert len(e["test_nll"]) == 2 and all(math.isfinite(v) and v > 0 for v in e["test_nll"])
        if "diff" in e:  # paired: the mean of the per-seed differences to none
            none = next(x for x in res.table if x["knowledge"] == "none")["test_nll"]
            assert e["diff"] == pytest.approx(sum(a - b for a, b in zip(e["test_nll"], none)) / 2, rel=1e-9)
    table = format_per_type(res, markdown=True)
    assert "test NLL (nats/token)" in table and "nats" in table
    means = [e["mean"] for e in res.table if not e["knowledge"].startswith("none")]
    rows = [line.split("|")[1].strip() for line in table.splitlines()[3:]]  # after the title, header and rule
    assert rows[0] == "none"  # the baseline first, then the types best (lowest NLL) first
    shown = rows[1:]
    assert [next(e["mean"] for e in res.table if e["knowledge"] == k) for k in shown] == sorted(means)
