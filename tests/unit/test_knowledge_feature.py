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
                   {"x": torch.randn(4, 8, 8, 8, requires_grad=True), "y": torch.randn(4, 16, 2, 2,
                                                                                       requires_grad=True)})
    obj = DistillObjective.from_specs([{"type": name}], ModelLayout(("a", "b"), ""), ModelLayout(("x", "y"), ""))
    obj.bind(t.features, s.features)
    terms = obj(s, t, torch.zeros(4, dtype=torch.long))
    assert terms[name].dtype == torch.float32 and math.isfinite(terms[name].item())
    terms["loss"].backward()
    assert s.features["x"].grad.abs().sum() > 0 and s.features["y"].grad.abs().sum() > 0
    # connectors live in the objective, so the training loop's optimiser and DDP see them
    n_params = sum(p.numel() for p in obj.parameters())
    assert (n_params > 0) == (name in ("ab", "vid"))


# -- ofd -----------------------------------------------------------------------------------------------
from scipy import stats  # noqa: E402

from kdray.knowledge.ofd import OFD, OFDConnector, batch_margin, bn_margin, ofd_partial_l2  # noqa: E402
from kdray.knowledge.reviewkd import ReviewKD, as_map2d, hcl  # noqa: E402


def test_ofd_margin_is_the_mean_of_the_negative_part_of_the_bn_output():
    gamma = np.array([1.0, 2.0, 0.5, -1.5, 1.0, 3.0])  # |gamma| is the std: a negative weight counts as its size
    beta = np.array([0.0, 1.0, -0.3, 0.5, 2.5, -2.0])
    got = bn_margin(torch.tensor(gamma), torch.tensor(beta)).double().numpy()
    rng = np.random.default_rng(1)
    for c, (g, b) in enumerate(zip(gamma, beta)):
        x = rng.normal(b, abs(g), size=4_000_000)
        neg = x[x < 0]
        se = neg.std() / math.sqrt(len(neg))
        assert abs(got[c] - neg.mean()) < 5 * se + 1e-4, (c, got[c], neg.mean())  # Monte-Carlo E[x | x < 0]
        want = stats.truncnorm(-np.inf, (0 - b) / abs(g), loc=b, scale=abs(g)).mean()
        assert got[c] == pytest.approx(want, rel=1e-6, abs=1e-7)  # scipy's truncated normal mean


def test_ofd_margin_where_there_are_almost_no_negatives_or_no_spread():
    # Phi(-beta/gamma) <= 0.001: the reference's -3 gamma; gamma = 0: the constant beta, or 0 when beta >= 0
    got = bn_margin(torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([3.5, 8.0, -0.7, 0.4]))
    torch.testing.assert_close(got, torch.tensor([-3.0, -6.0, -0.7, 0.0]))
    assert stats.norm.cdf(-3.5) < 1e-3 < stats.norm.cdf(-3.0)
    # just above the threshold the closed form still applies
    assert bn_margin(torch.tensor([1.0]), torch.tensor([3.0])).item() == pytest.approx(
        stats.truncnorm(-np.inf, -3.0, loc=3.0, scale=1.0).mean(), rel=1e-6)


def test_ofd_batch_margin_reads_each_channels_mean_and_std():
    scale, shift = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1), torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1)
    f = torch.randn(4, 3, 5, 5) * scale + shift
    v = f.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(batch_margin(f), bn_margin(v.std(1, unbiased=False), v.mean(1)))


def test_ofd_partial_l2_skip_rules_one_element_at_a_time():
    margin = torch.tensor([-1.0])
    #          t > 0 always counts    margin < t <= 0        t < margin: clamped    t = 0
    t = torch.tensor([2.0, 2.0, -0.5, -0.5, -3.0, -3.0, 0.0, 0.0]).view(1, 1, 8)
    s = torch.tensor([3.0, 1.0, 0.0, -2.0, -0.5, -2.0, 0.0, 0.1]).view(1, 1, 8)
    each = [1.0, 1.0, 0.25,  # s > t counts; t > 0 counts above and below
            0.0,   # s <= t <= 0: skipped
            0.25,  # against the clamped teacher max(-3, -1) = -1: (-0.5 + 1)^2
            0.0,   # s <= max(t, m) <= 0: skipped (unclamped, s > t would have counted 1.0)
            0.0,   # s = t = 0: skipped
            0.01]  # s > t = 0
    for i, want in enumerate(each):
        assert ofd_partial_l2(s[..., i:i + 1], t[..., i:i + 1], margin).item() == pytest.approx(want), i
    assert ofd_partial_l2(s, t, margin).item() == pytest.approx(sum(each))
    # the margin is per channel: under a margin of -5 the teacher's -3 stays, so element 4 counts
    # (-0.5 + 3)^2 = 6.25 and element 5 (-2 > -3) counts (-2 + 3)^2 = 1
    lower = [1.0, 1.0, 0.25, 0.0, 6.25, 1.0, 0.0, 0.01]
    assert ofd_partial_l2(s, t, torch.tensor([-5.0])).item() == pytest.approx(sum(lower))
    two = ofd_partial_l2(torch.cat([s, s], 1), torch.cat([t, t], 1), torch.tensor([-1.0, -5.0]))
    assert two.item() == pytest.approx(sum(each) + sum(lower))


def tiny_teacher() -> nn.Module:
    """conv -> bn -> relu stages; "b" is a residual-style block whose shortcut BN is registered last but runs first."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            self.shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))

        def forward(self, x):  # as kdray's BasicBlock: the shortcut first
            residual = self.shortcut(x)
            return torch.relu(self.bn(self.conv(x)) + residual)

    net = nn.Sequential()
    net.add_module("a", nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    net.add_module("relu", nn.ReLU())
    net.add_module("b", Block())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    return net.eval()


def taps_of(net: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    from kdray.models import FeatureTaps

    taps = FeatureTaps(net, names)
    with torch.no_grad():
        out = taps.run(net, x).features
    taps.remove()
    return out


def test_ofd_reads_the_margin_from_the_last_batchnorm_executed_in_each_hint_layer():
    net = tiny_teacher()
    ofd = OFD(["a", "b", "b.bn"], ["x", "y", "z"])
    ofd.bind_models(net, nn.Identity())
    x = torch.randn(2, 3, 4, 4)
    t = taps_of(net, ["a", "b", "b.bn"], x)  # the dry forward pass the hooks watch
    s = {"x": torch.randn(2, 5, 4, 4), "y": torch.randn(2, 5, 4, 4), "z": torch.randn(2, 5, 4, 4)}
    ofd.bind(t, s)
    # "a": its only BN; "b": its bn runs after the shortcut's, though registered before it; "b.bn": itself
    assert ofd.margin_layers == ["a.1", "b.bn", "b.bn"]
    assert not ofd._bn_hooks  # the watch ends with bind
    for m, bn in zip(ofd.margins(), [net.a[1], net.b.bn, net.b.bn]):
        torch.testing.assert_close(m, bn_margin(bn.weight, bn.bias))
    # bound margins are buffers of the objective (they follow .to(device)), not saved in its state
    assert "margin0" in dict(ofd.named_buffers()) and "margin0" not in ofd.state_dict()


def test_ofd_refuses_a_hint_layer_without_batchnorm_naming_it():
    net = tiny_teacher()
    with pytest.raises(ValueError, match=r"teacher layer 'relu' \(ReLU\) has no BatchNorm"):
        OFD(["a", "relu"], ["x", "y"]).bind_models(net, nn.Identity())


def ofd_np(s_list, t_list, margins) -> float:
    total, n = 0.0, len(s_list)
    for i, (s, t, m) in enumerate(zip(s_list, t_list, margins)):
        t = np.maximum(t, m.reshape(1, -1, 1, 1))
        keep = (s > t) | (t > 0)
        total += np.sum((s - t) ** 2 * keep) / 2 ** (n - 1 - i)
    return total / s_list[0].shape[0] / 1000


def test_ofd_matches_the_reference_formula_with_bn_margins_and_layer_weights():
    net = tiny_teacher()
    ofd = OFD(["a", "b"], ["x", "y"])
    ofd.bind_models(net, nn.Identity())
    t = taps_of(net, ["a", "b"], torch.randn(3, 3, 4, 4))
    t["a"] = t["a"] * 2 - 1  # spread over both sides of the margin
    s = {"x": torch.randn(3, 4, 4, 4), "y": torch.randn(3, 6, 4, 4)}
    ofd.bind(t, s)
    ofd.connectors = nn.ModuleList([nn.Identity(), nn.Identity()])  # the formula alone
    margins = [m.double().numpy() for m in ofd.margins()]
    want = ofd_np([s["x"].double().numpy(), s["y"].double().numpy()],
                  [t["a"].double().numpy(), t["b"].double().numpy()], margins)
    assert ofd([s["x"], s["y"]], [t["a"], t["b"]]).item() == pytest.approx(want, rel=1e-5)


def test_ofd_connectors_are_conv_bn_from_bind_pool_the_teacher_and_train():
    ofd = OFD(["t1", "t2"], ["s1", "s2"])
    t = {"t1": torch.randn(4, 8, 4, 4), "t2": torch.randn(4, 12)}
    s = {"s1": torch.randn(4, 3, 8, 8, requires_grad=True), "s2": torch.randn(4, 5, requires_grad=True)}
    ofd.bind(t, s)
    c0, c1 = ofd.connectors
    assert c0.proj.weight.shape == (8, 3, 1, 1) and c0.proj.bias is None and c0.bn.num_features == 8
    assert c1.proj.weight.shape == (12, 5) and c1.proj.bias is None
    wide = OFDConnector((32, 4, 4), (64, 4, 4))  # He normal over fan-out: N(0, 2 / (1 * 1 * 64))
    assert wide.proj.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    assert (wide.bn.weight == 1).all() and (wide.bn.bias == 0).all()
    loss = ofd([s["s1"], s["s2"]], [t["t1"], t["t2"]])  # the teacher 4x4 map against the student's 8x8
    # without bound BatchNorms the margin comes from the teacher batch
    r0 = c0(s["s1"]).detach()
    r1 = c1(s["s2"]).detach()
    t0 = torch.nn.functional.adaptive_avg_pool2d(t["t1"], (8, 8))
    want = (ofd_partial_l2(r0, t0, batch_margin(t["t1"])) / 2  # layer weights 2^(i-n), then / B / 1000
            + ofd_partial_l2(r1, t["t2"], batch_margin(t["t2"]))) / 4 / 1000
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    for c in ofd.connectors:
        assert c.proj.weight.grad.abs().sum() > 0 and c.bn.weight.grad.abs().sum() > 0
    assert s["s1"].grad.abs().sum() > 0


# -- reviewkd ------------------------------------------------------------------------------------------
def hcl_np(fs: np.ndarray, ft: np.ndarray, levels=(4, 2, 1)) -> float:
    """The reference's hcl in float64: MSE at full size plus pooled levels (block means) weighing 1/2, 1/4, ..."""
    h = fs.shape[2]
    loss, cnt, tot = np.mean((fs - ft) ** 2), 1.0, 1.0
    for lvl in levels:
        if lvl >= h:
            continue
        cnt /= 2
        loss += np.mean((block_mean(fs, h // lvl) - block_mean(ft, h // lvl)) ** 2) * cnt
        tot += cnt
    return loss / tot


@pytest.mark.parametrize("size", [8, 4, 2, 1])
def test_hcl_matches_a_float64_reimplementation(size):
    fs, ft = RNG.normal(size=(3, 5, size, size)), RNG.normal(size=(3, 5, size, size)) + 0.3
    got = hcl(torch.from_numpy(fs), torch.from_numpy(ft)).item()
    assert got == pytest.approx(hcl_np(fs, ft), rel=1e-12)
    if size == 1:  # no level below 1x1: the plain MSE
        assert got == pytest.approx(np.mean((fs - ft) ** 2), rel=1e-12)
    if size == 8:  # (MSE + MSE_4/2 + MSE_2/4 + MSE_1/8) / (1 + 1/2 + 1/4 + 1/8)
        parts = [np.mean((block_mean(fs, k) - block_mean(ft, k)) ** 2) for k in (1, 2, 4, 8)]
        assert got == pytest.approx((parts[0] + parts[1] / 2 + parts[2] / 4 + parts[3] / 8) / 1.875, rel=1e-12)


def test_reviewkd_abfs_from_bind_have_the_stage_shapes():
    rk = ReviewKD(["t1", "t2", "t3", "tp"], ["s1", "s2", "s3", "sp"])
    t = {"t1": torch.randn(2, 16, 16, 16), "t2": torch.randn(2, 24, 8, 8), "t3": torch.randn(2, 40, 4, 4),
         "tp": torch.randn(2, 40)}
    s = {"s1": torch.randn(2, 8, 8, 8), "s2": torch.randn(2, 12, 8, 8), "s3": torch.randn(2, 20, 2, 2),
         "sp": torch.randn(2, 20)}
    rk.bind(t, s)
    mid = 20  # min(512, channels of the deepest student stage)
    for abf, c_s, c_t in zip(rk.abfs, (8, 12, 20, 20), (16, 24, 40, 40)):
        assert abf.conv1[0].weight.shape == (mid, c_s, 1, 1) and abf.conv1[1].num_features == mid
        assert abf.conv2[0].weight.shape == (c_t, mid, 3, 3) and abf.conv2[1].num_features == c_t
    assert [a.att_conv is not None for a in rk.abfs] == [True, True, True, False]  # the deepest fuses nothing
    assert rk.abfs[0].att_conv[0].weight.shape == (2, 2 * mid, 1, 1)
    maps_s = [as_map2d(s[n]) for n in ("s1", "s2", "s3", "sp")]
    maps_t = [as_map2d(t[n]) for n in ("t1", "t2", "t3", "tp")]
    outs = rk.review(maps_s, maps_t)
    assert [tuple(o.shape) for o in outs] == [tuple(m.shape) for m in maps_t]  # the teacher's channels and sizes
    wide = ReviewKD(["t1"], ["s1"], mid_channels=7)
    wide.bind(t, s)
    assert wide.abfs[0].conv1[0].weight.shape == (7, 8, 1, 1) and wide.abfs[0].att_conv is None


def test_reviewkd_fuses_deep_to_shallow_and_sums_hcl_with_the_warmup():
    torch.manual_seed(0)
    rk = ReviewKD(["t1", "t2"], ["s1", "s2"], warmup_epochs=20)
    t = [torch.randn(4, 6, 8, 8), torch.randn(4, 10, 4, 4)]
    s = [torch.randn(4, 3, 8, 8, requires_grad=True), torch.randn(4, 5, 2, 2, requires_grad=True)]
    rk.bind({"t1": t[0], "t2": t[1]}, {"s1": s[0], "s2": s[1]})
    # by hand: the deep ABF alone, then the shallow one fusing its residual
    deep, shallow = rk.abfs[1], rk.abfs[0]
    o2, r2 = deep(s[1], None, (4, 4))
    x = shallow.conv1(s[0])
    r = torch.nn.functional.interpolate(r2, size=(8, 8), mode="nearest")
    z = shallow.att_conv(torch.cat([x, r], 1))
    o1 = shallow.conv2(x * z[:, :1] + r * z[:, 1:])
    want = sum(hcl_np(o.detach().double().numpy(), f.double().numpy()) for o, f in ((o1, t[0]), (o2, t[1])))
    rk.set_epoch(20)
    full = rk(s, t)
    assert full.item() == pytest.approx(want, rel=1e-5)
    rk.set_epoch(5)
    assert rk(s, t).item() == pytest.approx(0.25 * want, rel=1e-5)  # min(1, epoch / warmup)
    rk.set_epoch(0)
    assert rk(s, t).item() == 0.0
    full.backward()
    for abf in rk.abfs:  # every connector learns, the attention of the fusing one included
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in abf.parameters())
    assert s[0].grad.abs().sum() > 0 and s[1].grad.abs().sum() > 0


def test_reviewkd_and_ofd_defaults_follow_the_references():
    layouts = ModelLayout(("l1", "l2", "l3"), "emb"), ModelLayout(("s1", "s2", "s3"), "pool")
    rk = KNOWLEDGE.get("reviewkd").from_params({}, *layouts)
    assert (rk.teacher_layers, rk.student_layers) == (["l1", "l2", "l3", "emb"], ["s1", "s2", "s3", "pool"])
    assert (rk.mid_channels, rk.warmup_epochs, rk.pool_levels) == (None, 20, (4, 2, 1))
    assert KNOWLEDGE.get("reviewkd").Params().weight == 1.0
    ofd = KNOWLEDGE.get("ofd").from_params({}, *layouts)
    assert (ofd.teacher_layers, ofd.student_layers) == (["l1", "l2", "l3"], ["s1", "s2", "s3"])
    with pytest.raises(ValueError, match="pool_levels must be positive"):
        ReviewKD.Params(pool_levels=[4, 0])


# -- both on kdray's CIFAR ResNets -------------------------------------------------------------------------
def cifar_cfg(knowledge: dict):
    from kdray.config import RunConfig

    return RunConfig.model_validate({
        "dataset": {"name": "test_images"}, "teacher": {"train": {"model": {"name": "resnet32x4"}}},
        "student": {"name": "resnet8x4"}, "knowledge": [knowledge]})


@pytest.mark.parametrize("knowledge", [
    {"type": "ofd"},
    {"type": "ofd", "teacher_layers": ["layer2.4.bn2", "layer3.4.bn2"], "student_layers": ["layer2", "layer3"]},
    {"type": "reviewkd"}, {"type": "reviewkd", "mid_channels": 64, "weight": 5.0},
], ids=["ofd", "ofd-bn2", "reviewkd", "reviewkd-mid64"])
def test_dry_run_on_resnet32x4_to_resnet8x4(knowledge):
    from kdray.check import dry_run

    report = dry_run(cifar_cfg(knowledge))
    if knowledge["type"] == "reviewkd":
        assert report.teacher_shapes["flatten"] == (256,) and report.student_shapes["layer1"] == (64, 32, 32)
    else:
        assert set(report.teacher_shapes) == set(knowledge.get("teacher_layers", ["layer1", "layer2", "layer3"]))


def test_ofd_on_resnet8x4_finds_bn2_and_a_config_error_names_a_layer_without_batchnorm():
    from kdray.check import dry_run
    from kdray.config import ConfigError
    from kdray.data import describe_dataset
    from kdray.models import build_model

    info = describe_dataset(cifar_cfg({"type": "ofd"}).dataset)
    net = build_model("resnet8x4", info.num_classes, info.preprocess()).net  # one block a stage, with a shortcut BN
    ofd = OFD(["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3"])
    ofd.bind_models(net, net)
    feats = taps_of(net, ofd.teacher_layers, torch.randn(2, 3, 32, 32))
    ofd.bind(feats, feats)
    assert ofd.margin_layers == ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]  # not the shortcut's BN
    with pytest.raises(ConfigError, match=r"knowledge\.0.*teacher layer 'fc' \(Linear\) has no BatchNorm"):
        dry_run(cifar_cfg({"type": "ofd", "teacher_layers": ["fc"], "student_layers": ["layer3"]}))
