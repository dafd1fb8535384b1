"""Relational knowledge: the student matches relations *between samples* in the teacher's representation."""
from __future__ import annotations

import math
from typing import Any

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
from kdray.knowledge.tensors import embedding, pairwise_distances


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
    r"""RKD's angle potential :math:`\psi_A(t_i, t_j, t_k) = \cos\angle t_i t_j t_k`:

    .. math::
        \psi_A(t_i, t_j, t_k) = \Big\langle \frac{t_i - t_j}{\|t_i - t_j\|}, \frac{t_k - t_j}{\|t_k - t_j\|}\Big\rangle

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
        """(B, *) student and (B, *) teacher activations (or lists of them, one per layer pair) -> scalar."""
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
        """(B, D_s[, *spatial]) student and (B, D_t[, *spatial]) teacher embeddings -> scalar."""
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
