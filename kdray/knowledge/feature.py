"""Feature-based knowledge (hints): the student matches the teacher's intermediate representations."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdray.knowledge.base import (
    Knowledge,
    KnowledgeParams,
    ModelLayout,
    TapOutputs,
    as_float,
    middle,
    register_knowledge,
)


def resize_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Adaptive average pooling of the spatial dims of ``x`` (B, C, *spatial) to ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    return pool(x, size)


class Regressor(nn.Module):
    """FitNets' learned regressor r(·) from a student feature shape to a teacher feature shape.

    Same rank and spatial maps: a 1x1 convolution (Conv1d/Conv2d/Conv3d) changes the channel count, then
    adaptive pooling matches the spatial size. Vectors: a linear layer. Ranks that differ (an MLP
    student against a CNN teacher): flatten, linear, reshape to the teacher's shape.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) and 2 <= len(s) <= 4:
            conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[len(s)]
            self.kind = "conv1x1"
            self.proj: nn.Module = conv(s[0], t[0], kernel_size=1)
        elif len(s) == len(t) == 1:
            self.kind = "linear"
            self.proj = nn.Linear(s[0], t[0])
        else:
            self.kind = "flatten-linear"
            self.proj = nn.Linear(math.prod(s), math.prod(t))

    def forward(self, f_s: Tensor) -> Tensor:
        if self.kind == "conv1x1":
            return resize_to(self.proj(f_s), self.teacher_shape[1:])
        if self.kind == "linear":
            return self.proj(f_s)
        return self.proj(f_s.flatten(1)).view(f_s.shape[0], *self.teacher_shape)


@register_knowledge("fitnet", "feature", "FitNets hints: L2 between a teacher layer and a regressed student layer")
class FitNet(Knowledge):
    r"""FitNets: hints from an intermediate teacher layer.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    arXiv:1412.6550.

    .. math::
        L_{hint} = \frac{1}{N} \sum \big(r(F_s) - F_t\big)^2

    where :math:`F_t` is the teacher's *hint* layer, :math:`F_s` the student's *guided* layer, :math:`r`
    a learned regressor (a 1x1 convolution, or a linear map for vectors) whose shape is inferred from
    one dry forward pass, and the mean runs over every element (RepDistiller's ``nn.MSELoss``). The
    paper trains this stage alone before KD; here it is one term of the joint objective, as in the
    CRD/RepDistiller benchmarks (their default weight is 100).
    """

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher hint layer (default: middle)")
        student_layer: str | None = Field(None, description="student guided layer (default: middle)")

    def __init__(self, teacher_layer: str, student_layer: str) -> None:
        super().__init__()
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]
        self.regressor: Regressor | None = None

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or middle(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or middle(student.feature_layers, "student_layer"),
        )

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        t = teacher_features[self.teacher_layers[0]]
        s = student_features[self.student_layers[0]]
        self.regressor = Regressor(tuple(s.shape[1:]), tuple(t.shape[1:])).to(s.device)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        if self.regressor is None:  # used directly on tensors: infer the connector now
            self.regressor = Regressor(tuple(f_s.shape[1:]), tuple(f_t.shape[1:])).to(f_s.device)
        return F.mse_loss(self.regressor(as_float(f_s)), as_float(f_t))  # fp32 connector on bf16 taps

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]])


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention :math:`\frac{1}{C}\sum_c |A_c|^p`, shape (B, *spatial), not yet normalised.

    ``f`` is (B, C, *spatial) or (B, D); a vector is read as one channel over D positions.
    """
    f = as_float(f)
    if f.dim() == 2:
        f = f.unsqueeze(1)
    return f.pow(2).mean(1) if p == 2 else f.abs().pow(p).mean(1)


def matched_attention(q_s: Tensor, q_t: Tensor) -> tuple[Tensor, Tensor]:
    """Pool two attention maps to a common size, then flatten and L2-normalise each sample.

    Same rank: each spatial dim is pooled to the smaller of the two. Different rank (a vector
    against a map): both are flattened and the longer is pooled to the shorter length.
    """
    if q_s.dim() == q_t.dim():
        size = tuple(min(a, b) for a, b in zip(q_s.shape[1:], q_t.shape[1:]))
        q_s, q_t = (resize_to(q.unsqueeze(1), size).squeeze(1) for q in (q_s, q_t))
    else:
        q_s, q_t = q_s.flatten(1), q_t.flatten(1)
        n = min(q_s.shape[1], q_t.shape[1])
        q_s, q_t = (resize_to(q.unsqueeze(1), (n,)).squeeze(1) for q in (q_s, q_t))
    return F.normalize(q_s.flatten(1), dim=1), F.normalize(q_t.flatten(1), dim=1)


@register_knowledge("at", "feature", "Attention transfer: match normalised spatial attention maps over layer pairs")
class AT(Knowledge):
    r"""Attention transfer (activation-based).

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928.

    For each layer pair :math:`j`, with :math:`Q^j = \mathrm{vec}(\frac{1}{C}\sum_c |A^j_c|^p)`:

    .. math::
        L_{at} = \sum_{j} \frac{1}{B\,N_j} \sum_{i=1}^{B}
                 \Big\| \frac{Q^j_{s,i}}{\|Q^j_{s,i}\|_2} - \frac{Q^j_{t,i}}{\|Q^j_{t,i}\|_2} \Big\|_2^2

    with :math:`p = 2` (the paper's choice) and :math:`N_j` the number of positions, i.e. the authors'
    code ``(at(x) - at(y)).pow(2).mean()``. Maps of different spatial size are average-pooled to the
    smaller size first. RepDistiller's default weight is 1000.
    """

    class Params(KnowledgeParams):
        teacher_layers: list[str] | None = Field(None, description="teacher layers (default: all stages)")
        student_layers: list[str] | None = Field(None, description="student layers, paired in order")
        p: float = Field(2.0, gt=0, description="exponent of the attention map")

        @model_validator(mode="after")
        def _same_length(self) -> "AT.Params":
            t, s = self.teacher_layers, self.student_layers
            if t is not None and s is not None and len(t) != len(s):
                raise ValueError(
                    f"teacher_layers ({len(t)}) and student_layers ({len(s)}) must pair up one to one"
                )
            if (t is not None and not t) or (s is not None and not s):
                raise ValueError("teacher_layers / student_layers must not be empty")
            return self

    def __init__(self, teacher_layers: list[str], student_layers: list[str], p: float = 2.0) -> None:
        super().__init__()
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError("attention transfer needs the same non-zero number of teacher and student layers")
        self.teacher_layers, self.student_layers, self.p = list(teacher_layers), list(student_layers), float(p)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = kwargs.get("teacher_layers"), kwargs.get("student_layers")
        if t is None and s is None:
            if not teacher.feature_layers or not student.feature_layers:
                raise ValueError("a model declares no feature layers; name teacher_layers/student_layers")
            n = min(len(teacher.feature_layers), len(student.feature_layers))
            t, s = list(teacher.feature_layers[-n:]), list(student.feature_layers[-n:])
        elif t is None:
            t = list(teacher.feature_layers[-len(s):])
        elif s is None:
            s = list(student.feature_layers[-len(t):])
        return cls(t, s, kwargs.get("p", 2.0))

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        if isinstance(f_s, Tensor):
            f_s, f_t = [f_s], [f_t]
        total = f_s[0].new_zeros((), dtype=torch.float32)
        for a_s, a_t in zip(f_s, f_t):
            q_s, q_t = matched_attention(attention_map(a_s, self.p), attention_map(a_t, self.p))
            total = total + (q_s - q_t).pow(2).mean()
        return total

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(
            [student.features[n] for n in self.student_layers],
            [teacher.features[n] for n in self.teacher_layers],
        )


# -- transformers: attention maps ----------------------------------------------------------------------
def token_mask(a: Tensor) -> Tensor:
    """(B, T) bool: the real (unpadded) tokens of an attention-probability map (B, heads, T, T).

    A padded key gets probability exactly 0 from every head and query (the mask adds the dtype's
    minimum before the softmax), a real key a positive one, so the teacher's own map says which tokens
    are padding; no attention mask has to travel with the taps. Inputs without padding (images) are all real.
    """
    return a.detach().flatten(1, 2).amax(1) > 0


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """TinyBERT's uniform mapping n = g(m) = m·N/M (1-based, floored), so the last student layer learns
    from the last teacher layer; returns the 0-based teacher index of each student layer."""
    return [max(1, m * num_teacher // num_student) - 1 for m in range(1, num_student + 1)]


@register_knowledge("attn", "feature", "TinyBERT attention distillation: MSE between attention maps of mapped layers")
class AttentionDistill(Knowledge):
    r"""TinyBERT's attention-based distillation.

    Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
    Understanding", Findings of EMNLP 2020, arXiv:1909.10351.

    Student layer :math:`m` (of :math:`M`) learns from teacher layer :math:`n = g(m) = m \cdot N / M`
    (floored; the last student layer learns from the last teacher layer). For each pair, with
    :math:`A_i \in \mathbb{R}^{T \times T}` the attention map of head :math:`i` of :math:`h`:

    .. math::
        L_{attn} = \sum_{(m, n)} \frac{1}{h} \sum_{i=1}^{h} \mathrm{MSE}\big(A^S_{m,i}, A^T_{n,i}\big)

    where MSE averages over batch and map entries. Differences to the paper, and why:

    * :math:`A` are attention *probabilities* (after the softmax), not TinyBERT's pre-softmax scores:
      Hugging Face models return probabilities, and scores carry an arbitrary per-row offset (and the
      -10000 padding mask) that the softmax removes. The probabilities are taken before attention
      dropout (see ``kdray.models.hf``).
    * Padding: padded key columns are 0 in both maps; padded query rows (which still attend to the
      real tokens) are left out of the mean, so the loss averages over each sample's real
      :math:`T_b \times T_b` block (the tokens are read off the teacher's map: a padded key has
      probability 0 everywhere). Without padding this is exactly the plain MSE of the paper.
    * Different head counts (the paper's students keep 12 heads): the head-averaged maps are compared.

    Sequence lengths must match (same tokens for both models).
    """

    class Params(KnowledgeParams):
        teacher_layers: list[str] | None = Field(
            None, description="teacher attention taps (default: g(m) = m·N/M of the model's attention layers)")
        student_layers: list[str] | None = Field(
            None, description="student attention taps, paired in order (default: all of them)")

        @model_validator(mode="after")
        def _same_length(self) -> "AttentionDistill.Params":
            t, s = self.teacher_layers, self.student_layers
            if t is not None and s is not None and len(t) != len(s):
                raise ValueError(f"teacher_layers ({len(t)}) and student_layers ({len(s)}) must pair up one to one")
            if (t is not None and not t) or (s is not None and not s):
                raise ValueError("teacher_layers / student_layers must not be empty")
            return self

    def __init__(self, teacher_layers: list[str], student_layers: list[str]) -> None:
        super().__init__()
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError("attention distillation needs the same non-zero number of teacher and student layers")
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = kwargs.get("teacher_layers"), kwargs.get("student_layers")

        def layers(layout: ModelLayout, who: str) -> tuple[str, ...]:
            if not layout.attention_layers:
                raise ValueError(f"the {who} declares no attention layers (Hugging Face transformers do); "
                                 f"name {who}_layers explicitly")
            return layout.attention_layers

        if s is None:
            s = list(layers(student, "student")) if t is None else [
                layers(student, "student")[i] for i in uniform_layer_map(len(t), len(layers(student, "student")))]
        if t is None:
            t_all = layers(teacher, "teacher")
            t = [t_all[i] for i in uniform_layer_map(len(s), len(t_all))]
        return cls(t, s)

    def forward(self, a_s: list[Tensor] | Tensor, a_t: list[Tensor] | Tensor) -> Tensor:
        if isinstance(a_s, Tensor):
            a_s, a_t = [a_s], [a_t]
        total = a_s[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(a_s, a_t):
            s, t = as_float(s), as_float(t)
            if s.dim() != 4 or t.dim() != 4 or s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
                raise ValueError(f"attention maps must be (B, heads, T, T) of one length, got {tuple(s.shape)} "
                                 f"and {tuple(t.shape)}")
            real = token_mask(t)
            if s.shape[1] != t.shape[1]:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            block = (real.unsqueeze(2) & real.unsqueeze(1)).unsqueeze(1).to(s.dtype)  # (B, 1, T, T)
            total = total + ((s - t).pow(2) * block).sum() / (block.sum() * s.shape[1]).clamp_min(1)
        return total

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(
            [student.features[n] for n in self.student_layers],
            [teacher.features[n] for n in self.teacher_layers],
        )
