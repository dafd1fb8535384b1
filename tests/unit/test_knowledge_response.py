"""More response-based knowledge (issue 12): DIST, logit standardization, CTKD.

Each loss is checked against a float64 numpy version written here from the paper's formula (not by calling
the module), against closed forms and invariances, and for its parameter checks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.mlkd import MLKD
from kdray.knowledge.response import CTKD, DIST, DKD, KD

torch.manual_seed(0)


def softmax_np(z, t=1.0):
    z = z / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def kl_np(p_t, p_s):
    """Batch mean of KL(p_t || p_s)."""
    return np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))


def zscore_np(z, eps=1e-7):
    """Sun et al. 2024: (z - mean) / (eps + std) per sample, the reference's unbiased std."""
    return (z - z.mean(1, keepdims=True)) / (eps + z.std(1, ddof=1, keepdims=True))


def kd_np(z_s, z_t, t, standardize=False):
    if standardize:
        z_s, z_t = zscore_np(z_s), zscore_np(z_t)
    return t * t * kl_np(softmax_np(z_t, t), softmax_np(z_s, t))


def logits(b=8, c=6, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g), scale * torch.randn(b, c, generator=g)


def np64(*ts):
    return [t.detach().double().numpy() for t in ts]


# -- registry ----------------------------------------------------------------------------------------------
def test_new_types_are_registered_as_response_knowledge():
    for name, cls in (("dist", DIST), ("ctkd", CTKD)):
        assert KNOWLEDGE.get(name) is cls and cls.family == "response"
    for cls in (KD, DKD, DIST):
        assert cls.Params().standardize is False


# -- logit standardization -----------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_standardized_kd_matches_numpy(t):
    z_s, z_t = logits()
    want = kd_np(*np64(z_s, z_t), t, standardize=True)
    assert KD(t, standardize=True)(z_s, z_t).item() == pytest.approx(want, rel=1e-5)
    # and the default is plain KD
    assert KD(t)(z_s, z_t).item() == pytest.approx(kd_np(*np64(z_s, z_t), t), rel=1e-5)


def test_standardize_makes_kd_invariant_to_shift_and_per_sample_scale():
    z_s, z_t = logits(b=5, c=7)
    shift = torch.randn(5, 1) * 10
    scale = torch.rand(5, 1) * 5 + 0.2  # a positive factor per sample
    std, plain = KD(2.0, standardize=True), KD(2.0)
    base = std(z_s, z_t).item()
    assert std(z_s + shift, z_t).item() == pytest.approx(base, rel=1e-4)
    assert std(z_s * scale, z_t - shift).item() == pytest.approx(base, rel=1e-4)
    assert std(z_s, z_t * scale + shift).item() == pytest.approx(base, rel=1e-4)
    # plain KD: shift-invariant (softmax) but not scale-invariant
    p = plain(z_s, z_t).item()
    assert plain(z_s + shift, z_t).item() == pytest.approx(p, rel=1e-4)
    assert abs(plain(z_s * scale, z_t).item() - p) > 1e-2 * p
    # standardized KD of a scaled copy of the teacher is zero
    assert std(3.0 * z_t + 1.0, z_t).item() == pytest.approx(0.0, abs=1e-5)


def dkd_np(z_s, z_t, y, alpha, beta, t):
    p_s, p_t = softmax_np(z_s, t), softmax_np(z_t, t)
    out = 0.0
    for i in range(len(y)):
        b_s = np.array([p_s[i, y[i]], 1 - p_s[i, y[i]]])
        b_t = np.array([p_t[i, y[i]], 1 - p_t[i, y[i]]])
        keep = np.arange(z_s.shape[1]) != y[i]
        q_s, q_t = softmax_np(z_s[i:i + 1, keep], t)[0], softmax_np(z_t[i:i + 1, keep], t)[0]
        out += alpha * np.sum(b_t * np.log(b_t / b_s)) + beta * np.sum(q_t * np.log(q_t / q_s))
    return t * t * out / len(y)


def test_standardized_dkd_matches_numpy_and_default_is_unchanged():
    z_s, z_t = logits(b=7, c=6)
    y = torch.randint(0, 6, (7,), generator=torch.Generator().manual_seed(1))
    s, t = np64(z_s, z_t)
    got = DKD(alpha=1.0, beta=8.0, temperature=2.0, standardize=True)(z_s, z_t, y).item()
    assert got == pytest.approx(dkd_np(zscore_np(s), zscore_np(t), y.numpy(), 1.0, 8.0, 2.0), rel=1e-4)
    got = DKD(alpha=1.0, beta=8.0, temperature=2.0)(z_s, z_t, y).item()
    assert got == pytest.approx(dkd_np(s, t, y.numpy(), 1.0, 8.0, 2.0), rel=1e-4)
    # invariance under standardization
    dkd = DKD(temperature=2.0, standardize=True)
    assert dkd(5 * z_s - 2, z_t, y).item() == pytest.approx(dkd(z_s, z_t, y).item(), rel=1e-4)


# -- DIST ------------------------------------------------------------------------------------------------------
def dist_np(z_s, z_t, beta, gamma, t):
    """Huang et al. 2022, Eq. (4)-(7): 1 - Pearson correlation, per row (inter) and per column (intra)."""
    p_s, p_t = softmax_np(z_s, t), softmax_np(z_t, t)
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(p_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(p_s.shape[1])])
    return t * t * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,t", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (0.5, 3.0, 2.0)])
def test_dist_matches_numpy(beta, gamma, t):
    z_s, z_t = logits(b=16, c=10)
    want = dist_np(*np64(z_s, z_t), beta, gamma, t)
    assert DIST(beta, gamma, t)(z_s, z_t).item() == pytest.approx(want, rel=1e-5)


def test_dist_defaults_are_the_reference_cifar_setting():
    p = DIST.Params()
    assert (p.beta, p.gamma, p.temperature, p.weight) == (2.0, 2.0, 4.0, 1.0)


def test_dist_closed_forms():
    z_s, z_t = logits(b=12, c=9)
    # 0 up to float32 rounding of 1 - rho (~1e-7), times T^2 (beta + gamma) = 64
    assert DIST()(z_t, z_t.clone()).item() == pytest.approx(0.0, abs=1e-4)
    assert DIST(1.0, 1.0, 1.0)(z_t, z_t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    inter = DIST(1.0, 0.0, 4.0)(z_s, z_t).item()
    intra = DIST(0.0, 1.0, 4.0)(z_s, z_t).item()
    assert DIST(2.0, 3.0, 4.0)(z_s, z_t).item() == pytest.approx(2 * inter + 3 * intra, rel=1e-5)
    assert 0 <= inter <= 2 * 16 and 0 <= intra <= 2 * 16  # 1 - rho lies in [0, 2], times T^2
    # a batch of one sample has no column variance: its intra-class term is the constant 1 (times gamma T^2)
    one = DIST(0.0, 1.0, 2.0)(z_s[:1], z_t[:1]).item()
    assert one == pytest.approx(4.0, rel=1e-6)


def test_standardized_dist_matches_numpy_and_ignores_logit_scale():
    z_s, z_t = logits(b=10, c=8)
    s, t = np64(z_s, z_t)
    want = dist_np(zscore_np(s), zscore_np(t), 2.0, 2.0, 4.0)
    d = DIST(standardize=True)
    assert d(z_s, z_t).item() == pytest.approx(want, rel=1e-5)
    assert d(4.0 * z_s + 7.0, z_t).item() == pytest.approx(d(z_s, z_t).item(), rel=1e-4)


def test_dist_resolves_a_column_whose_samples_are_all_confident_in_one_class():
    """Two samples confident in the same class (margin 50 at T = 4): that column's probabilities are within
    ~1e-5 of 1 and ~1e-7 apart, which float32 resolves to 6e-8, and a correlation is scale-invariant. Computed
    in float32 this loss was 77.703 for float64's 77.643 (and the standardised one 4.6667 for 4.6657; up to
    17 % off elsewhere, see DIST's docstring). DIST computes in float64 inside."""
    from loss_references import dist_reference

    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 5, generator=g), 3 * torch.randn(2, 5, generator=g)
    z_s[:, 4] = z_s.max(1).values + 50.0
    got = DIST()(z_s, z_t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(dist_reference(z_s, z_t, 2.0, 2.0, 4.0).item(), rel=1e-6)
    # with standardize at C = 2 every z-scored row is ±1/sqrt(2) up to rounding: 17 % off in float32
    z_s, z_t = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    z_s[:, 1] += 40.0
    got = DIST(temperature=1.0, standardize=True)(z_s, z_t)
    assert got.item() == pytest.approx(dist_reference(z_s, z_t, 2.0, 2.0, 1.0, standardize=True).item(), rel=1e-6)


def test_dist_gradients_are_finite():
    z_s, z_t = logits(b=6, c=5)
    for m in (DIST(), DIST(standardize=True)):
        z = z_s.clone().requires_grad_()
        m(z, z_t).backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# -- CTKD ------------------------------------------------------------------------------------------------------
def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def paper_lambda(e, lo, hi, loops):
    """Li et al. 2023, Eq. (9): lambda_n = lo + 1/2 (hi - lo)(1 + cos((1 + min(n, E)/E) pi))."""
    return lo + 0.5 * (hi - lo) * (1 + math.cos((1 + min(e, loops) / loops) * math.pi))


def test_ctkd_defaults_follow_the_reference():
    p = CTKD.Params()
    assert p.init_temperature == pytest.approx(1 + 20 * sigmoid(1.0))  # raw parameter 1, t_start 1, t_end 20
    assert (p.min_temperature, p.max_temperature) == (1.0, 21.0)
    assert (p.lambda_min, p.lambda_max, p.curriculum_epochs) == (0.0, 1.0, 10)
    m = CTKD()
    assert m.temperature == pytest.approx(p.init_temperature, rel=1e-6)
    assert m.raw_temperature.item() == pytest.approx(1.0, rel=1e-5)
    assert isinstance(m.raw_temperature, torch.nn.Parameter) and m.raw_temperature.requires_grad


@pytest.mark.parametrize("lo,hi,loops", [(0.0, 1.0, 10), (0.2, 2.0, 4)])
def test_ctkd_lambda_follows_the_cosine_curriculum(lo, hi, loops):
    m = CTKD(lambda_min=lo, lambda_max=hi, curriculum_epochs=loops)
    for e in range(0, loops + 4):
        m.set_epoch(e)
        assert m.grl_lambda() == pytest.approx(paper_lambda(e, lo, hi, loops), abs=1e-12)
    assert m.grl_lambda(0) == pytest.approx(lo) and m.grl_lambda(loops) == pytest.approx(hi)
    assert m.grl_lambda(loops // 2 if loops % 2 == 0 else loops / 2) == pytest.approx((lo + hi) / 2)
    values = [m.grl_lambda(e) for e in range(loops + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_ctkd_at_lambda_zero_or_frozen_is_kd_at_its_temperature():
    z_s, z_t = logits()
    m = CTKD(init_temperature=6.0)
    m.set_epoch(0)  # lambda_min = 0
    z = z_s.clone().requires_grad_()
    loss = m(z, z_t)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(kd_np(*np64(z_s, z_t), 6.0), rel=1e-5)
    loss.backward()
    assert m.raw_temperature.grad.abs().item() == 0.0
    p_s, p_t = softmax_np(z_s.double().numpy(), 6.0), softmax_np(z_t.double().numpy(), 6.0)
    np.testing.assert_allclose(z.grad.numpy(), 6.0 * (p_s - p_t) / 8, rtol=1e-4, atol=1e-7)
    m.raw_temperature.requires_grad_(False)
    m.set_epoch(5)
    assert m(z_s, z_t).item() == pytest.approx(KD(6.0)(z_s, z_t).item(), rel=1e-6)


@pytest.mark.parametrize("epoch", [3, 10, 20])
def test_ctkd_reverses_the_temperature_gradient_scaled_by_lambda(epoch):
    z_s, z_t = logits(b=8, c=6)
    s, t = np64(z_s, z_t)
    t_min, t_max, t0 = 1.0, 21.0, 5.0
    m = CTKD(init_temperature=t0, min_temperature=t_min, max_temperature=t_max)
    m.set_epoch(epoch)
    lam = paper_lambda(epoch, 0.0, 1.0, 10)
    z = z_s.clone().requires_grad_()
    loss = m(z, z_t)
    loss.backward()
    # plain KD's derivative w.r.t. T (central differences in float64), chained through T = t_min + span * sigmoid(raw)
    h = 1e-5
    dl_dt = (kd_np(s, t, t0 + h) - kd_np(s, t, t0 - h)) / (2 * h)
    u = (t0 - t_min) / (t_max - t_min)
    dt_draw = (t_max - t_min) * u * (1 - u)
    assert abs(dl_dt) > 1e-3
    assert m.raw_temperature.grad.item() == pytest.approx(-lam * dl_dt * dt_draw, rel=1e-3)
    # the student's gradient is untouched: plain KD at T
    p_s, p_t = softmax_np(s, t0), softmax_np(t, t0)
    np.testing.assert_allclose(z.grad.numpy(), t0 * (p_s - p_t) / 8, rtol=1e-4, atol=1e-7)
    assert loss.item() == pytest.approx(kd_np(s, t, t0), rel=1e-5)


def test_ctkd_temperature_is_learnt_adversarially_through_the_objective():
    z_s, z_t = logits(b=16, c=10)
    layout = ModelLayout((), "")
    obj = DistillObjective.from_specs([{"type": "ctkd", "init_temperature": 4.0}], layout, layout)
    m = obj.knowledge["ctkd"]
    assert any(p is m.raw_temperature for p in obj.parameters())
    obj.set_epoch(10)  # lambda = 1
    opt = torch.optim.SGD(obj.parameters(), lr=0.5)
    before = m(z_s, z_t).item()
    for _ in range(3):
        opt.zero_grad()
        terms = obj(TapOutputs(z_s, {}), TapOutputs(z_t, {}), torch.zeros(16, dtype=torch.long))
        terms["loss"].backward()
        opt.step()
    after = m(z_s, z_t).item()
    assert after > before  # descending the reversed gradient ascends the distillation loss
    assert 1.0 < m.temperature < 21.0 and m.temperature != pytest.approx(4.0)


def test_ctkd_temperature_stays_in_its_range():
    m = CTKD(init_temperature=2.0, min_temperature=1.0, max_temperature=3.0)
    with torch.no_grad():
        m.raw_temperature.fill_(1e4)
    assert m.temperature == pytest.approx(3.0)
    with torch.no_grad():
        m.raw_temperature.fill_(-1e4)
    assert m.temperature == pytest.approx(1.0)
    z_s, z_t = logits()
    assert math.isfinite(m(z_s, z_t).item())


# -- parameter checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (DIST, {"temperature": 0}), (DIST, {"beta": -1}), (DIST, {"gamma": -0.5}), (KD, {"temperature": -1}),
    (CTKD, {"min_temperature": 0, "init_temperature": 2}), (CTKD, {"min_temperature": 5, "max_temperature": 4}),
    (CTKD, {"init_temperature": 25}), (CTKD, {"init_temperature": 1.0}), (CTKD, {"lambda_min": 2, "lambda_max": 1}),
    (CTKD, {"lambda_max": -1}), (CTKD, {"curriculum_epochs": 0}),
])
def test_invalid_parameters_are_rejected(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)
    with pytest.raises(ValidationError):
        cls.Params(**kwargs)


def test_params_reject_unknown_fields():
    with pytest.raises(ValidationError):
        DIST.Params(tau=4)
    with pytest.raises(ValidationError):
        CTKD.Params(temperature=4)


# -- MLKD ------------------------------------------------------------------------------------------------------
REF_TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)  # KD_ours.py: cfg.KD.TEMPERATURE (4), then the hard-coded 3, 5, 2, 6


def mlkd_np(s, t, temps=REF_TEMPS, s2=None, t2=None, weak_in_strong=(2.0, 6.0)):
    """Jin et al. 2023, written from the reference KD_ours.forward_train (float64 numpy), term by term: each
    loss is reduced to a scalar first, then ``(loss * mask).mean()`` as the reference does."""
    b, c = s.shape
    p_t1 = softmax_np(t)
    conf = p_t1.max(1)
    mask = (conf <= np.percentile(conf, 50)).astype(float)
    class_conf = p_t1.sum(0)
    class_mask = (class_conf <= np.percentile(class_conf, 50)).astype(float)

    def kd(a, z, temp):
        return temp * temp * kl_np(softmax_np(z, temp), softmax_np(a, temp))

    def bc(a, z, temp):
        ps, pt = softmax_np(a, temp), softmax_np(z, temp)
        return np.sum((pt @ pt.T - ps @ ps.T) ** 2) / b

    def cc(a, z, temp):
        ps, pt = softmax_np(a, temp), softmax_np(z, temp)
        return np.sum((pt.T @ pt - ps.T @ ps) ** 2) / c

    kd_weak = sum((kd(s, t, temp) * mask).mean() for temp in temps)
    cc_weak = sum((cc(s, t, temp) * class_mask).mean() for temp in temps)
    bc_weak = sum((bc(s, t, temp) * mask).mean() for temp in temps)
    loss = kd_weak + cc_weak + bc_weak
    if s2 is not None:  # loss_kd_strong: unmasked, and on the weak view at T = 2 and 6 (lines 154-161)
        loss += sum(kd(s, t, temp) if temp in weak_in_strong else kd(s2, t2, temp) for temp in temps)
    return loss


def test_mlkd_is_registered_with_the_reference_defaults():
    assert KNOWLEDGE.get("mlkd") is MLKD and MLKD.family == "response" and not MLKD.uses_target
    assert MLKD.paper() == "Jin et al. 2023"
    p = MLKD.Params()
    assert sorted(p.temperatures) == sorted(REF_TEMPS)
    assert (p.strong_augment, p.weak_in_strong_sum, p.weight) == (False, [2.0, 6.0], 1.0)
    assert MLKD().wants_strong_view is False and MLKD(strong_augment=True).wants_strong_view is True
    assert KD().wants_strong_view is False  # the base class's default


@pytest.mark.parametrize("b,c", [(8, 6), (7, 10), (16,
                                                   5)])  # even and odd batches: the median mask keeps B/2 or (B+1)/2
def test_mlkd_weak_view_matches_numpy(b, c):
    z_s, z_t = logits(b=b, c=c, seed=b)
    want = mlkd_np(*np64(z_s, z_t))
    assert MLKD()(z_s, z_t).item() == pytest.approx(want, rel=1e-5)
    want = mlkd_np(*np64(z_s, z_t), temps=(1.0, 2.5))
    assert MLKD(temperatures=[1.0, 2.5])(z_s, z_t).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("b,c", [(8, 6), (9, 4)])
def test_mlkd_with_a_strong_view_matches_numpy(b, c):
    z_s, z_t = logits(b=b, c=c, seed=b)
    z_s2, z_t2 = logits(b=b, c=c, seed=100 + b)
    s, t, s2, t2 = np64(z_s, z_t, z_s2, z_t2)
    m = MLKD(strong_augment=True)
    got = m(z_s, z_t, z_s2, z_t2).item()
    assert got == pytest.approx(mlkd_np(s, t, s2=s2, t2=t2), rel=1e-5)
    # the strong view matters, and the weak-only loss is a different number
    assert m(z_s, z_t).item() == pytest.approx(mlkd_np(s, t), rel=1e-5)
    assert abs(got - m(z_s, z_t).item()) > 1e-3
    # comparing the strong view at every temperature, as the reference apparently meant
    got = MLKD(strong_augment=True, weak_in_strong_sum=[])(z_s, z_t, z_s2, z_t2).item()
    assert got == pytest.approx(mlkd_np(s, t, s2=s2, t2=t2, weak_in_strong=()), rel=1e-5)
    with pytest.raises(ValueError, match="both"):
        m(z_s, z_t, z_s2, None)


def test_mlkd_closed_forms():
    z_s, z_t = logits(b=8, c=6)
    m = MLKD(strong_augment=True)
    # softmax ignores a per-sample shift: a shifted copy of the teacher matches it at every level
    shifted = z_t + 5 * torch.randn(8, 1)
    assert m(shifted, z_t).item() == pytest.approx(0.0, abs=1e-5)
    assert m(shifted, z_t, z_t.clone(), z_t).item() == pytest.approx(0.0, abs=1e-5)
    assert m(2 * z_t, z_t).item() > 1e-2  # a scaled copy does not
    # two samples, two classes, uniform student, one temperature: every term by hand. The teacher's
    # confidences sigmoid(a), sigmoid(b) and class sums differ when a != b: the "<= median" masks keep
    # one of two (1/2); when a == b they tie at the median and keep both (1).
    def by_hand(a, bb):
        u, v = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-bb))
        q = np.array([[u, 1 - u], [1 - v, v]])
        ins = np.mean(np.log(2) + np.sum(q * np.log(q), 1))          # KL(q || uniform), T = 1
        batch = np.sum((q @ q.T - 0.5) ** 2) / 2                     # student's B x B Gram: all 1/2
        klass = np.sum((q.T @ q - 0.5) ** 2) / 2                     # student's C x C Gram: all 2 * 1/4
        frac = 1.0 if a == bb else 0.5
        return frac * (ins + batch) + frac * klass
    one = MLKD(temperatures=[1.0])
    for a, bb in ((2.0, 0.5), (1.5, 1.5)):
        z_t2 = torch.tensor([[a, 0.0], [0.0, bb]])
        assert one(torch.zeros(2, 2), z_t2).item() == pytest.approx(by_hand(a, bb), rel=1e-5)


def test_mlkd_gradient_flows_only_into_the_student_and_matches_numpy():
    z_s, z_t = logits(b=6, c=5)
    z_s2, z_t2 = logits(b=6, c=5, seed=3)
    s, t, s2, t2 = np64(z_s, z_t, z_s2, z_t2)
    zs, zt = z_s.clone().requires_grad_(), z_t.clone().requires_grad_()
    zs2, zt2 = z_s2.clone().requires_grad_(), z_t2.clone().requires_grad_()
    MLKD(strong_augment=True)(zs, zt, zs2, zt2).backward()
    assert zt.grad is None and zt2.grad is None  # the teacher (and its confidence masks) get no gradient
    # central differences of the float64 reference, w.r.t. each student view
    h = 1e-5
    for grad, view in ((zs.grad, 0), (zs2.grad, 1)):
        num = np.zeros_like(s)
        for idx in np.ndindex(*s.shape):
            values = []
            for step in (h, -h):
                x = (s, s2)[view].copy()
                x[idx] += step
                values.append(mlkd_np(x, t, s2=s2, t2=t2) if view == 0 else mlkd_np(s, t, s2=x, t2=t2))
            num[idx] = (values[0] - values[1]) / (2 * h)
        assert np.abs(num).max() > 1e-3
        np.testing.assert_allclose(grad.numpy(), num, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("strong", [False, True])
def test_mlkd_is_float32_under_bf16_autocast(strong):
    g = torch.Generator().manual_seed(0)
    z_t = 3 * torch.randn(64, 10, generator=g)
    # A student close to its teacher: the Gram differences are then below bf16's resolution of the Gram
    # entries, and a loss whose matmuls ran under autocast would be ~7 % off.
    z_s = (z_t + 0.03 * torch.randn(64, 10, generator=g)).bfloat16()  # as a student's logits come out of autocast
    z_t2 = 3 * torch.randn(64, 10, generator=g)
    z_s2 = (z_t2 + 0.03 * torch.randn(64, 10, generator=g)).bfloat16()
    extra = (z_s2, z_t2) if strong else ()
    m = MLKD(strong_augment=strong)
    ref = m(z_s.float(), z_t, *(e.float() for e in extra))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(z_s, z_t, *extra)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # same inputs, so only the compute precision could differ
    assert low.item() == pytest.approx(ref.item(), rel=1e-5)


def test_mlkd_compute_reads_the_strong_view_only_when_asked():
    z_s, z_t = logits(b=8, c=6)
    z_s2, z_t2 = logits(b=8, c=6, seed=5)
    y = torch.zeros(8, dtype=torch.long)
    plain_s, plain_t = TapOutputs(z_s, {}), TapOutputs(z_t, {})
    with_s = TapOutputs(z_s, {}, TapOutputs(z_s2, {}))
    with_t = TapOutputs(z_t, {}, TapOutputs(z_t2, {}))
    weak_only = MLKD()(z_s, z_t).item()
    assert MLKD().compute(with_s, with_t, y).item() == pytest.approx(weak_only, rel=1e-6)  # view ignored
    m = MLKD(strong_augment=True)
    assert m.compute(with_s, with_t, y).item() == pytest.approx(m(z_s, z_t, z_s2, z_t2).item(), rel=1e-6)
    for s, t in ((plain_s, plain_t), (with_s, plain_t), (plain_s, with_t)):
        with pytest.raises(ValueError, match="no strong view"):
            m.compute(s, t, y)
    # through the objective, as the loop will call it
    layout = ModelLayout((), "")
    obj = DistillObjective.from_specs([{"type": "mlkd", "strong_augment": True, "weight": 0.9}], layout, layout,
                                      ce_weight=0.1)
    assert obj.knowledge["mlkd"].wants_strong_view
    terms = obj(with_s, with_t, y)
    assert terms["mlkd"].item() == pytest.approx(m(z_s, z_t, z_s2, z_t2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="no strong view"):
        obj(plain_s, plain_t, y)


@pytest.mark.parametrize("kwargs", [{"temperatures": []}, {"temperatures": [2.0, 0.0]}, {"weak_in_strong_sum": [-2.0]}])
def test_mlkd_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        MLKD(**kwargs)
    with pytest.raises(ValidationError):
        MLKD.Params(**kwargs)
    with pytest.raises(ValidationError):
        MLKD.Params(temperature=4)
