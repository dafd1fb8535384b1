"""Knowledge from transformers' self-attention: TinyBERT's attention maps (``attn``) and MiniLM's attention and
value relations (``minilm``), over uniformly mapped or last layers, with padding read off the teacher's maps."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.knowledge.base import (
    Knowledge,
    KnowledgeParams,
    LayerPairsParams,
    ModelLayout,
    TapOutputs,
    as_float,
    register_knowledge,
)


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

    Reference: github.com/huawei-noah/Pretrained-Language-Model ``TinyBERT/task_distill.py`` (the attention
    term of its intermediate-layer distillation: MSE of the mapped layers' attention scores, padding set to 0).
    Deliberate differences: the three listed above.
    """

    class Params(LayerPairsParams):
        teacher_layers: list[str] | None = Field(
            None, description="teacher attention taps (default: g(m) = m·N/M of the model's attention layers)")
        student_layers: list[str] | None = Field(
            None, description="student attention taps, paired in order (default: all of them)")

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
        """(B, heads, T, T) student and teacher attention maps (or lists, one per layer pair) -> scalar."""
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
    the distilled models only); this follows the paper's Eqs. 4-6. Deliberate differences: the relation heads of
    MiniLMv2 for
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
        """(B, heads, T, T) attention maps, (B, T, H_s) and (B, T, H_t) value taps -> scalar."""
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
