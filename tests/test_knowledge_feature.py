"""NST, FSP, AB and VID against float64 re-implementations written here from the papers' formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.feature import AB, FSP, NST, VID, fsp_matrix

RNG = np.random.default_rng(0)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def block_mean(f: np.ndarray, k: int) -> np.ndarray:
    """Average-pool (B, C, H, W) by k x k blocks (adaptive pooling when H, W are multiples of k)."""
    b, c, h, w = f.shape
    return f.reshape(b, c, h // k, k, w // k, k).mean(axis=(3, 5))


# -- nst -----------------------------------------------------------------------------------------------
def nst_np(f_s: np.ndarray, f_t: np.ndarray) -> float:
    """MMD^2 with k(x, y) = (x.y)^2 through its explicit feature map phi(x) = x x^T:
    MMD^2 = || mean_i phi(s_i) - mean_j phi(t_j) ||_F^2 per sample, averaged over the batch."""
    def phi_mean(f):
        v = f.reshape(f.shape[0], f.shape[1], -1)
        v = v / np.linalg.norm(v, axis=2, keepdims=True)
        return np.einsum("bin,bim->bnm", v, v) / v.shape[1]
    return float(np.mean(np.sum((phi_mean(f_s) - phi_mean(f_t)) ** 2, axis=(1, 2))))


def test_nst_matches_the_mmd_of_the_explicit_feature_map():
    f_s, f_t = RNG.normal(size=(4, 6, 5, 5)), RNG.normal(size=(4, 9, 5, 5))  # channels may differ
    assert NST(["t"], ["s"])(t64(f_s), t64(f_t)).item() == pytest.approx(nst_np(f_s, f_t), rel=1e-4)


def test_nst_pools_the_larger_map_and_sums_over_pairs():
    nst = NST(["t1", "t2"], ["s1", "s2"])
    s1, t1 = RNG.normal(size=(3, 4, 8, 8)), RNG.normal(size=(3, 5, 4, 4))
    s2, t2 = RNG.normal(size=(3, 4, 2, 2)), RNG.normal(size=(3, 6, 4, 4))
    want = nst_np(block_mean(s1, 2), t1) + nst_np(s2, block_mean(t2, 2))
    got = nst([t64(s1), t64(s2)], [t64(t1), t64(t2)]).item()
    assert got == pytest.approx(want, rel=1e-4)


def test_nst_is_zero_for_identical_maps_and_ignores_positive_channel_scales_and_order():
    nst = NST(["t"], ["s"])
    f = torch.randn(4, 8, 6, 6)
    assert nst(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    g = torch.randn(4, 5, 6, 6)
    scale = torch.rand(1, 8, 1, 1) * 10 + 0.1  # each channel normalised: a positive scale changes nothing
    assert nst(f * scale, g).item() == pytest.approx(nst(f, g).item(), rel=1e-5)
    assert nst(f[:, torch.randperm(8)], g).item() == pytest.approx(nst(f, g).item(), rel=1e-5)  # a set of channels
    assert nst(f, g).item() > 0


# -- fsp -----------------------------------------------------------------------------------------------
def fsp_np(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    h, w = f1.shape[2:]
    return np.einsum("bihw,bjhw->bij", f1, f2) / (h * w)


def test_fsp_matrix_of_a_hand_made_2x2_case():
    # F1: 2 channels over a 1x2 map, [1, 2] and [3, 4]; F2: the unit maps [1, 0] and [0, 1].
    f1 = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    f2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    # G_ij = (1/hw) sum_x F1_i(x) F2_j(x) = 1/2 [[1, 2], [3, 4]]
    torch.testing.assert_close(fsp_matrix(f1, f2), torch.tensor([[[0.5, 1.0], [1.5, 2.0]]]))
    # against a student whose second layer is silent: G_S = 0, loss = mean(G_T^2) = (0.25 + 1 + 2.25 + 4) / 4
    fsp = FSP(["t1", "t2"], ["s1", "s2"])
    assert fsp([f1, torch.zeros_like(f2)], [f1, f2]).item() == pytest.approx(1.875)


def test_fsp_matches_formula_over_consecutive_pairs_with_pooling():
    s = [RNG.normal(size=(3, 4, 8, 8)), RNG.normal(size=(3, 6, 4, 4)), RNG.normal(size=(3, 5, 4, 4))]
    t = [RNG.normal(size=(3, 4, 8, 8)) * 2, RNG.normal(size=(3, 6, 4, 4)), RNG.normal(size=(3, 5, 2, 2))]

    def mats(f):  # (l1, l2) with l1 pooled 8x8 -> 4x4; (l2, l3) with the larger of the two pooled
        a, b = f[2].shape[2], f[1].shape[2]
        second = fsp_np(f[1], f[2]) if a == b else fsp_np(block_mean(f[1], b // a), f[2])
        return [fsp_np(block_mean(f[0], 2), f[1]), second]

    want = sum(np.mean((gs - gt) ** 2) for gs, gt in zip(mats(s), mats(t)))
    fsp = FSP(["a", "b", "c"], ["x", "y", "z"])
    assert fsp([t64(f) for f in s], [t64(f) for f in t]).item() == pytest.approx(want, rel=1e-4)
    assert fsp([t64(f) for f in t], [t64(f) for f in t]).item() == pytest.approx(0.0, abs=1e-10)


def test_fsp_of_one_layer_is_its_channel_gram_matrix():
    f_s, f_t = RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 3, 4, 4))
    want = np.mean((fsp_np(f_s, f_s) - fsp_np(f_t, f_t)) ** 2)
    assert FSP(["t"], ["s"])(t64(f_s), t64(f_t)).item() == pytest.approx(want, rel=1e-4)


def test_fsp_refuses_unequal_channels_at_bind_naming_the_layers():
    fsp = FSP(["layer1", "layer2"], ["stage1", "stage2"])
    t = {"layer1": torch.randn(2, 16, 8, 8), "layer2": torch.randn(2, 32, 4, 4)}
    s = {"stage1": torch.randn(2, 16, 8, 8), "stage2": torch.randn(2, 24, 4, 4)}
    with pytest.raises(ValueError, match=r"'layer1' -> 'layer2' give a 16x32.*'stage1' -> 'stage2' a 16x24"):
        fsp.bind(t, s)
    fsp.bind(t, {"stage1": s["stage1"], "stage2": torch.randn(2, 32, 2, 2)})  # sizes may differ, channels not


# -- ab ------------------------------------------------------------------------------------------------
def ab_np(r: list[np.ndarray], t: list[np.ndarray], margin: float = 1.0) -> float:
    """Heo et al.'s alternative L2 on connector outputs r against teacher pre-activations t, element by element,
    with RepDistiller's weights 2^(k-K) and scale 3/1000 per sample."""
    total, n = 0.0, len(r)
    for k, (rk, tk) in enumerate(zip(r, t), start=1):
        loss = 0.0
        for rv, tv in zip(rk.ravel(), tk.ravel()):
            if tv > 0 and rv <= margin:
                loss += (rv - margin) ** 2
            elif tv <= 0 and rv > -margin:
                loss += (rv + margin) ** 2
        total += 2.0 ** (k - n) * loss / rk.shape[0] * 3 / 1000
    return total


def connector_np(ab: AB, i: int, f_s: np.ndarray) -> np.ndarray:
    """conv 1x1 (weights read off the module), then training-mode BatchNorm (batch statistics, biased var)."""
    c = ab.connectors[i]
    w = c.proj.proj.weight.detach().double().numpy()[:, :, 0, 0]
    b = c.proj.proj.bias.detach().double().numpy()
    y = np.einsum("ok,bkhw->bohw", w, f_s) + b[None, :, None, None]
    mu, var = y.mean(axis=(0, 2, 3), keepdims=True), y.var(axis=(0, 2, 3), keepdims=True)
    return (y - mu) / np.sqrt(var + c.bn.eps)


def test_ab_connector_shapes_from_bind_and_formula():
    ab = AB(["t1", "t2"], ["s1", "s2"])
    s1, s2 = RNG.normal(size=(4, 3, 4, 4)), RNG.normal(size=(4, 6, 2, 2))
    t1, t2 = RNG.normal(size=(4, 5, 4, 4)), RNG.normal(size=(4, 6, 2, 2))
    ab.bind({"t1": t64(t1), "t2": t64(t2)}, {"s1": t64(s1), "s2": t64(s2)})
    assert ab.connectors[0].proj.proj.weight.shape == (5, 3, 1, 1) and ab.connectors[0].bn.num_features == 5
    assert ab.connectors[1].proj.proj.weight.shape == (6, 6, 1, 1)  # a connector even where shapes match
    want = ab_np([connector_np(ab, 0, s1), connector_np(ab, 1, s2)], [t1, t2])
    got = ab([t64(s1), t64(s2)], [t64(t1), t64(t2)])
    assert got.item() == pytest.approx(want, rel=1e-4)
    got.backward()
    for c in ab.connectors:
        assert c.proj.proj.weight.grad.abs().sum() > 0 and c.bn.weight.grad.abs().sum() > 0


def test_ab_is_zero_beyond_the_margin_and_reads_only_the_teachers_sign():
    ab = AB(["t"], ["s"], margin=0.5)
    ab.connectors = nn.ModuleList([nn.Identity()])  # the formula alone, on the student's values
    t = torch.randn(3, 4, 5, 5)
    assert ab(torch.where(t > 0, 0.6, -0.6), t).item() == 0.0  # right side, beyond the margin
    s = torch.randn(3, 4, 5, 5)
    # a post-ReLU teacher tap gives the pre-activation's loss: only T > 0 vs T <= 0 enters
    assert ab(s, torch.relu(t)).item() == ab(s, t).item() > 0
    want = ab_np([s.double().numpy()], [t.double().numpy()], margin=0.5)
    assert ab(s, t).item() == pytest.approx(want, rel=1e-5)


# -- vid -----------------------------------------------------------------------------------------------
def vid_np(vid: VID, i: int, f_s: np.ndarray, f_t: np.ndarray) -> float:
    """Gaussian NLL (constants dropped) of f_t under N(mu(f_s), sigma_c^2), mu three 1x1 convs with ReLUs."""
    c = vid.connectors[i]
    w = [m.weight.detach().double().numpy()[:, :, 0, 0] for m in c.mean if isinstance(m, nn.Conv2d)]
    h = np.maximum(np.einsum("ok,bkhw->bohw", w[0], f_s), 0)
    h = np.maximum(np.einsum("ok,bkhw->bohw", w[1], h), 0)
    mu = np.einsum("ok,bkhw->bohw", w[2], h)
    alpha = c.log_scale.detach().double().numpy()
    var = np.log1p(np.exp(alpha))[None, :, None, None] + c.eps
    return float(np.mean(0.5 * ((f_t - mu) ** 2 / var + np.log(var))))


def test_vid_connectors_from_bind_start_at_the_initial_variance():
    vid = VID(["t1", "t2"], ["s1", "s2"])
    vid.bind({"t1": torch.randn(2, 16, 4, 4), "t2": torch.randn(2, 12)},
             {"s1": torch.randn(2, 8, 8, 8), "s2": torch.randn(2, 3, 4, 4)})
    convs = [m for m in vid.connectors[0].mean if isinstance(m, nn.Conv2d)]
    assert [tuple(m.weight.shape) for m in convs] == [(16, 8, 1, 1), (16, 16, 1, 1), (16, 16, 1, 1)]
    assert all(m.bias is None for m in convs)
    var = torch.nn.functional.softplus(vid.connectors[0].log_scale) + 1e-5
    torch.testing.assert_close(var, torch.full((16,), 5.0))
    lin = [m for m in vid.connectors[1].mean if isinstance(m, nn.Linear)]  # a map against a vector
    assert [tuple(m.weight.shape) for m in lin] == [(12, 48), (12, 12), (12, 12)]


def test_vid_matches_the_gaussian_nll_with_pooling_and_trains_its_connector():
    s1, t1 = RNG.normal(size=(3, 4, 8, 8)), RNG.normal(size=(3, 6, 4, 4))  # the student is pooled
    s2, t2 = RNG.normal(size=(3, 5, 2, 2)), RNG.normal(size=(3, 7, 4, 4))  # the teacher is pooled
    vid = VID(["t1", "t2"], ["s1", "s2"], init_pred_var=2.0)
    vid.bind({"t1": t64(t1), "t2": t64(t2)}, {"s1": t64(s1), "s2": t64(s2)})
    with torch.no_grad():
        vid.connectors[1].log_scale.copy_(torch.linspace(-1, 2, 7))  # per-channel variances
    want = vid_np(vid, 0, block_mean(s1, 2), t1) + vid_np(vid, 1, s2, block_mean(t2, 2))
    got = vid([t64(s1), t64(s2)], [t64(t1), t64(t2)])
    assert got.item() == pytest.approx(want, rel=1e-4)
    got.backward()
    for c in vid.connectors:
        assert c.log_scale.grad.abs().sum() > 0
        assert all(p.grad.abs().sum() > 0 for p in c.mean.parameters())


def test_vid_at_a_perfect_mean_is_half_the_log_variance():
    vid = VID(["t"], ["s"], init_pred_var=5.0)
    f = torch.randn(2, 3, 4, 4)
    vid.bind({"t": f}, {"s": f})
    with torch.no_grad():  # mu = identity: three identity 1x1 convs on a non-negative map
        for m in vid.connectors[0].mean:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    x = f.abs()
    assert vid(x, x).item() == pytest.approx(0.5 * math.log(5.0), rel=1e-5)


# -- defaults and the objective ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nst", "fsp", "ab", "vid"])
def test_default_layers_pair_the_last_stages_and_params_keep_the_references_defaults(name):
    cls = KNOWLEDGE.get(name)
    k = cls.from_params({}, ModelLayout(("l1", "l2", "l3"), ""), ModelLayout(("s1", "s2"), ""))
    assert (k.teacher_layers, k.student_layers) == (["l2", "l3"], ["s1", "s2"])
    if name == "ab":
        assert k.margin == 1.0
    if name == "vid":
        assert (k.init_pred_var, k.eps) == (5.0, 1e-5)
    with pytest.raises(ValueError, match="pair up one to one"):
        cls.Params(teacher_layers=["a"], student_layers=["x", "y"])


@pytest.mark.parametrize("name", ["nst", "fsp", "ab", "vid"])
def test_each_type_through_the_objective_on_cnn_stages(name):
    t = TapOutputs(torch.randn(4, 5), {"a": torch.randn(4, 8, 8, 8), "b": torch.randn(4, 16, 4, 4)})
    s = TapOutputs(torch.randn(4, 5, requires_grad=True),
                   {"x": torch.randn(4, 8, 8, 8, requires_grad=True), "y": torch.randn(4, 16, 2, 2, requires_grad=True)})
    obj = DistillObjective.from_specs([{"type": name}], ModelLayout(("a", "b"), ""), ModelLayout(("x", "y"), ""))
    obj.bind(t.features, s.features)
    terms = obj(s, t, torch.zeros(4, dtype=torch.long))
    assert terms[name].dtype == torch.float32 and math.isfinite(terms[name].item())
    terms["loss"].backward()
    assert s.features["x"].grad.abs().sum() > 0 and s.features["y"].grad.abs().sum() > 0
    # connectors live in the objective, so the training loop's optimiser and DDP see them
    n_params = sum(p.numel() for p in obj.parameters())
    assert (n_params > 0) == (name in ("ab", "vid"))
