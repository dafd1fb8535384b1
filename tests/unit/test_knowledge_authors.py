"""The losses at the settings their authors publish, against float64 computations written here.

Each test holds a loss to its authors' convention (read in their code: mdistiller, RepDistiller, the papers'
repositories) at inputs where float32 arithmetic is hardest: confident logits at T = 1 (DKD's ImageNet
setting), near-duplicate embeddings (RKD), maps of unequal size (AT), and FitNets' regressor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loss_references import conv_bn_relu_reference, dkd_reference, rkd_reference

from kdray.knowledge.feature import AT, NST, FitNet
from kdray.knowledge.relational import RKD
from kdray.knowledge.response import DKD


# -- DKD at T = 1 with confident students ------------------------------------------------------------
def confident(margin: float, b: int = 6, c: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose true class leads every other by ``margin`` (the others N(0, 1)), and the labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    z[torch.arange(b), y] = z.max(1).values + margin
    return z, y


@pytest.mark.parametrize("margin", [10.0, 18.0, 25.0, 50.0])
@pytest.mark.parametrize("who", ["student", "teacher", "both"])
def test_dkd_at_t1_with_confident_logits_matches_float64_value_and_gradient(margin, who):
    """The DKD authors' ImageNet setting (T = 1, β = 0.5): a confident network's p_y rounds to 1 in float32, so
    1 - p_y is 0 and the target-class term loses its gradient; the sum of the others (or log-space) does not."""
    z_conf, y = confident(margin)
    z_soft = 3.0 * torch.randn(z_conf.shape, generator=torch.Generator().manual_seed(1))
    noise = 0.5 * torch.randn(z_conf.shape, generator=torch.Generator().manual_seed(2))
    z_s = z_conf if who != "teacher" else z_soft
    z_t = {"student": z_soft, "teacher": z_conf, "both": z_conf + noise}[who]  # both: confident, not identical
    z_s = z_s.clone().requires_grad_()
    got = DKD(alpha=1.0, beta=0.5, temperature=1.0)(z_s, z_t, y)
    got.backward()
    ref_in = z_s.detach().double().requires_grad_()
    want = dkd_reference(ref_in, z_t, y, 1.0, 0.5, 1.0)
    want.backward()
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    # The gradient of each logit; entries far below the largest are compared at float32's resolution of it.
    scale = ref_in.grad.abs().max().item()
    torch.testing.assert_close(z_s.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-6 * scale)


def test_dkd_target_class_gradient_survives_when_the_student_is_confident():
    """At margin 25 the student's target-class gradient is what pulls it towards the teacher's p_y; today's float32
    1 - p_y (clamped at 1e-12) cut it to ~0. It must be the float64 value, not 0."""
    z_s, y = confident(25.0)
    z_t = 3.0 * torch.randn(z_s.shape, generator=torch.Generator().manual_seed(1))
    z_s.requires_grad_()
    DKD(alpha=1.0, beta=0.0, temperature=1.0)(z_s, z_t, y).backward()  # TCKD alone
    ref_in = z_s.detach().double().requires_grad_()
    dkd_reference(ref_in, z_t, y, 1.0, 0.0, 1.0).backward()
    rows = torch.arange(len(y))
    torch.testing.assert_close(z_s.grad[rows, y].double(), ref_in.grad[rows, y], rtol=1e-4, atol=0.0)


# -- RKD with duplicate and near-duplicate samples -------------------------------------------------------
def batch_with_twins(kind: str, seed: int, b: int = 8, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(b, d, generator=g) + 2.0  # off the origin: the Gram route cancels most there
    if kind == "exact":
        e[3] = e[5]
    else:  # two samples 1e-3 apart
        e[3] = e[5] + 1e-3 * F.normalize(torch.randn(d, generator=g), dim=0)
    return e


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["exact", "near"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_rkd_with_duplicate_samples_matches_float64_value_and_gradient(kind, seed, where):
    twins = batch_with_twins(kind, seed)
    other = torch.randn(twins.shape, generator=torch.Generator().manual_seed(100 + seed))
    e_s, e_t = (twins, other) if where == "student" else (other, twins)
    e_s = e_s.clone().requires_grad_()
    got = RKD("t", "s", 25.0, 50.0)(e_s, e_t)
    got.backward()
    ref_in = e_s.detach().double().requires_grad_()
    want = rkd_reference(ref_in, e_t, 25.0, 50.0)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    scale = ref_in.grad.abs().max().item()
    torch.testing.assert_close(e_s.grad.double(), ref_in.grad, rtol=1e-3, atol=1e-5 * scale)


def test_rkd_angle_of_a_zero_difference_is_zero_with_a_finite_gradient():
    """A student whose two samples collapse onto one point: their difference has no direction. The angle is 0 (as
    the authors'); its gradient is 0, not the authors' 1/eps = 1e12 that would blow the step up."""
    e_s = torch.randn(6, 4)
    e_s[2] = e_s[4]
    e_s.requires_grad_()
    e_t = torch.randn(6, 4)
    RKD("t", "s", 0.0, 1.0)(e_s, e_t).backward()
    assert torch.isfinite(e_s.grad).all()
    ref_in = e_s.detach().double().requires_grad_()
    rkd_reference(ref_in, e_t, 0.0, 1.0).backward()
    torch.testing.assert_close(e_s.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-7)


# -- AT: pool the features, then square -------------------------------------------------------------------
def at_reference(f_s: np.ndarray, f_t: np.ndarray, p: float = 2.0) -> float:
    """Zagoruyko & Komodakis' AT as their code and mdistiller/RepDistiller compute it: the larger *feature*
    map average-pooled to the smaller size, then Q = mean_c F_c^p, L2-normalised, mean squared difference."""
    def pool(f, size):
        k = f.shape[2] // size
        b, c, h, w = f.shape
        return f.reshape(b, c, h // k, k, w // k, k).mean(axis=(3, 5))

    size = min(f_s.shape[2], f_t.shape[2])
    f_s, f_t = pool(f_s, size), pool(f_t, size)

    def q(f):
        a = (np.abs(f) ** p).mean(1).reshape(f.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return float(np.mean((q(f_s) - q(f_t)) ** 2))


@pytest.mark.parametrize("s_hw,t_hw", [(8, 4), (4, 8), (16, 4)])
def test_at_pools_the_feature_map_before_squaring_as_the_authors(s_hw, t_hw):
    g = np.random.default_rng(s_hw * 10 + t_hw)
    f_s, f_t = g.normal(size=(3, 4, s_hw, s_hw)), g.normal(size=(3, 6, t_hw, t_hw))
    got = AT(["t"], ["s"])(torch.from_numpy(f_s).float(), torch.from_numpy(f_t).float()).item()
    assert got == pytest.approx(at_reference(f_s, f_t), rel=1e-4)


def test_at_pool_attention_keeps_the_older_order_as_a_named_option():
    """``pool: attention`` squares first and pools the attention map (kdray's order before it followed the
    authors): Q pooled, not F."""
    g = np.random.default_rng(7)
    f_s, f_t = g.normal(size=(3, 4, 8, 8)), g.normal(size=(3, 6, 4, 4))
    a_s = (f_s ** 2).mean(1).reshape(3, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(3, -1)
    a_t = (f_t ** 2).mean(1).reshape(3, -1)
    q_s, q_t = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (a_s, a_t))
    got = AT(["t"], ["s"], pool="attention")(torch.from_numpy(f_s).float(), torch.from_numpy(f_t).float()).item()
    assert got == pytest.approx(float(np.mean((q_s - q_t) ** 2)), rel=1e-4)
    assert got != pytest.approx(at_reference(f_s, f_t), rel=1e-2)  # the two orders really differ here


def test_nst_pools_the_feature_map_as_at_does():
    """NST normalises each channel of the (pooled) feature map: pooling after the square would not be an MMD of
    the pooled maps. Checked against an explicit feature-map MMD of the pooled features."""
    g = np.random.default_rng(3)
    f_s, f_t = g.normal(size=(2, 3, 8, 8)), g.normal(size=(2, 5, 4, 4))
    pooled = f_s.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))

    def phi_mean(f):
        v = f.reshape(f.shape[0], f.shape[1], -1)
        v = v / np.linalg.norm(v, axis=2, keepdims=True)
        return np.einsum("bin,bim->bnm", v, v) / v.shape[1]

    want = float(np.mean(np.sum((phi_mean(pooled) - phi_mean(f_t)) ** 2, axis=(1, 2))))
    got = NST(["t"], ["s"])(torch.from_numpy(f_s).float(), torch.from_numpy(f_t).float()).item()
    assert got == pytest.approx(want, rel=1e-4)


# -- FitNets: RepDistiller's regressor -------------------------------------------------------------------
@pytest.mark.parametrize("s_shape,t_shape,conv", [
    ((8, 8, 8), (16, 8, 8), "conv 1x1"),             # equal sizes
    ((8, 16, 16), (16, 8, 8), "conv 3x3 stride 2"),  # s_H = 2 t_H
    ((8, 4, 4), (16, 8, 8), "transposed conv 4x4 stride 2"),  # 2 s_H = t_H
    ((8, 7, 7), (16, 4, 4), "conv 4x4"),             # s_H > t_H otherwise: kernel 1 + s_H - t_H
])
def test_fitnet_conv_bn_relu_regressor_matches_repdistillers_convreg_in_float64(s_shape, t_shape, conv):
    torch.manual_seed(0)
    f_s, f_t = torch.randn(5, *s_shape), torch.randn(5, *t_shape).relu()
    fit = FitNet("t", "s", regressor="conv_bn_relu")
    fit.bind({"t": f_t}, {"s": f_s})
    reg = fit.regressor
    assert reg.kind == "conv_bn_relu" and reg.describe() == conv
    with torch.no_grad():  # BatchNorm's affine part away from (1, 0), so it is checked too
        reg.proj[1].weight.uniform_(0.5, 1.5)
        reg.proj[1].bias.uniform_(-0.2, 0.2)
    want = (conv_bn_relu_reference(reg, f_s) - f_t.double()).pow(2).mean()
    assert fit(f_s, f_t).item() == pytest.approx(want.item(), rel=1e-5)


def test_fitnet_regressor_defaults_conv_bn_relu_for_image_maps_and_linear_otherwise():
    fit = FitNet("t", "s")
    fit.bind({"t": torch.randn(2, 16, 8, 8)}, {"s": torch.randn(2, 8, 8, 8)})
    assert fit.regressor.kind == "conv_bn_relu"
    for s, t, kind in [((2, 8, 12), (2, 16, 12), "conv1x1"), ((2, 32), (2, 64), "linear"),
                       ((2, 100), (2, 25, 10), "flatten-linear")]:
        fit = FitNet("t", "s")
        fit.bind({"t": torch.randn(*t)}, {"s": torch.randn(*s)})
        assert fit.regressor.kind == kind, (s, t)
    fit = FitNet("t", "s", regressor="linear")
    fit.bind({"t": torch.randn(2, 16, 8, 8)}, {"s": torch.randn(2, 8, 8, 8)})
    assert fit.regressor.kind == "conv1x1"


def test_fitnet_conv_bn_relu_refuses_a_student_map_smaller_than_the_teachers_other_than_half():
    fit = FitNet("teacher.layer2", "student.layer1", regressor="conv_bn_relu")
    with pytest.raises(ValueError, match=r"student.layer1.*5x5.*teacher.layer2.*8x8.*regressor: linear"):
        fit.bind({"teacher.layer2": torch.randn(2, 16, 8, 8)}, {"student.layer1": torch.randn(2, 8, 5, 5)})


# -- safe when called directly: float32 whatever autocast is active -------------------------------------
