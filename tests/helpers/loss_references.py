"""Float64 references of the knowledge types' formulas, written from the papers and kdray's docstrings.

Plain torch ops in float64, never kdray's helpers. A probability that can be near 1 is handled in log space
(``log_softmax`` takes the largest entry through ``log1p``), so each reference stays exact at the extremes
the property tests draw (a true-class margin of 50 at T = 1, where 1 - p_y is 0 even in float64).
Connectors (regressors, embeddings) are re-implemented with the module's own weights copied in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

EPS32 = 2.0 ** -24  # float32's relative resolution (half an ulp): of probabilities near 1, of any rounded value


def squares_atol(want: Tensor | float, delta: float, mass: float = 1.0) -> float:
    """How far float32 may put a loss L = Σ w d^2 (weights summing to ``mass``) whose differences d are each
    known to ``delta``: Σ w (2 |d| delta + delta^2) <= 2 delta sqrt(mass L) + mass delta^2 (Cauchy-Schwarz).
    It matters only where the two sides nearly agree (L -> 0), where float32 cannot resolve d at all."""
    want = float(want.detach()) if isinstance(want, Tensor) else float(want)
    return 2 * delta * math.sqrt(mass * max(want, 0.0)) + mass * delta * delta


def bn_resolution(y: Tensor, bn: torch.nn.Module, k: float = 16.0) -> float:
    """How well float32 knows a training-mode BatchNorm's output of inputs ``y`` (B, C, ...): its batch mean is
    rounded to ~2^-24 of |y| and divided by sqrt(var + eps). A channel of (near) zero variance, such as a batch
    that is one constant map, turns that rounding into output noise of |y| 2^-24 / sqrt(eps) = 316 |y| 2^-24
    (torch's float32 BatchNorm of a constant 1e4 returns 0.19, not 0)."""
    dims = [d for d in range(y.dim()) if d != 1]
    y = y.detach()
    spread = y.abs().amax(dims) / (y.var(dims, unbiased=False) + bn.eps).sqrt()
    return k * EPS32 * float((bn.weight.detach().double().abs() * spread + bn.bias.detach().double().abs()).max())


def f64(x: Tensor) -> Tensor:
    """As float64, keeping the graph (a reference may be differentiated)."""
    return x.double()


def unit(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / max(|x|, eps)`` along ``dim`` (``F.normalize``'s convention, which every kdray L2 norm states)."""
    return x / x.pow(2).sum(dim, keepdim=True).sqrt().clamp_min(eps)


def pool_mean(f: Tensor) -> Tensor:
    """A (B, D) embedding from a tap: spatial maps averaged over their positions."""
    f = f64(f)
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def adaptive_pool(x: Tensor, size: tuple[int, ...] | list[int]) -> Tensor:
    """Adaptive average pooling of the trailing dims: output i averages inputs [floor(i n/m), ceil((i+1) n/m)).
    Window means are separable, so one dim at a time."""
    for d, m in enumerate(size):
        axis = x.dim() - len(size) + d
        n = x.shape[axis]
        if n != m:
            x = torch.cat([x.narrow(axis, i * n // m, -(-(i + 1) * n // m) - i * n // m).mean(axis, keepdim=True)
                           for i in range(m)], axis)
    return x


def to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two (B, C, *spatial) maps of one rank, each spatial dim pooled to the smaller of the two."""
    size = [min(x, y) for x, y in zip(a.shape[2:], b.shape[2:])]
    return adaptive_pool(a, size), adaptive_pool(b, size)


def bn_train(y: Tensor, bn: torch.nn.Module) -> Tensor:
    """BatchNorm in training mode: the batch's mean and biased variance over all dims but 1, then affine."""
    dims = [d for d in range(y.dim()) if d != 1]
    shape = [1, -1] + [1] * (y.dim() - 2)
    y = (y - y.mean(dims, keepdim=True)) / (y.var(dims, unbiased=False, keepdim=True) + bn.eps).sqrt()
    return y * f64(bn.weight).view(shape) + f64(bn.bias).view(shape)


def conv1x1(w: Tensor, x: Tensor, b: Tensor | None = None) -> Tensor:
    """A 1x1 convolution of (B, C, *spatial) with weights (O, C, 1, ...) as an explicit channel sum."""
    y = torch.einsum("oc,bc...->bo...", f64(w).flatten(1), x)
    return y if b is None else y + f64(b).view(1, -1, *([1] * (x.dim() - 2)))


# -- response ------------------------------------------------------------------------------------------
def log_softmax(z: Tensor) -> Tensor:
    """Row-wise log softmax with the largest entry's through log1p: exact where its probability rounds to 1."""
    z = f64(z)
    top = z.argmax(1, keepdim=True)
    m = z.gather(1, top)
    rest = torch.exp(z - m).scatter(1, top, 0.0).sum(1, keepdim=True)  # Σ_{j≠top} p_j / p_top
    return z - m - torch.log1p(rest)


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) of each row (last dim), 0 · log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def zscore(z: Tensor) -> Tensor:
    """Sun et al. 2024: (z - mean) / (1e-7 + unbiased std) per sample."""
    z = f64(z)
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))


def kd_reference(z_s: Tensor, z_t: Tensor, t: float, standardize: bool = False) -> Tensor:
    """Hinton et al.: T^2 · batch mean of KL(softmax(z_t/T) || softmax(z_s/T))."""
    z_s, z_t = (zscore(z_s), zscore(z_t)) if standardize else (f64(z_s), f64(z_t))
    return t * t * kl_rows(log_softmax(z_t / t), log_softmax(z_s / t)).mean()


def dkd_reference(z_s: Tensor, z_t: Tensor, y: Tensor, alpha: float, beta: float, t: float) -> Tensor:
    """Zhao et al.'s DKD in float64, every probability that can be near 1 taken through its complement.

    b = [p_y, 1 - p_y] with 1 - p_y the *sum* of the non-target probabilities (mdistiller's ``cat_mask``),
    and log p_y = -log1p(Σ_{j≠y} exp(z_j - z_y)): exact where p_y rounds to 1 even in float64."""
    z_s, z_t = z_s.double() / t, z_t.double() / t
    mask = F.one_hot(y, z_s.shape[1]).bool()

    def binary_logs(z):
        zy = z[mask]
        others = z[~mask].view(z.shape[0], -1)
        rel = torch.logsumexp(others - zy[:, None], dim=1)  # log Σ_{j≠y} p_j / p_y
        log_py = -torch.log1p(torch.exp(rel))
        return log_py, rel + log_py  # log p_y, log (1 - p_y)

    ls_y, ls_o = binary_logs(z_s)
    lt_y, lt_o = binary_logs(z_t)
    tckd = (lt_y.exp() * (lt_y - ls_y) + lt_o.exp() * (lt_o - ls_o)).mean()
    q_s = log_softmax(z_s[~mask].view(z_s.shape[0], -1))
    q_t = log_softmax(z_t[~mask].view(z_t.shape[0], -1))
    nckd = (q_t.exp() * (q_t - q_s)).sum(1).mean()
    return (alpha * tckd + beta * nckd) * t * t


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """DIST's correlation of each row of a with the row of b: centred dot over (product of norms + eps)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt() + eps)


def dist_reference(z_s: Tensor, z_t: Tensor, beta: float, gamma: float, t: float, standardize: bool = False) -> Tensor:
    """Huang et al.: T^2 (β (1 - mean row correlation) + γ (1 - mean column correlation)) of the probabilities."""
    z_s, z_t = (zscore(z_s), zscore(z_t)) if standardize else (f64(z_s), f64(z_t))
    p_s, p_t = log_softmax(z_s / t).exp(), log_softmax(z_t / t).exp()
    inter, intra = 1 - pearson(p_s, p_t).mean(), 1 - pearson(p_s.t(), p_t.t()).mean()
    return t * t * (beta * inter + gamma * intra)


def median_fraction(x: Tensor, float32: bool = False) -> float:
    """The share of entries at or below the median (linear interpolation, np.percentile's 50). ``float32``:
    entries and median rounded to float32 and compared there, as the MLKD reference compares its tensors."""
    x = f64(x)
    if float32:
        x = x.float().double()
    s = x.sort().values
    pos = 0.5 * (len(s) - 1)
    lo = int(math.floor(pos))
    med = s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])
    if float32:
        med = med.float().double()
    return float((x <= med).double().mean())


def mlkd_terms(z_s: Tensor, z_t: Tensor, temps: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Jin et al.'s three levels summed over the temperatures: Σ T^2 KL (instance), Σ |P_t P_t^T - P_s P_s^T|^2 / B
    (batch), Σ |P_t^T P_t - P_s^T P_s|^2 / C (class); and the teacher's T = 1 confidences and class masses."""
    z_s, z_t = f64(z_s), f64(z_t)
    b, c = z_s.shape
    ins = sum(kd_reference(z_s, z_t, t) for t in temps)
    batch = klass = torch.zeros((), dtype=torch.float64)
    for t in temps:
        p_s, p_t = log_softmax(z_s / t).exp(), log_softmax(z_t / t).exp()
        batch = batch + (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / b
        klass = klass + (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / c
    p1 = log_softmax(z_t).exp()
    return ins, batch, klass, p1.max(1).values, p1.sum(0)


# -- feature -------------------------------------------------------------------------------------------
def regressor_conv(reg: torch.nn.Module, f_s: Tensor) -> Tensor:
    """The convolution of a ``ConvReg`` in float64 with its weights (strided or transposed by its size rule)."""
    conv, x = reg.proj[0], f_s.double()
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    if isinstance(conv, torch.nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, b, stride=conv.stride, padding=conv.padding)
    return F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding)


def conv_bn_relu_reference(reg: torch.nn.Module, f_s: Tensor) -> Tensor:
    """RepDistiller's ``ConvReg`` (``models/util.py``) in float64 with the regressor's weights: the convolution
    its size rule picks, BatchNorm with the batch's statistics (training mode, biased variance, eps 1e-5), ReLU."""
    bn = reg.proj[1]
    y = regressor_conv(reg, f_s)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + bn.eps)
    y = y * bn.weight.detach().double().view(1, -1, 1, 1) + bn.bias.detach().double().view(1, -1, 1, 1)
    return y.clamp_min(0)


def at_maps_reference(f_s: list[Tensor], f_t: list[Tensor], p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis: feature maps pooled to the smaller size, Q = vec(mean_c |F_c|^p) / |.|, and
    Σ_pairs mean (Q_s - Q_t)^2."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(f_s, f_t):
        s, t = to_common_size(f64(s), f64(t))
        q_s, q_t = (unit(f.abs().pow(p).mean(1).flatten(1), 1) for f in (s, t))
        total = total + (q_s - q_t).pow(2).mean()
    return total


def nst_reference(f_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Huang & Wang: MMD^2 of the normalised channels under k(x, y) = (x.y)^2, through its explicit feature map
    φ(x) = x x^T: per sample |mean_i φ(s_i) - mean_j φ(t_j)|_F^2, averaged over the batch, summed over pairs."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(f_s, f_t):
        s, t = to_common_size(f64(s), f64(t))

        def phi_mean(f):
            v = unit(f.flatten(2), 2)
            return torch.einsum("bin,bim->bnm", v, v) / v.shape[1]

        total = total + (phi_mean(s) - phi_mean(t)).pow(2).sum((1, 2)).mean()
    return total


def fsp_reference(f_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Yim et al.: G(F1, F2)_ij = Σ_x F1_i(x) F2_j(x) / hw over consecutive layers (a single layer with itself),
    the larger map pooled first; Σ_pairs mean (G_s - G_t)^2."""
    def gram(a, b):
        a, b = to_common_size(f64(a), f64(b))
        a, b = a.flatten(2), b.flatten(2)
        return torch.einsum("bin,bjn->bij", a, b) / a.shape[2]

    pairs = [(0, 0)] if len(f_s) == 1 else [(i, i + 1) for i in range(len(f_s) - 1)]
    return sum((gram(f_s[i], f_s[j]) - gram(f_t[i], f_t[j])).pow(2).mean() for i, j in pairs)


def ab_reference(connectors, f_s: list[Tensor], f_t: list[Tensor], margin: float) -> tuple[Tensor, float]:
    """Heo et al.: r = BN(pool(conv1x1(F_s))), then Σ (r+μ)^2 [r > -μ, T <= 0] + (r-μ)^2 [r <= μ, T > 0],
    weighted 2^(k-K) · 3/1000 / B per pair (RepDistiller). Also float32's resolution of it (``bn_resolution``)."""
    n, total, atol = len(f_s), torch.zeros((), dtype=torch.float64), 0.0
    for k, (s, t, c) in enumerate(zip(f_s, f_t, connectors), start=1):
        t = f64(t)
        y = adaptive_pool(conv1x1(c.proj.proj.weight, f64(s), c.proj.proj.bias), t.shape[2:])
        r = bn_train(y, c.bn)
        on = t > 0
        loss = ((r + margin).pow(2) * ((r > -margin) & ~on) + (r - margin).pow(2) * ((r <= margin) & on)).sum()
        w = 2.0 ** (k - n) / r.shape[0] * 3 / 1000
        total = total + w * loss
        atol += squares_atol(w * loss, bn_resolution(y, c.bn), w * r.numel())
    return total, atol


def vid_reference(connectors, f_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Ahn et al.: mean over elements of ½((t - μ(s))^2 / σ_c^2 + log σ_c^2), μ three bias-free 1x1 convs with
    ReLUs between, σ^2 = softplus(α) + ε; maps pooled to the smaller size; Σ over pairs."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t, c in zip(f_s, f_t, connectors):
        s, t = to_common_size(f64(s), f64(t))
        w = [m.weight for m in c.mean if isinstance(m, torch.nn.Conv2d)]
        mu = conv1x1(w[2], conv1x1(w[1], conv1x1(w[0], s).clamp_min(0)).clamp_min(0))
        var = (torch.log1p(torch.exp(f64(c.log_scale))) + c.eps).view(1, -1, 1, 1)
        total = total + (0.5 * ((t - mu).pow(2) / var + var.log())).mean()
    return total


def truncated_normal_margin(std: Tensor, mean: Tensor) -> Tensor:
    """OFD's margin E[x | x < 0], x ~ N(mean, std^2): mean - std φ(z)/Φ(-z), z = mean/std; -3 std where
    Φ(-z) <= 1e-3; min(mean, 0) where std = 0."""
    out = []
    for s, m in zip(std.tolist(), mean.tolist()):
        if s == 0:
            out.append(min(m, 0.0))
            continue
        z = m / s
        cdf = 0.5 * math.erfc(z / math.sqrt(2))
        out.append(m - s * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) / cdf if cdf > 1e-3 else -3 * s)
    return torch.tensor(out, dtype=torch.float64)


def ofd_reference(connectors, f_s: list[Tensor], f_t: list[Tensor]) -> tuple[Tensor, float]:
    """Heo et al. (ICCV 2019): s = BN(conv1x1(F_s)), t = max(F_t, m) with the margin m from the teacher batch's
    per-channel mean and std, Σ [s > t or t > 0](s - t)^2 weighted 2^(i-n), over 1000 B; the teacher pooled
    to the student's size. Also float32's resolution of it (``bn_resolution``)."""
    n, total, atol = len(f_s), torch.zeros((), dtype=torch.float64), 0.0
    for i, (s, t, c) in enumerate(zip(f_s, f_t, connectors)):
        t = f64(t)
        per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
        margin = truncated_normal_margin(per_channel.std(1, unbiased=False), per_channel.mean(1))
        y = conv1x1(c.proj.weight, f64(s))
        r = bn_train(y, c.bn)
        t = torch.maximum(adaptive_pool(t, r.shape[2:]), margin.view(1, -1, 1, 1))
        keep = (r > t) | (t > 0)
        w = 1 / 2 ** (n - 1 - i) / r.shape[0] / 1000
        loss = w * ((r - t).pow(2) * keep).sum()
        total = total + loss
        delta = bn_resolution(y, c.bn) + 16 * EPS32 * float(t.abs().max())
        atol += squares_atol(loss, delta, w * r.numel())
    return total, atol


def hcl_reference(o: Tensor, t: Tensor, levels=(4, 2, 1)) -> Tensor:
    """ReviewKD's hcl: (MSE + Σ_k 2^-k MSE of l_k x l_k pooled maps) / (1 + Σ_k 2^-k), a level l >= max(h, w)
    skipped, a non-square map pooled to min(l, h) x min(l, w)."""
    h, w = o.shape[2:]
    loss, cnt, tot = (o - t).pow(2).mean(), 1.0, 1.0
    for lvl in levels:
        if lvl >= max(h, w):
            continue
        size = (min(lvl, h), min(lvl, w))
        cnt /= 2
        loss = loss + (adaptive_pool(o, size) - adaptive_pool(t, size)).pow(2).mean() * cnt
        tot += cnt
    return loss / tot


def attn_reference(a_s: Tensor, a_t: Tensor, lengths: list[int]) -> Tensor:
    """TinyBERT: (1/h) Σ_heads MSE over each sample's real n x n block (one mean over the batch's real entries);
    head-averaged maps when the head counts differ."""
    a_s, a_t = f64(a_s), f64(a_t)
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    sq = sum((a_s[i, :, :n, :n] - a_t[i, :, :n, :n]).pow(2).sum() for i, n in enumerate(lengths))
    return sq / (a_s.shape[1] * sum(n * n for n in lengths))


def minilm_reference(a_s: Tensor, a_t: Tensor, v_s: Tensor, v_t: Tensor, lengths: list[int], heads: int) -> Tensor:
    """MiniLM: Σ_heads Σ_real rows KL(teacher || student) / (heads · Σ|x|) of the attention maps (the student's
    clamped at float32's smallest normal before the log, as kdray states) plus the same of the value
    relations softmax(V_a V_a^T / sqrt(d_k)) over the real tokens."""
    a_s, a_t, v_s, v_t = f64(a_s), f64(a_t), f64(v_s), f64(v_t)
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny

    def relation(v, n):  # (heads, n, n) log relation of one sample's real tokens
        d = v.shape[-1] // heads
        v = v[:n].view(n, heads, d).transpose(0, 1)
        return log_softmax((v @ v.transpose(1, 2) / math.sqrt(d)).reshape(-1, n)).view(heads, n, n)

    at = vr = 0.0
    for i, n in enumerate(lengths):
        p = a_t[i, :, :n, :n]
        at = at + torch.where(p > 0, p * (p.clamp_min(tiny).log() - a_s[i, :, :n, :n].clamp_min(tiny).log()),
                              torch.zeros_like(p)).sum()
        vr = vr + kl_rows(relation(v_t[i], n), relation(v_s[i], n)).sum()
    return at / (a_t.shape[1] * sum(lengths)) + vr / (heads * sum(lengths))


# -- relational ----------------------------------------------------------------------------------------
def unit_or_zero(d: torch.Tensor) -> torch.Tensor:
    """d / |d| along the last dim, 0 (with gradient 0) where d = 0: a zero difference has angle 0, as the
    authors' ``F.normalize`` gives it (their gradient there is 1/eps; kdray's is 0, see RKD's docstring)."""
    n = d.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, d / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(d))


def rkd_reference(e_s: torch.Tensor, e_t: torch.Tensor, w_d: float, w_a: float) -> torch.Tensor:
    """Park et al.'s RKD in float64 from explicit differences (the authors' ``RKdAngle`` / ``RkdDistance``,
    github.com/lenscloth/RKD ``metric/loss.py``): distances over their mean over the B(B-1) pairs i != j (the
    paper's χ²; 0 where that mean is 0, a batch of one point), angles of the normalised differences at every
    vertex, both through smooth L1 averaged over all entries."""
    def dist(e):
        d = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1).clamp_min(0).sqrt()
        b = e.shape[0]
        mu = d.sum() / (b * (b - 1))
        return d / mu if mu > 0 else torch.zeros_like(d)

    def angle(e):
        u = unit_or_zero(e.unsqueeze(0) - e.unsqueeze(1))  # u[j, i] = (e_i - e_j) / |e_i - e_j|
        return torch.bmm(u, u.transpose(1, 2))

    e_s, e_t = e_s.double(), e_t.double()
    return (w_d * F.smooth_l1_loss(dist(e_s), dist(e_t)) + w_a * F.smooth_l1_loss(angle(e_s), angle(e_t)))


def sp_reference(f_s: list[Tensor], f_t: list[Tensor]) -> Tensor:
    """Tung & Mori: G = row-normalised Q Q^T of the flattened activations; Σ_pairs |G_t - G_s|_F^2 / B^2."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(f_s, f_t):
        g_s, g_t = (unit(q @ q.t(), 1) for q in (f64(s).flatten(1), f64(t).flatten(1)))
        total = total + (g_t - g_s).pow(2).sum() / s.shape[0] ** 2
    return total


def pkt_reference(e_s: Tensor, e_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas: p_{j|i} of the [0, 1]-shifted cosine kernel (rows over |e| + eps), KL(q_t || p_s)
    entries averaged over the B x B grid."""
    def cond(e):
        e = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
        k = (e @ e.t() + 1) / 2
        return k / k.sum(1, keepdim=True)

    p, q = cond(pool_mean(e_s)), cond(pool_mean(e_t))
    return (q * torch.log((q + eps) / (p + eps))).mean()


def cc_reference(e_s: Tensor, e_t: Tensor, gamma: float, order: int, connector=None) -> Tensor:
    """Peng et al.: ψ_ij = Σ_{p<=P} e^{-2γ} (2γ)^p / p! (F_i.F_j)^p of L2-normalised rows, the student's after
    the linear connector; mean (ψ_t - ψ_s)^2 over the B x B grid."""
    e_s, e_t = pool_mean(e_s), pool_mean(e_t)
    if connector is not None:
        e_s = e_s @ f64(connector.weight).t() + f64(connector.bias)

    def psi(e):
        c = unit(e, 1) @ unit(e, 1).t()
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c.pow(p) for p in range(order + 1))

    return (psi(e_t) - psi(e_s)).pow(2).mean()


def crd_reference(e_s: Tensor, e_t: Tensor, w_s, b_s, w_t, b_t, m_s: Tensor, m_t: Tensor, cidx: Tensor,
                  tau: float, n: int, eps: float = 1e-7) -> Tensor:
    """Tian et al.: s, t = normalize(W e + b); h^s = exp(M^t_j.s_i/τ)/Z_s, h^t = exp(M^s_j.t_i/τ)/Z_t with
    Z = N · mean of this (first) batch; NCE with P_n = 1/N, K negatives: -1/B Σ [log h_0/(h_0 + K/N + ε)
    + Σ_k log (K/N)/(h_k + K/N + ε)], for both anchors."""
    s = unit(pool_mean(e_s) @ f64(w_s).t() + f64(b_s), 1)
    t = unit(pool_mean(e_t) @ f64(w_t).t() + f64(b_t), 1)
    out_s = torch.exp(torch.einsum("bkd,bd->bk", f64(m_t)[cidx], s) / tau)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", f64(m_s)[cidx], t) / tau)
    k = cidx.shape[1] - 1

    def nce(out):
        h = out / (out.mean() * n)
        noise = k / n
        return -(torch.log(h[:, 0] / (h[:, 0] + noise + eps)).sum()
                 + torch.log(noise / (h[:, 1:] + noise + eps)).sum()) / h.shape[0]

    return nce(out_s) + nce(out_t)


# -- token-level divergences (tkd) ------------------------------------------------------------------------------
def _kl_probs(p: Tensor, q: Tensor) -> Tensor:
    """Σ p log(p / q) per row, from probabilities (0 log 0 = 0), float64."""
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros((), dtype=p.dtype)).sum(-1)


def divergence_rows(kind: str, p: Tensor, q: Tensor, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """The divergences of TRL's GKD and DistiLLM per row, written on probabilities (the mixtures formed in probability
    space, as the authors do): teacher ``p``, student ``q``, float64."""
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl_probs(p, q)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl_probs(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl_probs(p, m) + (1 - beta) * _kl_probs(q, m)
    if kind == "skew_fkl":
        return _kl_probs(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_rkl":
        return _kl_probs(q, alpha * q + (1 - alpha) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(kind)


def tkd_reference(z_s: Tensor, z_t: Tensor, kind: str, t: float, beta: float = 0.5, alpha: float = 0.1,
                  mask: Tensor | None = None) -> Tensor:
    """T² · mean over the (masked) rows of the divergence of softmax(z_t / T) and softmax(z_s / T), float64."""
    p, q = log_softmax(f64(z_t) / t).exp(), log_softmax(f64(z_s) / t).exp()
    d = divergence_rows(kind, p, q, beta, alpha)
    if mask is not None:
        d = d[mask]
    return t * t * d.mean()
