"""Relational knowledge: the student matches relations *between samples* in the teacher's representation."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from kdray.knowledge.base import (
    Knowledge,
    KnowledgeParams,
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


def angle_potential(e: Tensor) -> Tensor:
    r"""RKD's :math:`\psi_A(t_i, t_j, t_k) = \langle \frac{t_i - t_j}{\|t_i - t_j\|}, \frac{t_k - t_j}{\|t_k - t_j\|}\rangle`.

    Computed from the Gram matrix of centred embeddings, so memory is O(B^3) instead of the reference
    code's O(B^2·D) (2 GB at B=256, D=2048). Entry [j, i, k] is the cosine of the angle at vertex j;
    degenerate triples (i = j or k = j) are 0, as in the reference code.
    """
    e = e - e.mean(0, keepdim=True)
    g = e @ e.t()
    sq = g.diagonal()
    # inner[j, i, k] = <e_i - e_j, e_k - e_j> = g_ik - g_ij - g_jk + g_jj
    inner = g.unsqueeze(0) - g.t().unsqueeze(2) - g.unsqueeze(1) + sq.view(-1, 1, 1)
    norm = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * g).clamp_min(1e-12).sqrt()  # norm[j, i] = |e_i - e_j|
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    inv = norm.reciprocal().masked_fill(eye, 0.0)
    return inner * inv.unsqueeze(2) * inv.unsqueeze(1)


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

    :math:`\ell_\delta` is the Huber (smooth-L1, :math:`\delta=1`) loss averaged over all pairs / triplets.
    Both potentials are invariant to translating, rotating and scaling the embedding space. The
    paper's defaults are :math:`w_D = 25, w_A = 50`. Spatial taps are average-pooled to vectors.
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
        e_s, e_t = embedding(e_s), embedding(e_t)
        loss = e_s.new_zeros(())
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(distance_potential(e_s), distance_potential(e_t))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(angle_potential(e_s), angle_potential(e_t))
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
    """

    class Params(KnowledgeParams):
        teacher_layers: list[str] | None = Field(None, description="teacher layers (default: last stage)")
        student_layers: list[str] | None = Field(None, description="student layers, paired in order")

        @model_validator(mode="after")
        def _same_length(self) -> "SP.Params":
            t, s = self.teacher_layers, self.student_layers
            if t is not None and s is not None and len(t) != len(s):
                raise ValueError(f"teacher_layers ({len(t)}) and student_layers ({len(s)}) must pair up")
            if (t is not None and not t) or (s is not None and not s):
                raise ValueError("teacher_layers / student_layers must not be empty")
            return self

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
