"""Relational knowledge: the student matches relations *between samples* in the teacher's representation."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdray.knowledge.base import (
    Knowledge,
    KnowledgeParams,
    LayerPairsParams,
    ModelLayout,
    TapOutputs,
    as_float,
    last,
    register_knowledge,
)
from kdray.knowledge.feature import token_mask


def embedding(f: Tensor) -> Tensor:
    """A (B, D) embedding from a tap: spatial maps are global-average-pooled first."""
    f = as_float(f)
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def pairwise_distances(e: Tensor) -> Tensor:
    """Euclidean distance matrix of the rows of ``e`` (exactly 0 on the diagonal, gradient 0 there).

    ``torch.cdist`` on differences, not the Gram-matrix shortcut, whose cancellation loses the small
    distances of wide features."""
    return torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")


def distance_potential(e: Tensor) -> Tensor:
    r"""RKD's :math:`\psi_D(t_i, t_j) = \|t_i - t_j\|_2 / \mu`, :math:`\mu` the mean distance over pairs."""
    d = pairwise_distances(e)
    b = e.shape[0]
    mu = d.sum() / max(b * (b - 1), 1)
    return d / mu.clamp_min(1e-12)


def unit_differences(e: Tensor) -> Tensor:
    r"""(B, D) -> (B, B, D): entry [j, i] is :math:`(e_i - e_j)/\|e_i - e_j\|`, and 0 where :math:`e_i = e_j`.

    The differences are taken explicitly, as the authors do: for two samples close together the difference of
    their float32 values is exact, where a Gram-matrix route cancels. A zero difference (a sample with itself,
    or two equal samples) has no direction: it is 0 and passes no gradient."""
    return _unit(e.unsqueeze(0) - e.unsqueeze(1))


def _unit(d: Tensor) -> Tensor:
    """``d`` over its norm along the last dim; 0, with gradient 0, where the norm is 0."""
    n = d.norm(dim=-1, keepdim=True)
    nonzero = n > 0
    return torch.where(nonzero, d / torch.where(nonzero, n, torch.ones_like(n)), torch.zeros_like(d))


def angle_potential(e: Tensor) -> Tensor:
    r"""RKD's :math:`\psi_A(t_i, t_j, t_k) = \langle \frac{t_i - t_j}{\|t_i - t_j\|}, \frac{t_k - t_j}{\|t_k - t_j\|}\rangle`.

    (B, D) -> (B, B, B); entry [j, i, k] is the cosine of the angle at vertex j. Triples with a zero difference
    (i = j, k = j, or duplicate samples) are 0, as in the reference code."""
    u = unit_differences(e)
    return torch.bmm(u, u.transpose(1, 2))


def _angle_loss_sum(e_s: Tensor, e_t: Tensor, j0: int, j1: int) -> Tensor:
    """Σ of smooth L1 between the student's and the teacher's angles at the vertices ``j0:j1``."""
    def angles(e: Tensor) -> Tensor:
        u = _unit(e.unsqueeze(0) - e[j0:j1].unsqueeze(1))  # [j, i]: e_i - e_j for the vertices j of this block
        return torch.bmm(u, u.transpose(1, 2))

    return F.smooth_l1_loss(angles(e_s), angles(e_t), reduction="sum")


ANGLE_CHUNK_ELEMENTS = 2**24  # difference vectors held at once per model (64 MiB of float32)


def angle_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    r"""Mean smooth L1 between :math:`\psi_A(s)` and :math:`\psi_A(t)` over all :math:`B^3` triples.

    Computed a block of vertices at a time, each block recomputed in the backward pass
    (``torch.utils.checkpoint``) when the whole would not fit in one: memory O(chunk·B·D), not the reference
    code's O(B²·D) (2 GiB at B = 256, D = 2048). The value is the same sum."""
    b = e_s.shape[0]
    width = max(e_s.shape[1], e_t.shape[1])
    chunk = max(1, min(b, ANGLE_CHUNK_ELEMENTS // max(1, b * width)))
    total = e_s.new_zeros(())
    for j0 in range(0, b, chunk):
        j1 = min(b, j0 + chunk)
        if chunk < b and torch.is_grad_enabled() and e_s.requires_grad:
            total = total + checkpoint(_angle_loss_sum, e_s, e_t, j0, j1, use_reentrant=False)
        else:
            total = total + _angle_loss_sum(e_s, e_t, j0, j1)
    return total / b**3


@register_knowledge("rkd", "relational", "Relational KD: match pairwise distances and triplet angles of embeddings")
class RKD(Knowledge):
    r"""Relational knowledge distillation.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068.

    With embeddings :math:`t_i` (teacher) and :math:`s_i` (student) of a batch:

    .. math::
        \psi_D(t_i,t_j) = \frac{\|t_i-t_j\|_2}{\mu},\quad
        \mu = \frac{1}{|\chi^2|}\sum_{(i,j)\in\chi^2}\|t_i-t_j\|_2

        \psi_A(t_i,t_j,t_k) = \cos\angle t_i t_j t_k

        L_{rkd} = w_D \cdot \overline{\ell_\delta\big(\psi_D(s), \psi_D(t)\big)}
                + w_A \cdot \overline{\ell_\delta\big(\psi_A(s), \psi_A(t)\big)}

    :math:`\ell_\delta` is the Huber (smooth-L1, :math:`\delta=1`) loss averaged over all pairs / triplets
    (:math:`B^2` distances, :math:`B^3` angles, the degenerate ones included as 0, as the reference).
    Both potentials are invariant to translating, rotating and scaling the embedding space. The
    paper's defaults are :math:`w_D = 25, w_A = 50`.

    Reference: github.com/lenscloth/RKD ``metric/loss.py`` (``RkdDistance``, ``RKdAngle``) and RepDistiller
    ``distiller_zoo/RKD.py`` (``RKDLoss``), which this matches: distances over their mean off the diagonal,
    angles from explicitly normalised differences. Deliberate differences:

    * distances from explicit differences (``torch.cdist`` without the matrix-product shortcut), where the
      reference's ``pdist`` expands :math:`\|a\|^2 + \|b\|^2 - 2ab` and clamps at 1e-12: the same values,
      without the cancellation for close samples;
    * a zero difference (two equal samples) gives angle 0 as in the reference, but gradient 0 where the
      reference's ``F.normalize`` gives :math:`1/\epsilon = 10^{12}`;
    * angles are computed a block of vertices at a time (:func:`angle_loss`), so memory is not
      :math:`O(B^2 D)`;
    * spatial taps are average-pooled to vectors (RepDistiller flattens; its RKD reads the pooled
      penultimate features, kdray's default ``embedding_layer``, where the two agree).
    """

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher embedding layer (default: the model's)")
        student_layer: str | None = Field(None, description="student embedding layer (default: the model's)")
        distance_weight: float = Field(25.0, ge=0, description="w_D, weight of the distance term")
        angle_weight: float = Field(50.0, ge=0, description="w_A, weight of the angle term")

        @model_validator(mode="after")
        def _some_term(self) -> "RKD.Params":
            if self.distance_weight == 0 and self.angle_weight == 0:
                raise ValueError("distance_weight and angle_weight cannot both be 0")
            return self

    def __init__(
        self, teacher_layer: str, student_layer: str, distance_weight: float = 25.0, angle_weight: float = 50.0
    ) -> None:
        super().__init__()
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or teacher.embedding_layer or last(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or student.embedding_layer or last(student.feature_layers, "student_layer"),
            kwargs.get("distance_weight", 25.0),
            kwargs.get("angle_weight", 50.0),
        )

    def forward(self, e_s: Tensor, e_t: Tensor) -> Tensor:
        """(B, D_s[, *spatial]) student and (B, D_t[, *spatial]) teacher embeddings -> scalar."""
        e_s, e_t = embedding(e_s), embedding(e_t)
        loss = e_s.new_zeros(())
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(distance_potential(e_s), distance_potential(e_t))
        if self.angle_weight:
            loss = loss + self.angle_weight * angle_loss(e_s, e_t)
        return loss

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]])


@register_knowledge("sp", "relational", "Similarity-preserving KD: match the batch's normalised similarity matrices")
class SP(Knowledge):
    r"""Similarity-preserving knowledge distillation.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682.

    With :math:`Q \in \mathbb{R}^{B \times CHW}` the flattened activations of a layer,
    :math:`G = \mathrm{rownorm}(Q Q^\top)` (each row L2-normalised):

    .. math::
        L_{sp} = \frac{1}{B^2} \big\| G_t - G_s \big\|_F^2

    summed over layer pairs. Only B x B matrices are compared, so teacher and student layers may
    have any shapes. RepDistiller's default weight is 3000.

    Reference: RepDistiller ``distiller_zoo/SP.py`` (``Similarity``, "verified by original author"), which this
    matches. Deliberate differences: none; layer pairs are summed as RepDistiller sums its list of terms.
    """

    class Params(LayerPairsParams):
        teacher_layers: list[str] | None = Field(None, description="teacher layers (default: last stage)")
        student_layers: list[str] | None = Field(None, description="student layers, paired in order")

    def __init__(self, teacher_layers: list[str], student_layers: list[str]) -> None:
        super().__init__()
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError("SP needs the same non-zero number of teacher and student layers")
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = kwargs.get("teacher_layers"), kwargs.get("student_layers")
        t = t or [last(teacher.feature_layers, "teacher_layers")] * (len(s) if s else 1)
        s = s or [last(student.feature_layers, "student_layers")] * len(t)
        return cls(t, s)

    @staticmethod
    def similarity(f: Tensor) -> Tensor:
        q = as_float(f).flatten(1)
        return F.normalize(q @ q.t(), dim=1)

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        if isinstance(f_s, Tensor):
            f_s, f_t = [f_s], [f_t]
        total = f_s[0].new_zeros((), dtype=torch.float32)
        for a_s, a_t in zip(f_s, f_t):
            b = a_s.shape[0]
            total = total + (self.similarity(a_t) - self.similarity(a_s)).pow(2).sum() / (b * b)
        return total

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(
            [student.features[n] for n in self.student_layers],
            [teacher.features[n] for n in self.teacher_layers],
        )


# -- transformers: self-attention relations ------------------------------------------------------------
def _row_kl(p: Tensor, log_p: Tensor, log_q: Tensor, real: Tensor) -> Tensor:
    """Σ over query rows of real tokens of KL(p_row || q_row), divided by heads · Σ_b |x_b|."""
    kl = torch.where(p > 0, p * (log_p - log_q), p.new_zeros(())).sum(-1)  # (B, h, T); 0·log 0 = 0
    rows = real.unsqueeze(1).to(kl.dtype)  # (B, 1, T)
    return (kl * rows).sum() / (rows.sum() * kl.shape[1]).clamp_min(1)


def value_relation(v: Tensor, heads: int, real: Tensor) -> Tensor:
    r"""MiniLM's value relation :math:`\log \mathrm{softmax}(V_a V_a^\top / \sqrt{d_k})` per head, (B, heads, T, T).

    ``v`` is (B, T, H), split into ``heads`` heads of :math:`d_k = H / heads`; padded keys (``real`` False)
    are masked out of the softmax as in self-attention."""
    b, t, h = v.shape
    if h % heads:
        raise ValueError(f"a value tap of width {h} cannot be split into {heads} relation heads")
    v = as_float(v).view(b, t, heads, h // heads).transpose(1, 2)  # (B, heads, T, d_k)
    scores = v @ v.transpose(-1, -2) / math.sqrt(h // heads)
    scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


@register_knowledge("minilm", "relational",
                    "MiniLM deep self-attention distillation: KL of last-layer attention and value relations")
class MiniLM(Knowledge):
    r"""MiniLM's deep self-attention distillation (last Transformer layer).

    Wang, Wei, Dong, Bao, Yang & Zhou, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
    Compression of Pre-Trained Transformers", NeurIPS 2020, arXiv:2002.10957.

    With :math:`A_{a,t}` the attention distribution of head :math:`a` (of :math:`A_h`) at token :math:`t`
    and the value relation :math:`VR_a = \mathrm{softmax}(V_a V_a^\top / \sqrt{d_k})`:

    .. math::
        L_{AT} = \frac{1}{A_h |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
                 \mathrm{KL}\big(A^T_{a,t} \,\|\, A^S_{a,t}\big), \qquad
        L_{VR} = \frac{1}{A_h |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
                 \mathrm{KL}\big(VR^T_{a,t} \,\|\, VR^S_{a,t}\big)

        L_{minilm} = L_{AT} + L_{VR}

    averaged over the batch (:math:`|x|` the real tokens of each sequence: padded query rows are
    left out, padded keys have probability 0 in both models and are masked out of the value
    relation's softmax; the tokens are read off the teacher's attention map). Values are split into
    ``relation_heads`` heads (default: the teacher's attention head count), each model with its own
    :math:`d_k = H / heads`, so teacher and student hidden sizes may differ (MiniLMv2's relation
    heads). :math:`L_{AT}` needs equal head counts; otherwise the head-averaged attention
    distributions are compared. Attention maps are probabilities taken before attention dropout;
    student probabilities that underflow to 0 are clamped to the smallest float32 before the log.

    Reference: no public implementation of the loss (github.com/microsoft/unilm ``minilm/README.md`` publishes
    the distilled models only); this follows the paper's Eqs. 4-6. Deliberate differences: the relation heads of MiniLMv2 for
    unequal hidden sizes, and the padding rules above.
    """

    class Params(KnowledgeParams):
        teacher_attention_layer: str | None = Field(None, description="teacher attention tap (default: last)")
        student_attention_layer: str | None = Field(None, description="student attention tap (default: last)")
        teacher_value_layer: str | None = Field(None, description="teacher value tap (default: last)")
        student_value_layer: str | None = Field(None, description="student value tap (default: last)")
        relation_heads: int | None = Field(
            None, ge=1, description="heads the values are split into (default: the teacher's attention heads)")

    def __init__(self, teacher_attention_layer: str, student_attention_layer: str, teacher_value_layer: str,
                 student_value_layer: str, relation_heads: int | None = None) -> None:
        super().__init__()
        self.teacher_layers = [teacher_attention_layer, teacher_value_layer]
        self.student_layers = [student_attention_layer, student_value_layer]
        self.relation_heads = relation_heads

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        def pick(given: str | None, layers: tuple[str, ...], field: str) -> str:
            if given:
                return given
            if not layers:
                raise ValueError(f"the {field.split('_')[0]} declares no {field.split('_')[1]} layers "
                                 f"(Hugging Face transformers do); name {field} explicitly")
            return layers[-1]

        return cls(
            pick(kwargs.get("teacher_attention_layer"), teacher.attention_layers, "teacher_attention_layer"),
            pick(kwargs.get("student_attention_layer"), student.attention_layers, "student_attention_layer"),
            pick(kwargs.get("teacher_value_layer"), teacher.value_layers, "teacher_value_layer"),
            pick(kwargs.get("student_value_layer"), student.value_layers, "student_value_layer"),
            kwargs.get("relation_heads"),
        )

    def forward(self, a_s: Tensor, a_t: Tensor, v_s: Tensor, v_t: Tensor) -> Tensor:
        a_s, a_t = as_float(a_s), as_float(a_t)
        if a_s.dim() != 4 or a_s.shape[-2:] != a_t.shape[-2:] or a_s.shape[0] != a_t.shape[0]:
            raise ValueError(f"attention maps must be (B, heads, T, T) of one length, got {tuple(a_s.shape)} "
                             f"and {tuple(a_t.shape)}")
        if v_s.dim() != 3 or v_s.shape[:2] != a_s.shape[:1] + a_s.shape[-1:] or v_t.shape[:2] != v_s.shape[:2]:
            raise ValueError(f"value taps must be (B, T, H) with the maps' B and T, got {tuple(v_s.shape)} "
                             f"and {tuple(v_t.shape)}")
        real = token_mask(a_t)
        heads = self.relation_heads or a_t.shape[1]
        if a_s.shape[1] != a_t.shape[1]:
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        tiny = torch.finfo(torch.float32).tiny
        l_at = _row_kl(a_t, a_t.clamp_min(tiny).log(), a_s.clamp_min(tiny).log(), real)
        log_r_t, log_r_s = value_relation(v_t, heads, real), value_relation(v_s, heads, real)
        l_vr = _row_kl(log_r_t.exp(), log_r_t, log_r_s, real)
        return l_at + l_vr

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        (s_a, s_v), (t_a, t_v) = self.student_layers, self.teacher_layers
        return self(student.features[s_a], teacher.features[t_a], student.features[s_v], teacher.features[t_v])


# -- probabilistic and kernel relations between embeddings ---------------------------------------------
def pkt_conditional(e: Tensor, eps: float = 1e-7) -> Tensor:
    r"""PKT's conditional probabilities :math:`p_{j|i} = K(e_i, e_j) / \sum_k K(e_i, e_k)`, (B, B).

    :math:`K` is the cosine similarity shifted to [0, 1], :math:`(\cos + 1) / 2`; rows are divided by
    :math:`\|e_i\| + \epsilon` as in RepDistiller's ``PKT.cosine_similarity_loss`` (a zero row stays 0)."""
    e = e / (torch.linalg.vector_norm(e, dim=1, keepdim=True) + eps)
    k = (e @ e.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


@register_knowledge("pkt", "relational",
                    "Probabilistic KT: KL between the batch's cosine-kernel conditional probabilities")
class PKT(Knowledge):
    r"""Probabilistic knowledge transfer.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
    arXiv:1803.10837. Reference code: RepDistiller ``distiller_zoo/PKT.py`` (from the authors'
    ``passalis/probabilistic_kt``).

    With the cosine kernel shifted to [0, 1], :math:`K(a, b) = \frac{1}{2}\big(\frac{a^\top b}{\|a\|\|b\|} + 1\big)`,
    and the conditional probabilities of the batch's embeddings

    .. math::
        p_{j|i} = \frac{K(s_i, s_j)}{\sum_k K(s_i, s_k)}, \qquad
        q_{j|i} = \frac{K(t_i, t_j)}{\sum_k K(t_i, t_k)}

        L_{pkt} = \frac{1}{B^2} \sum_{i=1}^{B} \sum_{j=1}^{B}
                  q_{j|i} \log \frac{q_{j|i} + \epsilon}{p_{j|i} + \epsilon}, \qquad \epsilon = 10^{-7}

    i.e. KL(teacher ‖ student) of each row, summed over the rows and divided by :math:`B^2` (the
    reference code's ``torch.mean`` over the B x B entries; the paper writes the plain sum, B² times
    larger). As in the reference code the sums include :math:`k = i` / :math:`j = i`. Only B x B
    kernels are compared, so teacher and student embeddings may have any widths: PKT needs no
    connector. The loss is invariant to scaling each embedding by a positive factor and to rotating
    either embedding space. Spatial taps are average-pooled to vectors. RepDistiller's weight is
    30000 (``scripts/run_cifar_distill.sh``), a sign of how small the term is: for related embeddings
    the two kernels are nearly uniform and the KL is second order in their difference, so the B x B
    part is computed in float64 (float32 is off by percents there) and returned as float32.
    """

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher embedding layer (default: the model's)")
        student_layer: str | None = Field(None, description="student embedding layer (default: the model's)")

    eps = 1e-7

    def __init__(self, teacher_layer: str, student_layer: str) -> None:
        super().__init__()
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or teacher.embedding_layer or last(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or student.embedding_layer or last(student.feature_layers, "student_layer"),
        )

    def forward(self, e_s: Tensor, e_t: Tensor) -> Tensor:
        # float64 inside (B x B only, returned as float32): the kernels of related embeddings are nearly
        # uniform, p and q ~ 1/B agree to ~1e-4, and float32's rounding of log(q/p) near 0 is a
        # first-order error of a second-order quantity (±2 % on pooled ResNet-like features).
        e_s, e_t = embedding(e_s).double(), embedding(e_t).double()
        p, q = pkt_conditional(e_s, self.eps), pkt_conditional(e_t, self.eps)
        return (q * torch.log((q + self.eps) / (p + self.eps))).mean().float()

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]])


def taylor_rbf_correlation(e: Tensor, gamma: float, order: int) -> Tensor:
    r"""CC's correlation matrix: the Gaussian RBF of the L2-normalised rows by its P-order Taylor expansion.

    For unit vectors :math:`\exp(-\gamma\|a - b\|^2) = e^{-2\gamma} e^{2\gamma a^\top b}
    \approx \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (a^\top b)^p`."""
    e = F.normalize(e, p=2, dim=1)
    sim = e @ e.t()
    corr = torch.zeros_like(sim)
    for p in range(order + 1):
        corr = corr + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return corr


@register_knowledge("cc", "relational",
                    "Correlation congruence: MSE of the batch's Taylor-RBF correlation matrices")
class CC(Knowledge):
    r"""Correlation congruence (the correlation term of CCKD).

    Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge Distillation",
    ICCV 2019, arXiv:1904.01802. Reference code: ``kd_losses/cc.py`` of AberHu/Knowledge-Distillation-Zoo
    (the paper's Taylor kernel; RepDistiller's ``distiller_zoo/CC.py`` is a different, pairwise-delta
    formula from the authors and is not followed here).

    With :math:`F_s, F_t \in \mathbb{R}^{B \times d}` the L2-normalised embeddings of a batch (the
    student's after a learned linear connector :math:`W`, below) and the correlation matrix
    :math:`\psi(F)_{ij} = k(F_i, F_j)` of the Gaussian RBF kernel approximated by its P-order Taylor
    expansion:

    .. math::
        k(F_i, F_j) = \exp\big(-\gamma \|F_i - F_j\|^2\big)
                    \approx \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} \big(F_i F_j^\top\big)^p

        L_{cc} = \frac{1}{B^2} \big\| \psi(F_t) - \psi(F_s) \big\|_F^2

    Defaults :math:`\gamma = 0.4`, :math:`P = 2` (the paper's P; both from the reference's
    ``train_kd.py`` flags). The student embedding first goes through a learned linear map to the
    teacher's width, created from the shapes of the dry forward pass (``bind``); ``connector: false``
    compares the raw embeddings (the kernel only needs B x B matrices, so widths may still differ).
    Spatial taps are average-pooled to vectors.

    Deliberate differences from the reference: the learned linear connector to the teacher's width (the
    reference's student and teacher embeddings share a width), switched off by ``connector: false``.
    """

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher embedding layer (default: the model's)")
        student_layer: str | None = Field(None, description="student embedding layer (default: the model's)")
        gamma: float = Field(0.4, gt=0, description="γ of the Gaussian RBF kernel exp(-γ‖a-b‖²)")
        order: int = Field(2, ge=0, le=20, description="P, the order of the kernel's Taylor expansion")
        connector: bool = Field(True, description="learned linear map of the student embedding to the teacher's width")

    def __init__(self, teacher_layer: str, student_layer: str, gamma: float = 0.4, order: int = 2,
                 connector: bool = True) -> None:
        super().__init__()
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]
        self.gamma, self.order, self.use_connector = float(gamma), int(order), bool(connector)
        self.connector: torch.nn.Linear | None = None

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or teacher.embedding_layer or last(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or student.embedding_layer or last(student.feature_layers, "student_layer"),
            kwargs.get("gamma", 0.4),
            kwargs.get("order", 2),
            kwargs.get("connector", True),
        )

    def _make_connector(self, e_s: Tensor, e_t: Tensor) -> None:
        self.connector = torch.nn.Linear(e_s.shape[1], e_t.shape[1]).to(e_s.device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        if self.use_connector:
            self._make_connector(embedding(student_features[self.student_layers[0]]),
                                 embedding(teacher_features[self.teacher_layers[0]]))

    def forward(self, e_s: Tensor, e_t: Tensor) -> Tensor:
        """(B, D_s[, *spatial]) student and (B, D_t[, *spatial]) teacher embeddings -> scalar."""
        e_s, e_t = embedding(e_s), embedding(e_t)
        if self.use_connector:
            if self.connector is None:  # used directly on tensors: infer the connector now
                self._make_connector(e_s, e_t)
            e_s = self.connector(e_s)
        c_s = taylor_rbf_correlation(e_s, self.gamma, self.order)
        c_t = taylor_rbf_correlation(e_t, self.gamma, self.order)
        return F.mse_loss(c_s, c_t)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]])


# -- CRD: contrastive representation distillation ------------------------------------------------------
def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(*tensors: Tensor) -> list[Tensor]:
    """Each tensor's rows from every rank, concatenated in rank order (``all_gather``); unchanged in one process.

    Every rank must pass tensors of one shape: the training loop's ``Batches`` gives all ranks the same batch
    sizes (its ``DistributedSampler`` pads the shards to one length, and the batches are cut alike)."""
    if _world_size() == 1:
        return list(tensors)
    import torch.distributed as dist

    out = []
    for t in tensors:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        out.append(torch.cat(parts))
    return out


def _first_occurrences(y: Tensor) -> tuple[Tensor, Tensor]:
    """``y`` sorted, and for each sorted entry the position in ``y`` of the first entry with its value.

    Lets a scatter with repeated indices write the same row for every repeat, so the result does not depend
    on the order the writes land in (no host sync, unlike ``torch.unique``)."""
    vals, perm = torch.sort(y, stable=True)
    pos = torch.arange(y.numel(), device=y.device)
    start = torch.ones_like(vals, dtype=torch.bool)
    start[1:] = vals[1:] != vals[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values  # its group's first position
    return vals, perm[first]


class ContrastMemory(torch.nn.Module):
    r"""CRD's memory bank: an (N, feat_dim) bank of unit embeddings per model, updated with momentum.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
    Reference: RepDistiller ``crd/memory.py`` (``ContrastMemory``). For each anchor :math:`v` of one model
    and the K+1 bank rows :math:`m_k` of the *other* model at indices ``idx`` (column 0 = the sample's
    own index, the positive):

    .. math::
        h_k = \exp(m_k^\top v / \tau) / Z, \qquad Z = N \cdot \overline{\exp(m^\top v / \tau)}
        \text{ (fixed from the first batch)}

    and after scoring, the rows of the batch's own indices are updated:
    :math:`m_y \leftarrow \mathrm{normalize}(\mu\, m_y + (1 - \mu)\, v)`. Defaults: :math:`\tau = 0.07`,
    :math:`\mu = 0.5` (RepDistiller ``train_student.py`` lines 84-85; K = 16384 there, line 83). Banks
    start uniform in :math:`\pm 1/\sqrt{d/3}`.

    The banks and Z are plain tensors, not registered buffers: DDP (``broadcast_buffers``) would broadcast
    every buffer from rank 0 at every forward, two (N, d) banks per step. They are in ``state_dict()`` all
    the same (``get_extra_state``: a checkpoint restores them exactly) and follow ``.to()`` (``_apply``).
    Under DDP (``torch.distributed`` initialised, world > 1) the banks stay identical on every rank: rank 0's
    banks are broadcast before the first scoring, Z is the mean of the ranks' first-batch estimates, and
    every rank calls :meth:`update` with the embeddings and indices gathered from all ranks
    (:func:`gather_rows`). A repeated index in an update (padded shards) takes its first occurrence's row.
    """

    _STATE = ("memory_s", "memory_t", "z")

    def __init__(self, feat_dim: int, n_data: int, nce_t: float = 0.07, nce_m: float = 0.5) -> None:
        super().__init__()
        self.n_data, self.feat_dim, self.nce_t, self.nce_m = int(n_data), int(feat_dim), float(nce_t), float(nce_m)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.memory_s = torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv)  # student embeddings
        self.memory_t = torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv)  # teacher embeddings
        self.z = torch.full((2,), -1.0)  # Z_s, Z_t; < 0 until the first batch sets them
        self._z_set = False  # a Python mirror of z >= 0: no host sync per step

    # -- state: plain tensors in state_dict() and .to() ----------------------------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._STATE}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        for name in self._STATE:
            cur, new = getattr(self, name), state[name]
            if tuple(new.shape) != tuple(cur.shape):
                raise ValueError(f"CRD memory {name} of shape {tuple(new.shape)} in the state, but this run's is "
                                 f"{tuple(cur.shape)} (another training split or feat_dim)")
            cur.copy_(new)
        self._z_set = bool(self.z[0] >= 0)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        for name in self._STATE:
            t = getattr(self, name)
            moved = fn(t)
            setattr(self, name, moved if moved.dtype == torch.float32 else t.to(moved.device))  # banks stay fp32
        return self

    def _follow(self, device: torch.device) -> None:
        if self.memory_s.device != device:  # used directly on tensors: move once
            for name in self._STATE:
                setattr(self, name, getattr(self, name).to(device))

    # -- use -----------------------------------------------------------------------------------------------
    def scores(self, v_s: Tensor, v_t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(B, K+1) scores of student anchors against teacher bank rows and of teacher anchors against student rows."""
        self._follow(v_s.device)
        if not self._z_set and _world_size() > 1:  # start every rank from rank 0's banks
            import torch.distributed as dist

            dist.broadcast(self.memory_s, 0)
            dist.broadcast(self.memory_t, 0)
        b, k1 = idx.shape
        m_t = self.memory_t.index_select(0, idx.reshape(-1)).view(b, k1, -1)
        m_s = self.memory_s.index_select(0, idx.reshape(-1)).view(b, k1, -1)
        out_s = torch.exp(torch.bmm(m_t, v_s.unsqueeze(2)).squeeze(2) / self.nce_t)  # anchor: student
        out_t = torch.exp(torch.bmm(m_s, v_t.unsqueeze(2)).squeeze(2) / self.nce_t)  # anchor: teacher
        if not self._z_set:
            with torch.no_grad():
                z = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
                if _world_size() > 1:  # equal batch sizes: the mean of the ranks' means is the global mean
                    import torch.distributed as dist

                    dist.all_reduce(z)
                    z /= dist.get_world_size()
                self.z.copy_(z)
            self._z_set = True
        return out_s / self.z[0], out_t / self.z[1]

    @torch.no_grad()
    def update(self, v_s: Tensor, v_t: Tensor, y: Tensor) -> None:
        """Momentum update of the rows ``y`` with the (B, d) embeddings ``v_s``, ``v_t`` (under DDP: gathered)."""
        self._follow(v_s.device)
        y, src = _first_occurrences(y.reshape(-1).to(self.memory_s.device))
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            pos = bank.index_select(0, y) * self.nce_m + v.detach().to(bank.dtype)[src] * (1 - self.nce_m)
            bank.index_copy_(0, y, pos / pos.norm(dim=1, keepdim=True))


def nce_loss(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    r"""CRD's NCE loss (paper Eq. 18; RepDistiller ``crd/criterion.py`` ``ContrastLoss``).

    With :math:`x` the (B, K+1) scores, column 0 the positive, noise :math:`P_n = 1/N`:

    .. math::
        L = -\frac{1}{B} \sum_{i} \Big[\log \frac{x_{i0}}{x_{i0} + K P_n + \epsilon}
            + \sum_{k=1}^{K} \log \frac{K P_n}{x_{ik} + K P_n + \epsilon}\Big]
    """
    m = x.shape[1] - 1
    noise = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


class Embed(torch.nn.Module):
    """RepDistiller's ``Embed`` (``crd/criterion.py`` lines 79-102): a linear map to ``dim_out``, L2-normalised."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


@register_knowledge("crd", "relational",
                    "Contrastive representation distillation: NCE of embeddings against the other model's memory bank")
class CRD(Knowledge):
    r"""Contrastive representation distillation.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
    Reference code: RepDistiller ``crd/criterion.py`` (``CRDLoss`` lines 8-48, ``ContrastLoss`` 51-76,
    ``Embed`` 79-102), ``crd/memory.py`` (``ContrastMemory.forward`` lines 23-79), ``train_student.py``
    (defaults lines 81-85, embeddings of the last feature, lines 190-198), ``dataset/cifar100.py``
    (negatives, ``CIFAR100InstanceSample.__getitem__`` lines 158-169).

    With :math:`s_i = \mathrm{normalize}(W_s f^s_i + b_s)` and :math:`t_i = \mathrm{normalize}(W_t f^t_i + b_t)`
    the student's and teacher's embeddings of sample :math:`i` in :math:`\mathbb{R}^d` (two learned
    ``Embed`` connectors made from the dry pass's shapes, ``bind``), memory banks :math:`M^s, M^t \in
    \mathbb{R}^{N \times d}` of both models' embeddings of the :math:`N` training samples, and for each
    sample :math:`K` negative indices :math:`j_1..j_K`:

    .. math::
        h^s_{ij} = \frac{\exp(M^t_j{}^\top s_i / \tau)}{Z_s}, \qquad
        h^t_{ij} = \frac{\exp(M^s_j{}^\top t_i / \tau)}{Z_t}, \qquad
        Z = N \cdot \overline{\exp(\cdot / \tau)} \text{ of the first batch}

        L(h) = -\frac{1}{B} \sum_i \Big[\log \frac{h_{ii}}{h_{ii} + K/N + \epsilon}
               + \sum_{k=1}^{K} \log \frac{K/N}{h_{ij_k} + K/N + \epsilon}\Big]

        L_{crd} = L(h^s) + L(h^t)

    (paper Eq. 18 with the noise distribution :math:`P_n = 1/N`, :math:`\epsilon = 10^{-7}`); after each
    training step the banks' rows of the batch move to :math:`\mathrm{normalize}(\mu M_i + (1 - \mu) v_i)`
    (:class:`ContrastMemory`). Defaults as RepDistiller's: :math:`d = 128, K = 16384, \tau = 0.07, \mu = 0.5`;
    :math:`K` is capped at :math:`N - 1` (``bind_data``). RepDistiller weighs the term 0.8 on CIFAR-100
    (``scripts/run_cifar_distill.sh`` line 29, ``-b 0.8``); kdray's ``weight`` defaults to 1 like every type's.
    Spatial taps are average-pooled to vectors (RepDistiller takes the pooled last feature); by default
    both layers are the models' embedding layers.

    Negatives: RepDistiller's default (``--mode exact``) draws each sample's K negatives from the training
    samples of the *other* classes, without replacement. kdray draws them on the device (``torch``'s RNG,
    which the loop reseeds per rank and epoch) uniformly from the other classes' samples *with* replacement
    (``negatives: other_class``; the same expected loss, one draw per negative, no per-sample index lists),
    from the labels of the training split that ``bind_data`` is given. ``negatives: uniform`` draws from
    all N samples (RepDistiller's ``ContrastMemory`` without ``contrast_idx``: its alias sampler), as does
    a dry run, which knows no labels. Column 0 of the scored indices is the sample itself (the positive).

    The loss needs the batch's sample indices (``uses_index``): the loop's ``idx``, positions in the training
    split, the same on every rank. Under DDP the banks are kept identical on every rank (see
    :class:`ContrastMemory`); they and Z are checkpointed with the objective's ``state_dict``.

    Deliberate differences from the reference, both described above: negatives are drawn with replacement on
    the device (RepDistiller: without replacement, on the CPU), and the banks are kept identical across DDP
    ranks (RepDistiller runs on one GPU).
    """

    uses_index = True

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher embedding layer (default: the model's)")
        student_layer: str | None = Field(None, description="student embedding layer (default: the model's)")
        feat_dim: int = Field(128, ge=1, description="d, the width of the contrastive embedding")
        nce_k: int = Field(16384, ge=1, description="K, negatives per sample (at most the training samples - 1)")
        nce_t: float = Field(0.07, gt=0, description="τ, the temperature of the scores")
        nce_m: float = Field(0.5, ge=0, lt=1, description="μ, the momentum of the memory-bank update")
        negatives: Literal["other_class", "uniform"] = Field(
            "other_class", description="draw negatives from the other classes' samples (RepDistiller's) or all")

    def __init__(self, teacher_layer: str, student_layer: str, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, negatives: str = "other_class") -> None:
        super().__init__()
        if negatives not in ("other_class", "uniform"):
            raise ValueError(f"negatives must be 'other_class' or 'uniform', got {negatives!r}")
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        self.negatives = negatives
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.memory: ContrastMemory | None = None
        self.num_train = 0
        self.k = 0  # K after the cap
        # other_class: labels by sample index, the indices sorted by label, each class's count and start
        self._classes: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or teacher.embedding_layer or last(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or student.embedding_layer or last(student.feature_layers, "student_layer"),
            kwargs.get("feat_dim", 128), kwargs.get("nce_k", 16384), kwargs.get("nce_t", 0.07),
            kwargs.get("nce_m", 0.5), kwargs.get("negatives", "other_class"),
        )

    # -- binding -------------------------------------------------------------------------------------------
    def bind_data(self, num_train: int, labels: Tensor | None = None) -> None:
        n = int(num_train)
        if n < 2:
            raise ValueError(f"CRD needs at least 2 training samples, the split has {n}")
        self.num_train, self.k = n, min(self.nce_k, n - 1)
        self.memory = ContrastMemory(self.feat_dim, n, self.nce_t, self.nce_m)
        self._classes = None
        if labels is not None and self.negatives == "other_class":
            labels = labels.detach().reshape(-1).long()
            if labels.numel() != n:
                raise ValueError(f"CRD got {labels.numel()} labels for a training split of {n} samples")
            if labels.min() < 0:
                raise ValueError("CRD's other-class negatives need class labels >= 0")
            counts = torch.bincount(labels)
            if int(counts.max()) < n:  # a single class has no other class to draw from: uniform then
                self._classes = (labels, torch.argsort(labels, stable=True), counts, torch.cumsum(counts, 0) - counts)

    def _make_embeds(self, e_s: Tensor, e_t: Tensor) -> None:
        self.embed_s = Embed(e_s.shape[1], self.feat_dim).to(e_s.device)
        self.embed_t = Embed(e_t.shape[1], self.feat_dim).to(e_t.device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._make_embeds(embedding(student_features[self.student_layers[0]]),
                          embedding(teacher_features[self.teacher_layers[0]]))

    # -- use -----------------------------------------------------------------------------------------------
    def sample_contrast(self, idx: Tensor) -> Tensor:
        """(B, K+1) indices into the banks: column 0 the batch's own indices (positives), then K negatives."""
        b, n, dev = idx.numel(), self.num_train, idx.device
        if self._classes is None:
            neg = torch.randint(0, n, (b, self.k), device=dev)
        else:
            if self._classes[0].device != dev:
                self._classes = tuple(t.to(dev) for t in self._classes)  # type: ignore[assignment]
            labels, order, counts, starts = self._classes
            c = labels[idx]
            count, start = counts[c].unsqueeze(1), starts[c].unsqueeze(1)
            avail = n - count  # samples of the other classes, >= 1
            # the r-th sample of the others in label order: skip the own class's block [start, start + count)
            r = (torch.rand(b, self.k, device=dev, dtype=torch.float64) * avail).long()
            r = torch.minimum(r, avail - 1)
            neg = order[r + count * (r >= start)]
        return torch.cat([idx.reshape(-1, 1), neg], 1)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        """The loss for embeddings ``f_s``, ``f_t`` of the samples ``idx`` (positions in the training split).

        ``contrast_idx`` (B, K+1), column 0 = ``idx``: the bank rows to score (default: :meth:`sample_contrast`).
        In training mode the banks are updated after scoring (under DDP with all ranks' rows)."""
        if self.memory is None:
            raise ValueError("CRD has no memory bank yet: call bind_data(num_train) with the training split's size")
        e_s, e_t = embedding(f_s), embedding(f_t)
        if self.embed_s is None or self.embed_t is None:  # used directly on tensors: infer the connectors now
            self._make_embeds(e_s, e_t)
        v_s, v_t = self.embed_s(e_s), self.embed_t(e_t)
        idx = idx.reshape(-1).to(v_s.device)
        contrast_idx = self.sample_contrast(idx) if contrast_idx is None else contrast_idx.to(v_s.device)
        out_s, out_t = self.memory.scores(v_s, v_t, contrast_idx)
        loss = nce_loss(out_s, self.num_train) + nce_loss(out_t, self.num_train)
        if self.training:
            rows, ids = gather_rows(torch.cat([v_s, v_t], 1).detach(), idx)
            self.memory.update(rows[:, :self.feat_dim], rows[:, self.feat_dim:], ids)
        return loss

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor,  # type: ignore[override]
                index: Tensor | None = None) -> Tensor:
        if index is None:
            raise ValueError("CRD needs the batch's sample indices (index=), the positions in the training split")
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]], index)
