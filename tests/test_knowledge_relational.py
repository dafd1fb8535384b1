"""PKT and CC against float64 re-implementations of the papers' formulas written here (issue 12)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.relational import CC, PKT, taylor_rbf_correlation

torch.manual_seed(0)


def rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


# -- pkt -----------------------------------------------------------------------------------------------
def pkt_numpy(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    """Passalis & Tefas: conditional probabilities of the [0, 1]-shifted cosine kernel, KL(q_t || p_s),
    entries averaged over the B x B grid (RepDistiller's ``torch.mean``)."""
    def cond(x):
        b = len(x)
        k = np.empty((b, b))
        for i in range(b):
            for j in range(b):
                cos = x[i] @ x[j] / ((np.linalg.norm(x[i]) + eps) * (np.linalg.norm(x[j]) + eps))
                k[i, j] = (cos + 1) / 2
        return k / k.sum(1, keepdims=True)

    p, q = cond(s), cond(t)
    b = len(s)
    return sum(q[i, j] * math.log((q[i, j] + eps) / (p[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


@pytest.mark.parametrize("dims", [(16, 16), (8, 40)])
def test_pkt_matches_the_formula(dims):
    ds, dt = dims
    e_s, e_t = torch.randn(10, ds), torch.randn(10, dt) * 3
    got = PKT("t", "s")(e_s, e_t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(pkt_numpy(e_s.double().numpy(), e_t.double().numpy()), rel=1e-5)


def test_pkt_pools_spatial_maps_and_needs_no_connector():
    f_s, f_t = torch.randn(5, 4, 3, 3), torch.randn(5, 12, 2, 2)
    pkt = PKT("t", "s")
    want = pkt_numpy(f_s.double().mean((2, 3)).numpy(), f_t.double().mean((2, 3)).numpy())
    assert pkt(f_s, f_t).item() == pytest.approx(want, rel=1e-5)
    pkt.bind({"t": f_t}, {"s": f_s})
    assert list(pkt.parameters()) == []


def test_pkt_is_zero_for_identical_embeddings_and_positive_otherwise():
    e = torch.randn(12, 7)
    pkt = PKT("t", "s")
    assert pkt(e, e.clone()).item() == 0.0
    assert pkt(torch.randn(12, 7), e).item() > 0


def test_pkt_is_invariant_to_positive_scaling_of_each_embedding_and_to_rotations():
    e_s, e_t = torch.randn(9, 6, dtype=torch.float64) * 4, torch.randn(9, 11, dtype=torch.float64) * 4
    pkt = PKT("t", "s")
    base = pkt(e_s, e_t).item()
    scale_s = torch.rand(9, 1, dtype=torch.float64) * 10 + 0.5
    scale_t = torch.rand(9, 1, dtype=torch.float64) * 10 + 0.5
    assert pkt(scale_s * e_s, scale_t * e_t).item() == pytest.approx(base, rel=1e-6)
    assert pkt(e_s @ rotation(6, 1), e_t @ rotation(11, 2)).item() == pytest.approx(base, rel=1e-5)  # fp32 inside


def test_pkt_gradient_matches_finite_differences_of_the_formula_and_is_finite():
    e_s = torch.randn(6, 5, requires_grad=True)
    e_t = torch.randn(6, 9)
    PKT("t", "s")(e_s, e_t).backward()
    s, t, h = e_s.detach().double().numpy(), e_t.double().numpy(), 1e-6
    fd = np.zeros_like(s)
    for idx in np.ndindex(*s.shape):
        up, down = s.copy(), s.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (pkt_numpy(up, t) - pkt_numpy(down, t)) / (2 * h)
    np.testing.assert_allclose(e_s.grad.numpy(), fd, rtol=2e-3, atol=1e-7)
    z = torch.zeros(6, 5, requires_grad=True)  # zero rows: the norm's eps keeps them finite
    PKT("t", "s")(z, e_t).backward()
    assert torch.isfinite(z.grad).all()


# -- cc ------------------------------------------------------------------------------------------------
def cc_numpy(s: np.ndarray, t: np.ndarray, gamma: float, order: int) -> float:
    """Peng et al.: ψ(F)_ij = Σ_{p≤P} e^{-2γ} (2γ)^p / p! (F_i·F_j)^p of L2-normalised rows;
    L = ‖ψ_t − ψ_s‖² / B²."""
    def psi(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        b = len(x)
        out = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                c = float(x[i] @ x[j])
                out[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c ** p
                                for p in range(order + 1))
        return out

    return float(((psi(t) - psi(s)) ** 2).sum() / len(s) ** 2)


@pytest.mark.parametrize("gamma,order", [(0.4, 2), (1.0, 0), (0.7, 5)])
def test_cc_without_connector_matches_the_formula(gamma, order):
    e_s, e_t = torch.randn(8, 12), torch.randn(8, 30)
    got = CC("t", "s", gamma, order, connector=False)(e_s, e_t)
    assert got.dtype == torch.float32
    want = cc_numpy(e_s.double().numpy(), e_t.double().numpy(), gamma, order)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cc_taylor_kernel_converges_to_the_gaussian_rbf_of_unit_vectors():
    e = torch.randn(7, 5, dtype=torch.float64)
    u = e / e.norm(dim=1, keepdim=True)
    gamma = 0.8
    rbf = torch.exp(-gamma * torch.cdist(u, u) ** 2)
    torch.testing.assert_close(rbf, torch.exp(-2 * gamma * (1 - u @ u.t())))
    torch.testing.assert_close(taylor_rbf_correlation(e, gamma, 25), rbf, rtol=1e-10, atol=1e-12)
    # P = 2 truncates the series: off by at most the remainder e^{-2γ} Σ_{p>2} (2γ)^p / p!
    remainder = math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) for p in range(3, 40))
    assert (taylor_rbf_correlation(e, gamma, 2) - rbf).abs().max().item() <= remainder + 1e-12


def test_cc_connector_is_a_linear_map_to_the_teachers_width_made_in_bind():
    f_s, f_t = torch.randn(6, 10, 3, 3), torch.randn(6, 24)
    cc = CC.from_params({}, ModelLayout((), "te"), ModelLayout((), "se"))
    assert (cc.teacher_layers, cc.student_layers, cc.gamma, cc.order) == (["te"], ["se"], 0.4, 2)
    cc.bind({"te": f_t}, {"se": f_s})
    assert isinstance(cc.connector, torch.nn.Linear)
    assert (cc.connector.in_features, cc.connector.out_features) == (10, 24)
    w = np.random.default_rng(0).normal(size=(24, 10))
    b = np.random.default_rng(1).normal(size=24)
    with torch.no_grad():
        cc.connector.weight.copy_(torch.from_numpy(w))
        cc.connector.bias.copy_(torch.from_numpy(b))
    mapped = f_s.double().mean((2, 3)).numpy() @ w.T + b
    want = cc_numpy(mapped, f_t.double().numpy(), 0.4, 2)
    assert cc(f_s, f_t).item() == pytest.approx(want, rel=1e-5)
    assert CC("t", "s", connector=False).connector is None


def test_cc_is_zero_for_congruent_correlations():
    e_t = torch.randn(9, 6, dtype=torch.float64)
    cc = CC("t", "s", connector=False)
    assert cc(e_t, e_t.clone()).item() == 0.0
    # same cosines, hence same correlation matrix: a rotated, rescaled copy of the teacher
    assert cc(2.5 * e_t @ rotation(6, 3), e_t).item() == pytest.approx(0.0, abs=1e-12)  # fp32 inside
    assert cc(torch.randn(9, 6, dtype=torch.float64), e_t).item() > 0


def test_cc_gradients_reach_the_student_and_the_connector():
    f_s = torch.randn(6, 10, requires_grad=True)
    cc = CC("t", "s")
    cc.bind({"t": torch.randn(6, 4)}, {"s": f_s})
    loss = cc(f_s, torch.randn(6, 4))
    loss.backward()
    for g in (f_s.grad, cc.connector.weight.grad, cc.connector.bias.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# -- through the objective ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pkt", "cc"])
def test_registered_with_defaults_and_connector_params_in_the_objective(name):
    assert KNOWLEDGE.get(name).family == "relational"
    layouts = ModelLayout(("t1",), "te"), ModelLayout(("s1",), "se")
    obj = DistillObjective.from_specs([{"type": name, "weight": 0.5}], *layouts)
    t = TapOutputs(torch.randn(6, 5), {"te": torch.randn(6, 40)})
    s = TapOutputs(torch.randn(6, 5, requires_grad=True), {"se": torch.randn(6, 16, requires_grad=True)})
    obj.bind(t.features, s.features)
    assert obj.teacher_layers == ["te"] and obj.student_layers == ["se"]
    n_params = sum(p.numel() for p in obj.parameters())
    assert n_params == (16 * 40 + 40 if name == "cc" else 0)
    terms = obj(s, t, torch.zeros(6, dtype=torch.long))
    assert math.isfinite(terms[name].item())
    terms["loss"].backward()
    assert torch.isfinite(s.features["se"].grad).all() and s.features["se"].grad.abs().sum() > 0


def test_pkt_stays_accurate_when_the_kernels_are_nearly_uniform():
    """Related post-ReLU embeddings: cosines near 1, KL ~1e-9, second order in p - q (float32 is off by %)."""
    g = torch.Generator().manual_seed(5)
    e_t = torch.relu(3 * torch.randn(64, 64, generator=g)) + 1.0
    e_s = e_t + 0.1 * torch.randn(64, 64, generator=g)
    want = pkt_numpy(e_s.double().numpy(), e_t.double().numpy())
    assert want < 1e-6
    assert PKT("t", "s")(e_s, e_t).item() == pytest.approx(want, rel=1e-4)


# -- crd building blocks ---------------------------------------------------------------------------------
def test_crd_nce_loss_matches_the_formula():
    from kdray.knowledge.relational import nce_loss

    x = torch.rand(5, 9, dtype=torch.float64) * 1e-3
    n, k = 1000, 8
    xs = x.numpy()
    want = 0.0
    for i in range(5):
        want += math.log(xs[i, 0] / (xs[i, 0] + k / n + 1e-7))
        want += sum(math.log((k / n) / (xs[i, j] + k / n + 1e-7)) for j in range(1, 9))
    assert nce_loss(x, n).item() == pytest.approx(-want / 5, rel=1e-10)


def test_crd_memory_scores_normalisation_and_momentum_update():
    from kdray.knowledge.relational import ContrastMemory

    torch.manual_seed(1)
    mem = ContrastMemory(feat_dim=4, n_data=20, nce_t=0.5, nce_m=0.3)
    v_s = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    v_t = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    y = torch.tensor([2, 7, 11])
    idx = torch.cat([y[:, None], torch.randint(0, 20, (3, 5))], 1)
    m_s, m_t = mem.memory_s.clone(), mem.memory_t.clone()
    out_s, out_t = mem.scores(v_s, v_t, idx)
    raw_s = torch.exp(torch.einsum("bkd,bd->bk", m_t[idx], v_s) / 0.5)
    raw_t = torch.exp(torch.einsum("bkd,bd->bk", m_s[idx], v_t) / 0.5)
    z_s, z_t = raw_s.mean() * 20, raw_t.mean() * 20  # Z fixed from the first batch
    torch.testing.assert_close(out_s, raw_s / z_s)
    torch.testing.assert_close(out_t, raw_t / z_t)
    mem.update(v_s, v_t, y)
    for bank, old, v in ((mem.memory_s, m_s, v_s), (mem.memory_t, m_t, v_t)):
        mixed = 0.3 * old[y] + 0.7 * v
        torch.testing.assert_close(bank[y], mixed / mixed.norm(dim=1, keepdim=True))
        keep = torch.ones(20, dtype=torch.bool)
        keep[y] = False
        assert torch.equal(bank[keep], old[keep])
    mem.scores(v_s, v_t, idx)
    torch.testing.assert_close(mem.z, torch.stack([z_s, z_t]))  # not re-estimated
