"""Language-model runs as users start them: 2 gloo ranks learn what one process learns on the whole batch (the loss is
normalised by the target tokens of every rank), gradient accumulation equals the larger batch, a step never waits
for the device, and ``kdray teacher`` + ``kdray distill`` on 2 gloo workers through the command line."""
from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from host_syncs import count_host_syncs

from kdray.config import DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.data.lm_builtin import synthetic_tokenizer
from kdray.models import Preprocess, build_model, model_record
from kdray.train.loop import train_run
from kdray.train.session import Session

REPO = Path(__file__).resolve().parents[2]
TINY = {"layers": 1, "hidden": 32, "heads": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qa_data(tmp_path: Path, multiple: int = 8) -> dict:
    """Prompts and completions of varying lengths (each rank's batches hold a different number of target tokens), as
    many rows as make the training split a whole number of ``multiple`` blocks."""
    tok = synthetic_tokenizer(DatasetConfig(name="synthetic_lm", data_dir=str(tmp_path)), 64)
    g = torch.Generator().manual_seed(0)
    rows = []
    words = lambda n, lo: " ".join(f"t{lo + int(v)}" for v in torch.randint(0, 20, (n,), generator=g))  # noqa: E731
    for n in range(200):
        n_q, n_a = 1 + int(torch.randint(0, 9, (1,), generator=g)), 1 + int(torch.randint(0, 6, (1,), generator=g))
        rows.append({"q": words(n_q, 1), "a": words(n_a, 30)})
        if n < 40:
            continue
        f = tmp_path / f"qa{n}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in rows))
        spec = {"name": "text", "path": str(f), "prompt_column": "q", "completion_column": "a",
                "tokenizer": str(tok), "seq_len": 8, "data_dir": str(tmp_path), "val_fraction": 0.2}
        if len(load_dataset(DatasetConfig.model_validate(spec)).train) % multiple == 0:
            return spec
    raise AssertionError("no row count gives whole batches")


def teacher_record(dataset: dict) -> dict:
    torch.manual_seed(1)
    t = build_model("tiny_llama", 64, Preprocess((8,), passthrough=True), TINY)
    return model_record(t, model_name="tiny_llama", model_options=TINY, num_classes=64, dataset=dataset)


def lm_run(dataset: dict, batch: int, accum: int = 1, workers: int = 1) -> dict:
    return RunConfig.model_validate({
        "dataset": dataset, "teacher": {"checkpoint": "unused.pt"}, "student": {"name": "tiny_llama", "options": TINY},
        "knowledge": [{"type": "tkd", "divergence": "jsd", "beta": 0.3, "temperature": 2.0}], "ce_weight": 0.5,
        "train": {"epochs": 1, "batch_size": batch, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                  "scheduler": "none", "grad_accum_steps": accum},
        "resources": {"num_workers": workers}}).model_dump(mode="json")


def run_group(world: int, run: dict, records: list, out: Path, resume_from: Path | None = None) -> dict:
    import lm_ddp

    out.mkdir(parents=True, exist_ok=True)
    resume = str(resume_from) if resume_from else None
    if world == 1:
        lm_ddp.run_rank(0, 1, 0, run, records, str(out), resume)
    else:
        mp.spawn(lm_ddp.run_rank, args=(world, free_port(), run, records, str(out), resume), nprocs=world, join=True)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.slow
def test_two_gloo_ranks_learn_what_one_process_learns_on_the_whole_batch(tmp_path):
    """Rank r's batch is the r-th half of the one process's batch (DistributedSampler's interleaving), but the two
    halves hold different numbers of target tokens: normalising each rank by its own count would weigh the tokens
    of the shorter half more. Normalised by the tokens of both ranks, one SGD epoch ends at the same weights."""
    dataset = qa_data(tmp_path)
    data = load_dataset(DatasetConfig.model_validate(dataset))
    assert len(data.train) % 8 == 0, len(data.train)  # whole batches: no padding, no partial batch
    rec = teacher_record(dataset)
    one = run_group(1, lm_run(dataset, batch=8), [rec], tmp_path / "one")
    two = run_group(2, lm_run(dataset, batch=4, workers=2), [rec], tmp_path / "two")
    moved = 0.0
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    init = build_model("tiny_llama", 64, Preprocess((8,), passthrough=True), TINY)
    moved = max((one["state_dict"][k] - v).abs().max().item() for k, v in init.state_dict().items()
                if k in one["state_dict"] and v.is_floating_point())
    assert moved > 1e-3  # the epoch did train
    a, b = one["reports"][-1], two["reports"][-1]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_nll"] == pytest.approx(b["val_nll"], rel=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Two batches of 4 blocks with their gradients summed, normalised by both batches' target tokens: the same SGD
    step as one batch of 8 (a language model; a classifier's mean over its two equal batches likewise)."""
    dataset = qa_data(tmp_path)
    rec = teacher_record(dataset)
    big = run_group(1, lm_run(dataset, batch=8), [rec], tmp_path / "big")
    acc = run_group(1, lm_run(dataset, batch=4, accum=2), [rec], tmp_path / "acc")
    for k, v in big["state_dict"].items():
        torch.testing.assert_close(acc["state_dict"][k], v, rtol=1e-4, atol=1e-6)
    clf = {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"}, "seed": 3,
           "train": {"epochs": 1, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5, "scheduler": "none"}}
    states = []
    for batch, accum in ((32, 1), (16, 2)):
        cfg = RunConfig.model_validate({**clf, "train": {**clf["train"], "batch_size": batch,
                                                          "grad_accum_steps": accum}})
        session = Session(checkpoint_root=tmp_path / f"clf{batch}")
        train_run({"run": cfg.model_dump(mode="json")}, session)
        states.append(torch.load(session.last_checkpoint / "student.pt", weights_only=True)["state_dict"])
    # 432 samples: 13 batches of 32 and one of 16, or 13 pairs of 16 and a last group of one batch of 16
    assert len(load_dataset(RunConfig.model_validate(clf).dataset).train) == 432
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cached", [False, True], ids=["live-teacher", "teacher-cache"])
def test_a_language_model_step_never_waits_for_the_device(monkeypatch, tmp_path, cached):
    """The LM step (chunked loss, top-k teacher rows, token counts) reads nothing on the host between steps. The
    Hugging Face model's own forward asks once (whether the block packs several sequences, ``masking_utils``): the
    plain Hugging Face loop pays the same, so only kdray's own code (and torch's, as for classifiers) counts."""
    from kdray.cache.tokens import build_token_cache

    dataset = qa_data(tmp_path)
    rec = teacher_record(dataset)
    run = lm_run(dataset, batch=4)
    run["cache"]["top_k"] = 8
    run["train"]["epochs"] = 2
    data = load_dataset(DatasetConfig.model_validate(dataset))
    cache = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=8)[0] if cached else None
    calls, hook, where = count_host_syncs(monkeypatch, exempt=("torch/optim", "/transformers/"))

    session = Session()
    train_run({"run": run, "teacher_records": [rec], "teacher_cache": cache, "step_hook": hook}, session)
    steps = math.ceil(len(data.train) / 4)
    assert where[0] == (2, steps - 1) and session.reports[-1]["teacher_source"] == ("cache" if cached else "live")
    assert [(n, w) for n, w in calls if w is not None and w[1] < steps - 1] == []


@pytest.mark.slow
def test_kdray_teacher_then_distill_on_two_gloo_workers(tmp_path):
    """The command line, no --local: a causal-LM teacher trained by `kdray teacher`, distilled into a half-depth
    student by `kdray distill` on 2 gloo workers (Ray Train), then its test NLL measured once."""
    import subprocess

    import yaml

    data = {"name": "synthetic_lm", "options": {"train_sequences": 200, "seq_len": 16}}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump({
        "name": "hmm-teacher", "dataset": data, "model": {"name": "tiny_llama", "options": {**TINY, "layers": 2}},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.003}}))
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump({
        "name": "hmm-kd", "dataset": data, "teacher": {"checkpoint": "kdray_runs/teachers/hmm-teacher.pt"},
        "student": {"name": "tiny_llama", "init_from_teacher": [1]},
        "knowledge": [{"type": "tkd", "divergence": "rkl", "temperature": 1.0}],
        "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
        "resources": {"num_workers": 2}}))

    def kdray(*args):
        p = subprocess.run([sys.executable, "-m", "kdray", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    out = kdray("teacher", "teacher.yaml")
    assert "validation NLL" in out and "test NLL" in out
    out = kdray("distill", "kd.yaml", "--test", "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert math.isfinite(summary["val_nll"]) and math.isfinite(summary["test_nll"])
    assert summary["test_nll"] < math.log(64)  # better than a uniform guess over the 64 tokens
    assert "2 worker(s)" in out and "tokens/s" in out
