"""Token-level knowledge (``tkd``) and the chunked loss: every divergence against float64 formulas written here on
probabilities, the chunked computation against the whole (B·T, V) one in value and gradients, and the teacher's top-k
(the cache's form) against dense distributions built by hand under each tail rule."""
from __future__ import annotations

import math

import pytest
import torch
from loss_references import divergence_rows, f64, log_softmax, tkd_reference

from kdray.config import ConfigError, RunConfig
from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.divergences import needs_full_support, sparse_divergence, sparse_teacher, top_k_of, truncate
from kdray.knowledge.token import TKD, LMHead, TeacherView, TokenStates, TopKTokens, naive_token_loss, token_sums
from kdray.models import Preprocess, build_model

KINDS = ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"]


def logits(n: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, v, generator=torch.Generator().manual_seed(seed))


def test_tkd_is_registered_in_the_token_family():
    assert KNOWLEDGE.get("tkd") is TKD and TKD.family == "token"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [1.0, 2.0, 8.0])
def test_each_divergence_matches_its_float64_formula(kind, t):
    z_s, z_t = logits(12, 50, 0), logits(12, 50, 1)
    mask = torch.rand(12, generator=torch.Generator().manual_seed(2)) > 0.3
    got = TKD(kind, t, beta=0.3, alpha=0.1)(z_s, z_t, mask)
    want = tkd_reference(z_s, z_t, kind, t, beta=0.3, alpha=0.1, mask=mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_jsd_at_beta_0_and_1_is_exactly_forward_and_reverse_kl():
    """TRL's convention: the endpoints are the KLs themselves, not the general formula (which is 0 there)."""
    z_s, z_t = logits(8, 30, 3), logits(8, 30, 4)
    for beta, kind in ((0.0, "fkl"), (1.0, "rkl")):
        assert torch.equal(TKD("jsd", 2.0, beta=beta)(z_s, z_t), TKD(kind, 2.0)(z_s, z_t))
    # near the endpoints the general formula shrinks towards 0 (β · KL), so the loss is not continuous there
    near = TKD("jsd", 1.0, beta=1e-3)(z_s, z_t).item()
    assert near < 0.01 * TKD("fkl", 1.0)(z_s, z_t).item()


def test_gradients_match_float64():
    z_s, z_t = logits(6, 20, 5).requires_grad_(), logits(6, 20, 6)
    ref = f64(z_s.detach()).requires_grad_()
    for kind in KINDS:
        g, = torch.autograd.grad(TKD(kind, 2.0, beta=0.4)(z_s, z_t), z_s)
        w, = torch.autograd.grad(tkd_reference(ref, z_t, kind, 2.0, beta=0.4), ref)
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-7)


# -- the chunked loss -------------------------------------------------------------------------------------------
def lm(seed: int = 0, vocab: int = 40, hidden: int = 16):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("tiny_llama", vocab, Preprocess((7,), passthrough=True),
                           {"layers": 1, "hidden": hidden, "heads": 2})


@pytest.mark.parametrize("chunk", [4, 5, 16, 21])
@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
def test_chunked_equals_unchunked_in_value_and_gradients(chunk, kind):
    """B·T = 3·7 = 21 tokens: chunks of 4 and 5 do not divide it; some targets are ignored (-100)."""
    student, teacher = lm(0), lm(1)
    x = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(8))
    y[0, :3] = -100
    term = TKD(kind, 2.0, beta=0.3)
    with torch.no_grad():
        t_states = teacher.states(x)
        t_logits = t_states.head.logits(t_states.hidden)
    sums, correct, count = token_sums(student.states(x), t_states, y, [term], chunk=chunk)
    params = [p for p in student.parameters() if p.requires_grad]
    got = torch.autograd.grad(sums.sum(), params)
    s = student.states(x)
    naive = naive_token_loss(s.head.logits(s.hidden), t_logits, y, term)
    want = torch.autograd.grad(naive, params)
    assert sums.sum().item() == pytest.approx(naive.item(), rel=1e-5)
    assert count.item() == 18
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    z = s.head.logits(s.hidden).reshape(-1, 40)
    assert correct.item() == ((z.argmax(1) == y.reshape(-1)) & (y.reshape(-1) != -100)).sum().item()


def test_the_head_applies_the_familys_scale_and_soft_cap():
    w = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    h = 10 * torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    z = h @ w.T
    assert torch.allclose(LMHead(w, scale=0.5, softcap=3.0).logits(h), 3.0 * torch.tanh(0.5 * z / 3.0))


def test_the_objective_normalises_token_sums_by_the_global_count():
    """``_backward`` = (w_ce·Σ nll + w·Σ tkd) · token_scale; the logged terms are per target token of this batch."""
    student, teacher = lm(0), lm(1)
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    y = x.roll(-1, 1)
    obj = DistillObjective.from_specs([{"type": "tkd", "weight": 2.0, "temperature": 1.0}], ModelLayout((), ""),
                                      ModelLayout((), ""), ce_weight=0.5)
    s, t = TapOutputs(student.states(x), {}), TapOutputs(teacher.states(x), {})
    scale = torch.tensor(1.0 / 50.0)  # as if 50 target tokens over all ranks and accumulation steps
    terms = obj(s, t, y, token_scale=scale)
    sums, _, count = token_sums(s.logits, t.logits, y, [obj.knowledge["tkd"]])
    assert terms["_backward"].item() == pytest.approx((0.5 * sums[0] + 2.0 * sums[1]).item() / 50.0, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(sums[0].item() / count.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * terms["ce"].item() + 2.0 * terms["tkd"].item(), rel=1e-6)


# -- the teacher's top-k ----------------------------------------------------------------------------------------
def dense_reference(lp1: torch.Tensor, k: int, t: float, rule: str) -> torch.Tensor:
    """The teacher distribution a tail rule defines, at temperature t, from full log-probabilities at T = 1, built
    densely in float64: the top-k tokens by hand, the rest per the rule."""
    p = f64(lp1).exp()
    vals, idx = p.topk(k, dim=-1)
    rest = 1.0 - vals.sum(-1, keepdim=True)
    v = p.shape[-1]
    if rule == "renormalize":
        dense = torch.zeros_like(p).scatter(-1, idx, vals ** (1 / t))
    else:  # uniform: each other token has rest / (V - k), tempered as a token
        dense = (rest / (v - k)).expand_as(p).clone().pow(1 / t).scatter(-1, idx, vals ** (1 / t))
    return dense / dense.sum(-1, keepdim=True)


# renormalize with rkl is infinite: refused at config time (the last tests)
@pytest.mark.parametrize("rule,kind", [(r, k) for r in ("uniform", "renormalize") for k in KINDS
                                       if not (r == "renormalize" and needs_full_support(k))])
def test_a_top_k_teacher_equals_its_dense_distribution(rule, kind):
    v, k, t = 30, 6, 2.0
    lp1 = torch.log_softmax(logits(10, v, 9), -1)
    lq = torch.log_softmax(logits(10, v, 10) / t, -1)
    vals, idx, rest = top_k_of(lp1, k)
    got = sparse_divergence(kind, sparse_teacher(vals, idx, rest, v, t, rule), lq, beta=0.3)
    want = divergence_rows(kind, dense_reference(lp1, k, t, rule), f64(lq).exp(), beta=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_the_tail_rule_compares_k_plus_one_outcomes():
    """DistillKit's SYMMETRIC_UNIFORM: the teacher's remaining mass and the student's mass outside the teacher's
    top-k are one outcome each; the bucket is tempered as a single outcome of mass r."""
    v, k, t = 30, 5, 2.0
    lp1 = torch.log_softmax(logits(4, v, 11), -1)
    lq = torch.log_softmax(logits(4, v, 12) / t, -1)
    vals, idx, rest = top_k_of(lp1, k)
    got = sparse_divergence("fkl", sparse_teacher(vals, idx, rest, v, t, "tail"), lq)
    p = f64(lp1).exp()
    top = p.gather(-1, idx)
    pb = torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1) ** (1 / t)
    pb = pb / pb.sum(-1, keepdim=True)
    q = f64(lq).exp()
    qtop = q.gather(-1, idx)
    qb = torch.cat([qtop, 1 - qtop.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got.double(), divergence_rows("fkl", pb, qb), rtol=1e-4, atol=1e-7)


def test_the_remaining_mass_is_exact_for_a_confident_teacher():
    """1 - Σ top-k rounds to 0 in float32 when the top token holds nearly everything; a log-sum-exp over the others
    does not, so the uniform rule still spreads the true remaining mass."""
    z = torch.zeros(1, 100)
    z[0, 0] = 30.0  # the others hold ~1e-11 of the mass
    vals, _, rest = top_k_of(torch.log_softmax(z, -1), 1)
    assert (1.0 - vals.exp().sum()).item() == 0.0
    want = math.log(99) + (0 - 30.0) - math.log1p(99 * math.exp(-30.0))
    assert rest.item() == pytest.approx(want, rel=1e-6)


def test_a_stored_top_k_cut_to_fewer_tokens_is_the_top_k_of_the_full_row():
    lp = torch.log_softmax(logits(5, 40, 13), -1)
    for k in (1, 3, 10):
        cut = truncate(*top_k_of(lp, 16), k)
        direct = top_k_of(lp, k)
        for a, b in zip(cut, direct):
            torch.testing.assert_close(a, b)


def test_k_equal_to_the_vocabulary_is_exact():
    v = 25
    lp1 = torch.log_softmax(logits(6, v, 14), -1)
    lq = torch.log_softmax(logits(6, v, 15) / 3.0, -1)
    teacher = sparse_teacher(*top_k_of(lp1, v), v, 3.0, "renormalize")
    dense = torch.log_softmax(lp1 / 3.0, -1)
    for kind in KINDS:
        want = divergence_rows(kind, f64(dense).exp(), f64(lq).exp())
        torch.testing.assert_close(sparse_divergence(kind, teacher, lq).double(), want, rtol=1e-4, atol=1e-7)


def test_a_cached_and_a_live_teacher_cut_to_the_same_top_k_give_the_same_loss():
    """What a trial learns from does not depend on where its teacher's outputs come from."""
    student, teacher = lm(0), lm(1)
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(16))
    y = x.roll(-1, 1)
    view = TeacherView(top_k=8, tail="uniform")
    with torch.no_grad():
        t = teacher.states(x)
        lp = torch.log_softmax(t.head.logits(t.hidden), -1)
    cached = TopKTokens(*top_k_of(lp, 8), 40)
    term = TKD("rkl", 2.0)
    live, _, _ = token_sums(student.states(x), t, y, [term], view)
    read, _, _ = token_sums(student.states(x), cached, y, [term], view)
    torch.testing.assert_close(live, read, rtol=1e-5, atol=1e-6)


def test_a_divergence_the_top_k_cannot_serve_is_refused_naming_the_field():
    base = {"dataset": {"name": "synthetic_lm"}, "teacher": {"checkpoint": "t.pt"}, "student": {"name": "tiny_llama"},
            "cache": {"top_k": 8, "tail": "renormalize"}}
    for spec in ({"type": "tkd", "divergence": "rkl"}, {"type": "tkd", "divergence": "jsd", "beta": 1.0}):
        with pytest.raises(ConfigError) as e:
            RunConfig.model_validate({**base, "knowledge": [spec]})
        assert e.value.fields == ["knowledge.0.divergence"] and "renormalize" in str(e.value)
    RunConfig.model_validate({**base, "knowledge": [{"type": "tkd", "divergence": "jsd", "beta": 0.5}]})
    RunConfig.model_validate({**base, "cache": {"top_k": 8, "tail": "uniform"},
                              "knowledge": [{"type": "tkd", "divergence": "rkl"}]})


def test_token_states_carry_the_models_own_logits():
    model = lm(3).eval()
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(17))
    s = model.states(x)
    assert isinstance(s, TokenStates)
    with torch.no_grad():
        torch.testing.assert_close(s.head.logits(s.hidden), model.net.hf(input_ids=x).logits.float())
    assert log_softmax(f64(model(x))).shape == (2, 7, 40)


def test_hidden_states_of_two_language_models_match_through_fitnet_with_the_cosine_distance():
    """fitnet on ``hidden.i`` taps (B, H, T), linear connector; ``distance: cosine`` is 1 - cos along H, averaged
    over the tokens (DistilBERT's hidden-state loss), against float64 by hand."""
    from kdray.models import FeatureTaps

    student, teacher = lm(0, hidden=16), lm(1, hidden=24)
    obj = DistillObjective.from_specs([{"type": "fitnet", "teacher_layer": "hidden.1", "student_layer": "hidden.1",
                                        "distance": "cosine"}], ModelLayout.of(teacher), ModelLayout.of(student))
    x = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(18))
    s_taps, t_taps = FeatureTaps(student.net, ["hidden.1"]), FeatureTaps(teacher.net, ["hidden.1"])
    s_out, t_out = s_taps.run(student, x, states=True), t_taps.run(teacher, x, states=True)
    assert s_out.features["hidden.1"].shape == (3, 16, 7) and t_out.features["hidden.1"].shape == (3, 24, 7)
    fit = obj.knowledge["fitnet"]
    fit.bind(t_out.features, s_out.features)
    got = fit.compute(s_out, t_out, None)
    w, b = fit.regressor.proj.weight.double(), fit.regressor.proj.bias.double()
    r = torch.einsum("oi,bit->bot", w[..., 0] if w.dim() == 3 else w, f64(s_out.features["hidden.1"])) + b[:, None]
    t = f64(t_out.features["hidden.1"])
    cos = (r * t).sum(1) / (r.norm(dim=1) * t.norm(dim=1))
    assert got.item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_chunked_loss_stays_float32_under_autocast(dtype):
    """On a GPU the student runs under bf16/fp16 autocast: the head's matmul takes that precision (as the model's own
    head would), every log-softmax and divergence runs in float32 (CPU autocast follows the same rules)."""
    student, teacher = lm(0), lm(1)
    x = torch.randint(0, 40, (4, 7), generator=torch.Generator().manual_seed(19))
    y = x.roll(-1, 1)
    term = TKD("jsd", 2.0, beta=0.3)
    with torch.no_grad():
        ref, _, _ = token_sums(student.states(x), teacher.states(x), y, [term])
        with torch.autocast("cpu", dtype=dtype):
            low, _, _ = token_sums(student.states(x), teacher.states(x), y, [term])
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, ref, rtol=0.02, atol=0.0)
