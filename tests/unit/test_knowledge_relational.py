"""PKT, CC and CRD against float64 re-implementations of the papers' formulas written here (issue 12)."""
from __future__ import annotations

import io
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
    from kdray.knowledge.crd import nce_loss

    x = torch.rand(5, 9, dtype=torch.float64) * 1e-3
    n, k = 1000, 8
    xs = x.numpy()
    want = 0.0
    for i in range(5):
        want += math.log(xs[i, 0] / (xs[i, 0] + k / n + 1e-7))
        want += sum(math.log((k / n) / (xs[i, j] + k / n + 1e-7)) for j in range(1, 9))
    assert nce_loss(x, n).item() == pytest.approx(-want / 5, rel=1e-10)


def test_crd_memory_scores_normalisation_and_momentum_update():
    from kdray.knowledge.crd import ContrastMemory

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



# -- crd: the registered loss ----------------------------------------------------------------------------
CRD_SPEC = {"type": "crd", "weight": 0.8, "feat_dim": 6, "nce_k": 5, "nce_t": 0.5, "nce_m": 0.3}
N_DATA = 20


def crd_objective(spec=CRD_SPEC, n=N_DATA, labels=None, t_dim=12, s_shape=(8, 2, 2)):
    """An objective with only CRD (ce_weight 0), bound to a training split of ``n`` samples."""
    obj = DistillObjective.from_specs([spec], ModelLayout(("t1",), "te"), ModelLayout(("s1",), "se"), ce_weight=0.0)
    obj.bind_data(n, labels)
    obj.bind({"te": torch.randn(2, t_dim)}, {"se": torch.randn(2, *s_shape)})
    return obj, obj.knowledge["crd"]


def crd_batch(seed: int, b: int = 4, t_dim: int = 12, s_shape=(8, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    s = TapOutputs(torch.randn(b, 5, generator=g), {"se": torch.randn(b, *s_shape, generator=g, requires_grad=True)})
    t = TapOutputs(torch.randn(b, 5, generator=g), {"te": 2 * torch.randn(b, t_dim, generator=g)})
    return s, t, torch.randint(0, 5, (b,), generator=g)


def crd_numpy(e_s, e_t, w_s, b_s, w_t, b_t, m_s, m_t, cidx, tau, n, mu, eps=1e-7):
    """Tian et al. (RepDistiller CRDLoss): unit embeddings s, t; h^s_ij = exp(M^t_j·s_i/τ)/Z_s,
    h^t_ij = exp(M^s_j·t_i/τ)/Z_t, Z = N·mean of the first batch; NCE with P_n = 1/N for both; then the
    banks' rows i move to normalize(μ M_i + (1-μ) v_i). Returns the loss and the new banks."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    s, t = unit(e_s @ w_s.T + b_s), unit(e_t @ w_t.T + b_t)
    b, k1 = cidx.shape
    out_s = np.array([[math.exp(m_t[cidx[i, j]] @ s[i] / tau) for j in range(k1)] for i in range(b)])
    out_t = np.array([[math.exp(m_s[cidx[i, j]] @ t[i] / tau) for j in range(k1)] for i in range(b)])

    def nce(out):
        h, k = out / (out.mean() * n), k1 - 1
        total = 0.0
        for i in range(b):
            total += math.log(h[i, 0] / (h[i, 0] + k / n + eps))
            total += sum(math.log((k / n) / (h[i, j] + k / n + eps)) for j in range(1, k1))
        return -total / b

    new_s, new_t = m_s.copy(), m_t.copy()
    for i, row in enumerate(cidx[:, 0]):
        new_s[row] = unit((mu * m_s[row] + (1 - mu) * s[i])[None])[0]
        new_t[row] = unit((mu * m_t[row] + (1 - mu) * t[i])[None])[0]
    return nce(out_s) + nce(out_t), new_s, new_t


def numpy_state(crd):
    f = lambda x: x.detach().double().numpy().copy()  # noqa: E731
    return (f(crd.embed_s.linear.weight), f(crd.embed_s.linear.bias), f(crd.embed_t.linear.weight),
            f(crd.embed_t.linear.bias), f(crd.memory.memory_s), f(crd.memory.memory_t))


def test_crd_is_registered_cites_its_paper_and_defaults_to_the_embedding_layers():
    cls = KNOWLEDGE.get("crd")
    assert cls.family == "relational" and cls.uses_index and cls.paper() == "Tian et al. 2020"
    crd = cls.from_params({}, ModelLayout(("t1",), "te"), ModelLayout(("s1",), "se"))
    assert (crd.teacher_layers, crd.student_layers) == (["te"], ["se"])
    assert (crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_m, crd.negatives) == (128, 16384, 0.07, 0.5, "other_class")
    assert cls.Params().weight == 1.0
    crd.bind_data(50)  # K is capped at N - 1
    assert crd.k == 49 and crd.memory.memory_s.shape == (50, 128)
    assert not KNOWLEDGE.get("pkt").uses_index


def test_crd_loss_and_bank_update_match_the_formula():
    torch.manual_seed(3)
    obj, crd = crd_objective()
    s, t, y = crd_batch(4)
    idx = torch.tensor([3, 17, 0, 9])
    cidx = torch.cat([idx[:, None], torch.randint(0, N_DATA, (4, 5))], 1)
    crd.sample_contrast = lambda i: cidx  # fixed negatives
    w_s, b_s, w_t, b_t, m_s, m_t = numpy_state(crd)
    e_s = s.features["se"].detach().double().mean((2, 3)).numpy()  # spatial taps are pooled
    e_t = t.features["te"].double().numpy()
    want, new_s, new_t = crd_numpy(e_s, e_t, w_s, b_s, w_t, b_t, m_s, m_t, cidx.numpy(), 0.5, N_DATA, 0.3)
    terms = obj(s, t, y, index=idx)
    assert terms["crd"].dtype == torch.float32
    assert terms["crd"].item() == pytest.approx(want, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.8 * want, rel=1e-5)
    np.testing.assert_allclose(crd.memory.memory_s.double().numpy(), new_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(crd.memory.memory_t.double().numpy(), new_t, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(N_DATA), idx.numpy())
    assert np.array_equal(crd.memory.memory_s.double().numpy()[untouched], m_s[untouched])
    terms["loss"].backward()  # the gradient reaches the student's taps and both connectors
    for g in (s.features["se"].grad, crd.embed_s.linear.weight.grad, crd.embed_t.linear.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_crd_sampler_positive_first_then_negatives_of_the_other_classes():
    labels = torch.arange(30) % 3
    obj, crd = crd_objective({**CRD_SPEC, "nce_k": 3000}, 30, labels)
    assert crd.k == 29
    crd.k = 3000  # many draws: every other-class sample shows up, no same-class one
    idx = torch.tensor([0, 4, 29, 7])
    c = crd.sample_contrast(idx)
    assert c.shape == (4, 3001) and torch.equal(c[:, 0], idx)
    for row, i in zip(c, idx):
        others = set(torch.nonzero(labels != labels[i]).view(-1).tolist())
        assert set(row[1:].tolist()) == others
    torch.manual_seed(0)  # the loop's per-rank, per-epoch seeding fixes the draws
    a = crd.sample_contrast(idx)
    torch.manual_seed(0)
    assert torch.equal(a, crd.sample_contrast(idx))
    # uniform: any sample; a dry run (no labels) and a one-class split draw uniformly too
    for spec, lab in (({**CRD_SPEC, "negatives": "uniform"}, labels), (CRD_SPEC, None),
                      (CRD_SPEC, torch.zeros(30, dtype=torch.long))):
        _, crd = crd_objective(spec, 30, lab)
        crd.k = 3000
        assert set(crd.sample_contrast(idx)[:, 1:].reshape(-1).tolist()) == set(range(30))


def test_crd_bank_is_in_the_state_dict_not_a_buffer_and_a_resume_continues_exactly():
    torch.manual_seed(5)
    obj, crd = crd_objective(labels=torch.arange(N_DATA) % 4)
    assert list(obj.buffers()) == []  # DDP would broadcast buffers from rank 0 at every forward
    s, t, y = crd_batch(6)
    obj(s, t, y, index=torch.tensor([1, 2, 3, 4]))
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)  # as the loop's train_state.pt
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "knowledge.crd.memory._extra_state" in state
    torch.manual_seed(99)  # another initial bank and connectors
    obj2, crd2 = crd_objective(labels=torch.arange(N_DATA) % 4)
    assert not torch.equal(crd2.memory.memory_s, crd.memory.memory_s)
    obj2.load_state_dict(state)
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(getattr(crd2.memory, name), getattr(crd.memory, name)), name
    assert crd2.memory._z_set
    s, t, y = crd_batch(7)
    i = torch.tensor([5, 6, 2, 19])
    torch.manual_seed(1)
    a = obj(s, t, y, index=i)["crd"]
    torch.manual_seed(1)
    b = obj2(s, t, y, index=i)["crd"]
    assert a.item() == b.item()
    assert torch.equal(crd.memory.memory_s, crd2.memory.memory_s) and torch.equal(crd.memory.z, crd2.memory.z)
    obj3, _ = crd_objective(n=N_DATA + 1)  # another training split cannot take this bank
    with pytest.raises(ValueError, match="memory_s"):
        obj3.load_state_dict(state)
    obj2.double()  # the banks follow .to() but stay float32
    assert crd2.memory.memory_s.dtype == torch.float32 and crd2.embed_s.linear.weight.dtype == torch.float64


def test_crd_needs_the_sample_indices_and_the_training_split():
    obj, _ = crd_objective()
    s, t, y = crd_batch(1)
    with pytest.raises(ValueError, match="index"):
        obj(s, t, y)
    bare = DistillObjective.from_specs([CRD_SPEC], ModelLayout((), "te"), ModelLayout((), "se"))
    with pytest.raises(ValueError, match="bind_data"):
        bare(s, t, y, index=torch.arange(4))


def test_crd_repeated_indices_update_deterministically_with_the_first_occurrence():
    from kdray.knowledge.crd import ContrastMemory

    torch.manual_seed(2)
    mem = ContrastMemory(feat_dim=3, n_data=10, nce_m=0.5)
    old = mem.memory_s.clone()
    v = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    mem.update(v, v, torch.tensor([7, 2, 7, 7]))  # a padded shard repeats sample 7
    for row, src in ((7, 0), (2, 1)):
        mixed = 0.5 * old[row] + 0.5 * v[src]
        torch.testing.assert_close(mem.memory_s[row], mixed / mixed.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_crd_under_autocast_is_a_finite_float32_loss(dtype):
    torch.manual_seed(0)
    obj, crd = crd_objective({"type": "crd"}, 500, torch.arange(500) % 10, t_dim=64, s_shape=(32, 4, 4))
    s, t, y = crd_batch(2, b=16, t_dim=64, s_shape=(32, 4, 4))
    s_low = TapOutputs(s.logits.to(dtype), {"se": s.features["se"].to(dtype)})
    with torch.autocast("cpu", dtype=dtype):
        terms = obj(s_low, t, y, index=torch.arange(16) * 7)
    assert terms["crd"].dtype == torch.float32 and torch.isfinite(terms["crd"])
    assert crd.memory.memory_s.dtype == torch.float32 and torch.isfinite(crd.memory.memory_s).all()


# -- crd under DDP: two gloo processes ---------------------------------------------------------------------
DDP_B, DDP_N = 3, 16


def ddp_inputs():
    g = torch.Generator().manual_seed(11)
    e_s, e_t = torch.randn(2 * DDP_B, 8, generator=g), torch.randn(2 * DDP_B, 12, generator=g)
    idx = torch.tensor([5, 0, 12, 9, 3, 14])
    cidx = [torch.cat([idx[:, None], torch.randint(0, DDP_N, (2 * DDP_B, 4), generator=g)], 1) for _ in range(2)]
    return e_s, e_t, idx, cidx


def ddp_objective(init_seed: int, embeds: dict | None):
    torch.manual_seed(init_seed)
    obj, crd = crd_objective({**CRD_SPEC, "nce_k": 4}, DDP_N, t_dim=12, s_shape=(8,))
    if embeds is not None:
        crd.load_state_dict({**crd.state_dict(), **embeds})
    return obj, crd


def ddp_step(obj, crd, e_s, e_t, idx, cidx):
    crd.sample_contrast = lambda i: cidx
    s = TapOutputs(torch.zeros(len(idx), 5), {"se": e_s})
    t = TapOutputs(torch.zeros(len(idx), 5), {"te": e_t})
    terms = obj(s, t, torch.zeros(len(idx), dtype=torch.long), index=idx)
    terms["loss"].backward()
    return terms["crd"].item()


def _ddp_worker(rank: int, port: int, out: str, embeds: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        obj, crd = ddp_objective(100 + rank, embeds)  # each rank its own initial banks: rank 0's win
        step = torch.nn.parallel.DistributedDataParallel(obj)  # as the loop wraps it (broadcast_buffers on)
        e_s, e_t, idx, cidx = ddp_inputs()
        mine = slice(rank * DDP_B, (rank + 1) * DDP_B)
        losses = []
        for c in cidx:  # two steps: the second scores against the banks both ranks updated alike
            crd.sample_contrast = lambda i, c=c: c[mine]
            s = TapOutputs(torch.zeros(DDP_B, 5), {"se": e_s[mine]})
            t = TapOutputs(torch.zeros(DDP_B, 5), {"te": e_t[mine]})
            terms = step(s, t, torch.zeros(DDP_B, dtype=torch.long), index=idx[mine])
            terms["loss"].backward()
            losses.append(terms["crd"].item())
        torch.save({"memory_s": crd.memory.memory_s, "memory_t": crd.memory.memory_t, "z": crd.memory.z,
                    "losses": losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_crd_banks_stay_identical_across_ddp_ranks_and_equal_one_process_on_the_whole_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    _, crd0 = ddp_objective(100, None)
    embeds = {k: v for k, v in crd0.state_dict().items() if k.startswith("embed_")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path), embeds), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(r0[name], r1[name]), name
    # one process, rank 0's initial banks, the two ranks' batches concatenated
    obj, crd = ddp_objective(100, embeds)
    e_s, e_t, idx, cidx = ddp_inputs()
    ref = [ddp_step(obj, crd, e_s, e_t, idx, c) for c in cidx]
    for name in ("memory_s", "memory_t", "z"):
        torch.testing.assert_close(r0[name], getattr(crd.memory, name), rtol=1e-6, atol=1e-7)
    # the mean over rows of the whole batch is the mean of the two ranks' means
    for (a, b), want in zip(zip(r0["losses"], r1["losses"]), ref):
        assert (a + b) / 2 == pytest.approx(want, rel=1e-5)


# -- crd in the training loop ------------------------------------------------------------------------------
def test_a_crd_run_resumes_with_its_memory_bank_exactly(tmp_path, blobs_teacher):
    """The loop binds the split (size and labels), passes each batch's idx, checkpoints the bank with the
    objective: a run stopped after epoch 2 and resumed ends where the uninterrupted run does."""
    from sweep_helpers import straight_and_resumed

    from kdray.config import RunConfig
    from kdray.train.loop import STATE_FILE, STUDENT_FILE

    cfg = RunConfig.model_validate({
        "dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"}, "teacher": {"checkpoint": "unused.pt"},
        "knowledge": [{"type": "crd", "weight": 0.8, "feat_dim": 16, "nce_k": 64}],
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "optimizer": "sgd"}})
    loop = {"run": cfg.model_dump(mode="json"), "teacher_records": [blobs_teacher]}
    straight, resumed, _ = straight_and_resumed(loop, tmp_path)
    assert all(math.isfinite(r["loss_crd"]) and r["loss_crd"] > 0 for r in straight.reports)
    assert [r["epoch"] for r in resumed.reports] == [3]
    sa, sb = (torch.load(s.last_checkpoint / STATE_FILE, weights_only=True)["objective"] for s in (straight, resumed))
    bank_a, bank_b = sa["knowledge.crd.memory._extra_state"], sb["knowledge.crd.memory._extra_state"]
    from kdray.data import load_dataset

    n_train = len(load_dataset(cfg.dataset).train)
    assert bank_a["memory_s"].shape == (n_train, 16) and bool((bank_a["z"] > 0).all())
    for bank in (bank_a["memory_s"], bank_a["memory_t"]):  # every sample's row was updated (unit norm)
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(n_train))
    for k in ("memory_s", "memory_t", "z"):
        torch.testing.assert_close(bank_a[k], bank_b[k], rtol=1e-5, atol=1e-6)
    a = torch.load(straight.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    b = torch.load(resumed.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed.reports[-1]["loss_crd"] == pytest.approx(straight.reports[-1]["loss_crd"], rel=1e-5)
