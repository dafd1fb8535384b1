"""Every knowledge type against values derived independently here (numpy, float64, the papers' formulas)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.connectors import Regressor
from kdray.knowledge.feature import AT, FitNet
from kdray.knowledge.relational import RKD, SP, angle_potential, distance_potential
from kdray.knowledge.response import DKD, KD
from kdray.registry import Registry, RegistryError

torch.manual_seed(0)


def softmax_np(z, t=1.0):
    z = z / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# -- the registry ------------------------------------------------------------------------------------
def test_registry_rejects_duplicates_and_lists_known_names():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(RegistryError, match="duplicate thing name 'a'"):
        reg.register("a", 2)
    with pytest.raises(RegistryError, match=r"unknown thing 'b'.*Known things: a"):
        reg.get("b")


def test_every_family_is_registered_with_paper_and_formula():
    assert set(KNOWLEDGE.names()) >= {"kd", "dkd", "fitnet", "at", "rkd", "sp"}
    for name, cls in KNOWLEDGE.items():
        doc = cls.__doc__ or ""
        assert re.search(r"(19|20)\d\d", doc), f"{name} cites no paper year"
        assert "math::" in doc, f"{name} states no formula"
        assert cls.family in ("response", "feature", "relational", "token", "cross_token")
        # Which reference implementation it matches (repository, file) and what it does differently, if anything.
        assert re.search(r"(Reference|matched\s+against)", doc) and re.search(r"``[\w/.-]+\.(py|md)``", doc), (
            f"{name} names no reference implementation (repository and file)")
        assert re.search(r"[Dd]ifference", doc), f"{name} states no deliberate difference (or 'none')"



# -- kd ------------------------------------------------------------------------------------------------
def test_kd_is_zero_for_equal_logits():
    z = torch.randn(6, 10)
    assert KD(4.0)(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0, 10.0])
def test_kd_matches_formula_and_gradient(t):
    z_s = torch.randn(8, 5, dtype=torch.float32, requires_grad=True)
    z_t = torch.randn(8, 5) * 3
    loss = KD(t)(z_s, z_t)
    loss.backward()
    p_s, p_t = softmax_np(z_s.detach().double().numpy(), t), softmax_np(z_t.double().numpy(), t)
    expected = t * t * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    grad = t * (p_s - p_t) / 8  # d/dz_s of T^2 KL(p_t || p_s) averaged over the batch
    np.testing.assert_allclose(z_s.grad.numpy(), grad, rtol=1e-4, atol=1e-6)


# -- dkd -----------------------------------------------------------------------------------------------
def dkd_numpy(z_s, z_t, y, alpha, beta, t):
    p_s, p_t = softmax_np(z_s, t), softmax_np(z_t, t)
    n = len(y)
    tckd = nckd = 0.0
    for i in range(n):
        bs = np.array([p_s[i, y[i]], 1 - p_s[i, y[i]]])
        bt = np.array([p_t[i, y[i]], 1 - p_t[i, y[i]]])
        tckd += np.sum(bt * np.log(bt / bs))
        mask = np.arange(z_s.shape[1]) != y[i]
        qs = softmax_np(z_s[i:i + 1, mask], t)[0]
        qt = softmax_np(z_t[i:i + 1, mask], t)[0]
        nckd += np.sum(qt * np.log(qt / qs))
    return (alpha * tckd + beta * nckd) / n * t * t


def test_dkd_matches_numpy_formula():
    z_s, z_t = torch.randn(7, 6), torch.randn(7, 6) * 2
    y = torch.randint(0, 6, (7,))
    got = DKD(alpha=1.5, beta=6.0, temperature=3.0)(z_s, z_t, y).item()
    want = dkd_numpy(z_s.double().numpy(), z_t.double().numpy(), y.numpy(), 1.5, 6.0, 3.0)
    assert got == pytest.approx(want, rel=1e-4)


def test_dkd_reformulates_kd_per_sample():
    """Zhao et al. Eq. (1): KD = TCKD + (1 - p_t[y]) NCKD, so DKD with those weights equals KD."""
    z_s, z_t = torch.randn(1, 8), torch.randn(1, 8) * 2
    y = torch.tensor([3])
    t = 2.0
    p_t_y = torch.softmax(z_t / t, 1)[0, 3].item()
    dkd = DKD(alpha=1.0, beta=1.0 - p_t_y, temperature=t)(z_s, z_t, y).item()
    assert dkd == pytest.approx(KD(t)(z_s, z_t).item(), rel=1e-4)


def test_dkd_warmup_ramps_linearly():
    z_s, z_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    full = DKD(warmup_epochs=0)(z_s, z_t, y).item()
    ramp = DKD(warmup_epochs=10)
    ramp.set_epoch(5)
    assert ramp(z_s, z_t, y).item() == pytest.approx(0.5 * full, rel=1e-5)


# -- fitnet --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_shape,t_shape,kind", [
    ((8, 6, 6), (16, 6, 6), "conv1x1"), ((8, 12, 12), (16, 6, 6), "conv1x1"), ((4, 20), (25, 10), "conv1x1"),
    ((32,), (64,), "linear"), ((100,), (25, 10), "flatten-linear"),
])
def test_fitnet_regressor_shape_is_inferred(s_shape, t_shape, kind):
    reg = Regressor(s_shape, t_shape)
    assert reg.kind == kind
    assert reg(torch.randn(3, *s_shape)).shape == (3, *t_shape)


def test_fitnet_is_mse_after_the_regressor_and_zero_for_an_exact_hint():
    f_s, f_t = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    fit = FitNet("t", "s", regressor="linear")  # the plain 1x1 convolution (conv_bn_relu: test_knowledge_authors)
    fit.bind({"t": f_t}, {"s": f_s})
    w, b = np.random.default_rng(0).normal(size=(8, 8)), np.random.default_rng(1).normal(size=8)
    with torch.no_grad():  # a known 1x1 convolution: r(F_s)[c] = sum_k w[c, k] F_s[k] + b[c]
        fit.regressor.proj.weight.copy_(torch.from_numpy(w).view(8, 8, 1, 1))
        fit.regressor.proj.bias.copy_(torch.from_numpy(b))
    r = np.einsum("ck,nkhw->nchw", w, f_s.double().numpy()) + b[None, :, None, None]
    want = ((r - f_t.double().numpy()) ** 2).mean()
    assert fit(f_s, f_t).item() == pytest.approx(want, rel=1e-5)
    with torch.no_grad():  # identity regressor: the hint equals the guided layer, loss 0
        fit.regressor.proj.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        fit.regressor.proj.bias.zero_()
    assert fit(f_t, f_t).item() == pytest.approx(0.0, abs=1e-10)


# -- at ------------------------------------------------------------------------------------------------
def at_numpy(f_s, f_t):
    def q(f):
        a = (f ** 2).mean(1).reshape(f.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    return np.mean((q(f_s) - q(f_t)) ** 2)


def test_at_of_identical_maps_is_zero_and_matches_formula():
    f = torch.randn(4, 8, 6, 6)
    at = AT(["t"], ["s"])
    assert at(f, f.clone()).item() == pytest.approx(0.0, abs=1e-10)
    f_s, f_t = torch.randn(4, 8, 6, 6), torch.randn(4, 32, 6, 6)  # channels may differ
    assert at(f_s, f_t).item() == pytest.approx(at_numpy(f_s.double().numpy(), f_t.double().numpy()), rel=1e-5)


def test_at_ignores_scale_and_pools_to_the_smaller_map():
    at = AT(["t"], ["s"])
    f_s, f_t = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    assert at(3.0 * f_s, f_t).item() == pytest.approx(at(f_s, f_t).item(), rel=1e-5)
    assert math.isfinite(at(f_s, f_t).item())
    assert at([f_s, f_s], [f_t, f_t]).item() == pytest.approx(2 * at(f_s, f_t).item(), rel=1e-6)


# -- rkd -----------------------------------------------------------------------------------------------
def test_rkd_angle_potential_matches_the_direct_definition():
    e = torch.randn(9, 5, dtype=torch.float64)
    d = e.unsqueeze(0) - e.unsqueeze(1)  # d[j, i] = e_i - e_j
    n = F.normalize(d, p=2, dim=2)
    direct = torch.bmm(n, n.transpose(1, 2))  # [j, i, k] = cos of the angle at vertex j
    torch.testing.assert_close(angle_potential(e), direct, rtol=1e-6, atol=1e-8)


def test_rkd_distance_potential_has_unit_mean_off_diagonal():
    psi = distance_potential(torch.randn(10, 4))
    off = psi[~torch.eye(10, dtype=torch.bool)]
    assert off.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(psi.diagonal() == 0)


@pytest.mark.parametrize("dims", [(16, 16), (7, 16)])
def test_rkd_is_invariant_to_scaling_rotating_and_translating(dims):
    ds, dt = dims
    e_s, e_t = torch.randn(12, ds, dtype=torch.float64), torch.randn(12, dt, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dt, dt, dtype=torch.float64))
    rkd = RKD("t", "s")
    base = rkd(e_s, e_t).item()
    assert rkd(e_s, 3.7 * e_t @ q + 2.0).item() == pytest.approx(base, rel=1e-6)
    qs, _ = torch.linalg.qr(torch.randn(ds, ds, dtype=torch.float64))
    assert rkd(0.2 * e_s @ qs, e_t).item() == pytest.approx(base, rel=1e-6)
    assert rkd(e_t, 5.0 * e_t).item() == pytest.approx(0.0, abs=1e-9)


def test_rkd_weights_its_two_terms():
    e_s, e_t = torch.randn(8, 4), torch.randn(8, 6)
    d = RKD("t", "s", 1.0, 0.0)(e_s, e_t).item()
    a = RKD("t", "s", 0.0, 1.0)(e_s, e_t).item()
    assert RKD("t", "s", 25.0, 50.0)(e_s, e_t).item() == pytest.approx(25 * d + 50 * a, rel=1e-5)


# -- sp ------------------------------------------------------------------------------------------------
def test_sp_matches_formula_zero_for_identical_and_ignores_scale():
    f_s, f_t = torch.randn(6, 4, 3, 3), torch.randn(6, 10)
    sp = SP(["t"], ["s"])
    qs, qt = f_s.double().reshape(6, -1).numpy(), f_t.double().numpy()
    gs, gt = qs @ qs.T, qt @ qt.T
    gs, gt = gs / np.linalg.norm(gs, axis=1, keepdims=True), gt / np.linalg.norm(gt, axis=1, keepdims=True)
    assert sp(f_s, f_t).item() == pytest.approx(((gt - gs) ** 2).sum() / 36, rel=1e-5)
    assert sp(f_s, f_s.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert sp(4.0 * f_s, f_t).item() == pytest.approx(sp(f_s, f_t).item(), rel=1e-5)


# -- every registered type through the objective ---------------------------------------------------------
@pytest.fixture
def outputs():
    # t1/t2 have 16 channels, the width of the student's vector taps (16 channels at one position): fsp
    # compares FSP matrices, which exist only for equal channel counts (it refuses others in bind).
    t = TapOutputs(torch.randn(6, 5), {"t1": torch.randn(6, 16, 10), "t2": torch.randn(6, 16, 5), "te": torch.randn(6,
                                                                                                                    40),
                                          "ta": torch.randn(6, 2, 4, 4).softmax(-1), "tv": torch.randn(6, 4, 8)})
    s_feats = {"s1": torch.randn(6, 16, requires_grad=True), "s2": torch.randn(6, 16, requires_grad=True),
               "se": torch.randn(6, 16, requires_grad=True),
               "sa": torch.rand(6, 2, 4, 4).div(4).requires_grad_(), "sv": torch.randn(6, 4, 8, requires_grad=True)}
    s = TapOutputs(torch.randn(6, 5, requires_grad=True), s_feats)
    return s, t


@pytest.mark.parametrize("name", KNOWLEDGE.names())
def test_every_registered_type_gives_a_finite_scalar_with_gradients(name, outputs):
    s, t = outputs
    layouts = ModelLayout(("t1", "t2"), "te", ("ta",), ("tv",)), ModelLayout(("s1", "s2"), "se", ("sa",), ("sv",))
    obj = DistillObjective.from_specs([{"type": name, "weight": 2.0}], *layouts)
    obj.bind_data(6)  # per-sample state (CRD's memory bank): the batch is the whole training split
    obj.bind(t.features, s.features)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    terms = obj(s, t, y, index=torch.arange(6))
    assert set(terms) == {"ce", name, "loss"}
    assert terms[name].dim() == 0 and math.isfinite(terms[name].item())
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + 2.0 * terms[name].item(), rel=1e-5)
    terms["loss"].backward()
    grads = [s.logits.grad] + [v.grad for v in s.features.values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_objective_reports_each_term_of_a_combination(outputs):
    s, t = outputs
    obj = DistillObjective.from_specs([{"type": "kd", "weight": 0.5}, {"type": "sp", "weight": 3.0}],
                                      ModelLayout(("t1", "t2"), "te"), ModelLayout(("s1", "s2"), "se"), ce_weight=0.1)
    terms = obj(s, t, torch.zeros(6, dtype=torch.long))
    assert set(terms) == {"ce", "kd", "sp", "loss"}
    expected = 0.1 * terms["ce"] + 0.5 * terms["kd"] + 3.0 * terms["sp"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="listed twice"):
        DistillObjective.from_specs([{"type": "kd"}, {"type": "kd"}], ModelLayout((), ""), ModelLayout((), ""))
