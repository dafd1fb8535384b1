"""A language model's teacher outputs cached once: each position's top-k in float16 with 16-bit ids and the remaining
mass, read by (block, position); what top-k costs (bytes per token, KL per k and T); a trial that asks for more than
is stored runs its teacher live."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from loss_references import divergence_rows, f64

from kdray.cache import TeacherOutputs
from kdray.cache.tokens import TRUNCATION_TOKENS, build_token_cache, bytes_per_token, plan_tokens
from kdray.config import DatasetConfig
from kdray.data import load_dataset
from kdray.knowledge.token import TKD, TeacherView, TopKTokens, token_sums
from kdray.models import Preprocess, Teacher, build_model, model_record


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmcache")
    cfg = DatasetConfig(name="synthetic_lm", data_dir=str(d), options={"train_sequences": 60, "seq_len": 16})
    data = load_dataset(cfg)
    torch.manual_seed(0)
    model = build_model("tiny_llama", 64, Preprocess((16,), passthrough=True), {"layers": 1, "hidden": 32,
                                                                               "heads": 2})
    with torch.no_grad():  # a confident teacher (logits x 6), as a trained one is: no near-ties among its top tokens
        model.net.hf.model.norm.weight.mul_(6.0)
    rec = model_record(model, model_name="tiny_llama", model_options={"layers": 1, "hidden": 32, "heads": 2},
                       num_classes=64, dataset=cfg.model_dump(mode="json"))
    return data, rec


def teacher_logp(rec, x):
    t = Teacher.from_records([rec])
    with torch.no_grad():
        out = t(x).logits
        return torch.log_softmax(out.head.logits(out.hidden.reshape(-1, out.hidden.shape[-1])), -1)


def test_the_cache_holds_each_positions_top_k_with_16_bit_ids(setting):
    data, rec = setting
    cache, note = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=8, truncation_ks=(4, 8))
    n, t = data.train.x.shape
    assert cache.tokens["logp"].shape == (n, t, 8) and cache.tokens["logp"].dtype == np.float16
    assert cache.tokens["index"].dtype == np.uint16 and cache.tokens["rest"].shape == (n, t)
    assert cache.stats["bytes_per_token"] == 8 * 2 + 8 * 2 + 4 == bytes_per_token(64, 8)
    assert "top-8 of 64 tokens" in note
    lp = teacher_logp(rec, data.train.x[:3])
    vals, idx = lp.topk(8, -1)
    np.testing.assert_array_equal(cache.tokens["index"][:3].reshape(-1, 8), idx.numpy())
    np.testing.assert_allclose(cache.tokens["logp"][:3].reshape(-1, 8).astype(np.float32), vals.numpy(),
                               rtol=2e-3, atol=2e-3)  # float16
    rest = torch.logsumexp(lp.scatter(-1, idx, -math.inf), -1)
    np.testing.assert_allclose(cache.tokens["rest"][:3].reshape(-1), rest.numpy(), rtol=1e-5)


def test_the_truncation_kl_per_k_and_t_is_what_the_dense_teacher_loses(setting):
    """KL(teacher at T || its top-k at T, the rest spread uniformly), on the first TRUNCATION_TOKENS tokens, against
    a float64 computation with the dense rows built by hand."""
    data, rec = setting
    cache, _ = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=8, truncation_ks=(4,))
    lp = f64(teacher_logp(rec, data.train.x))[:TRUNCATION_TOKENS]
    for k in (4, 8):
        for t in (1.0, 2.0, 4.0):
            p = lp.exp()
            top, idx = p.topk(k, -1)
            other = (1 - top.sum(-1, keepdim=True)) / (64 - k)
            approx = other.expand_as(p).clone().pow(1 / t).scatter(-1, idx, top.pow(1 / t))
            approx = approx / approx.sum(-1, keepdim=True)
            full = p.pow(1 / t)
            full = full / full.sum(-1, keepdim=True)
            want = divergence_rows("fkl", full, approx).mean().item()
            assert cache.stats[f"truncation_kl.k{k}.T{t:g}"] == pytest.approx(want, rel=1e-3)
    assert cache.stats["truncation_kl.k4.T1"] > cache.stats["truncation_kl.k8.T1"] > 0


def test_every_token_is_kept_when_no_top_k_is_asked_and_it_fits(setting):
    data, rec = setting
    cache, _ = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=None)
    assert cache.tokens["logp"].shape[-1] == 64 and "index" not in cache.tokens
    none, why = build_token_cache([rec], data, [], 1000, torch.device("cpu"), want_k=None)
    assert none is None and "cache.top_k" in why


def test_plan_tokens_says_what_fits():
    assert plan_tokens(1000, 50_000, 64, 0, 10**9)[0] == 64
    assert plan_tokens(1000, 50_000, None, 0, 10**6)[0] is None
    k, with_features, note = plan_tokens(1000, 64, 8, 10**9, 10**6)
    assert k == 8 and not with_features and "feature maps not cached" in note


def loss_of(student, x, y, t_out, view):
    s = student.states(x)
    sums, _, _ = token_sums(s, t_out.logits, y, [TKD("jsd", 2.0, beta=0.3)], view)
    return sums


def test_a_trial_reads_its_own_top_k_from_a_larger_cache_and_learns_what_its_live_teacher_gives(setting):
    data, rec = setting
    cache, _ = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=16)
    teacher = Teacher.from_records([rec])
    cached = TeacherOutputs.create(teacher, cache, [rec], data, [], torch.device("cpu"), top_k=4)
    assert cached.source == "cache"
    idx = torch.tensor([5, 2, 7])
    x, y = data.train.x[idx], data.train.y[idx]
    out = cached(idx, x)
    assert isinstance(out.logits, TopKTokens) and out.logits.logp.shape == (3, 16, 16)
    torch.manual_seed(1)
    student = build_model("tiny_llama", 64, Preprocess((16,), passthrough=True), {"layers": 1, "hidden": 16,
                                                                                 "heads": 2})
    view = TeacherView(top_k=4, tail="uniform")
    live = TeacherOutputs.create(teacher, None, [rec], data, [], torch.device("cpu"))
    torch.testing.assert_close(loss_of(student, x, y, out, view), loss_of(student, x, y, live(idx, x), view),
                               rtol=2e-3, atol=2e-3)  # float16 storage


def test_a_trial_cuts_an_exact_cache_to_its_own_top_k(setting):
    """Every token stored (in vocabulary order, not sorted): a trial with top_k 4 learns from the teacher's 4 likeliest
    tokens, as live, not from the first 4 ids of the vocabulary."""
    data, rec = setting
    cache, _ = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=None)
    teacher = Teacher.from_records([rec])
    idx = torch.tensor([3, 1])
    x, y = data.train.x[idx], data.train.y[idx]
    out = TeacherOutputs.create(teacher, cache, [rec], data, [], torch.device("cpu"), top_k=4)(idx, x)
    assert out.logits.logp.shape[-1] == 64
    torch.manual_seed(2)
    student = build_model("tiny_llama", 64, Preprocess((16,), passthrough=True), {"layers": 1, "hidden": 16,
                                                                                 "heads": 2})
    view = TeacherView(top_k=4, tail="uniform")
    live = TeacherOutputs.create(teacher, None, [rec], data, [], torch.device("cpu"))
    torch.testing.assert_close(loss_of(student, x, y, out, view), loss_of(student, x, y, live(idx, x), view),
                               rtol=2e-3, atol=2e-3)


def test_a_trial_that_wants_more_tokens_than_are_stored_runs_its_teacher_live(setting):
    data, rec = setting
    cache, _ = build_token_cache([rec], data, [], 2**30, torch.device("cpu"), want_k=4)
    teacher = Teacher.from_records([rec])
    for want in (8, None):
        out = TeacherOutputs.create(teacher, cache, [rec], data, [], torch.device("cpu"), top_k=want)
        assert out.source == "live" and "holds the teacher's top 4 tokens" in out.reason
