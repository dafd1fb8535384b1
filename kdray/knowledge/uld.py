"""``uld``: the Universal Logit Distillation loss, for a teacher whose tokenizer differs from the student's."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdray.knowledge.base import Knowledge, KnowledgeParams, TapOutputs, as_float, register_knowledge
from kdray.knowledge.token import CHUNK_ELEMENTS, IGNORE, LMHead, TokenStates, _no_autocast


class AlignedTokens(NamedTuple):
    """A teacher's side for ``uld``: its last hidden states (B, T', H) on the rows in its own tokens, its head, and per
    row the position of the logits that predict the first answer token ``start`` (B,) and the answer's length
    ``size`` (B,) (:mod:`kdray.data.retokenize`)."""

    hidden: Tensor
    head: LMHead
    start: Tensor
    size: Tensor


class ULDParams(KnowledgeParams):
    student_temperature: float = Field(1.0, gt=0, description="the student's probabilities at softmax(z/T)")
    teacher_temperature: float = Field(1.0, gt=0, description="the teacher's probabilities at softmax(z/T)")


def target_spans(target: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) targets -> each row's first target position (0 when none) and its number of targets."""
    valid = target != IGNORE
    size = valid.sum(1)
    start = torch.where(size > 0, valid.int().argmax(1), torch.zeros_like(size))
    return start, size


def _aligned(hidden: Tensor, start: Tensor, n: Tensor, length: int) -> Tensor:
    """(B, T, H) -> (B, length, H): each row's states from ``start``, clamped past its end (masked later)."""
    pos = (start[:, None] + torch.arange(length, device=hidden.device)[None, :]).clamp(max=hidden.shape[1] - 1)
    return hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))


@register_knowledge("uld", "cross_token",
                    "Universal Logit Distillation: L1 between sorted next-token probabilities over the aligned "
                    "answer tokens; teachers of another tokenizer")
class ULD(Knowledge):
    r"""Universal Logit Distillation.

    Boizard, El Haddad, Hudelot & Colombo, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
    Loss for LLMs", arXiv 2024, arXiv:2402.12030.

    Student and teacher need not share a tokenizer: per row, the answer's i-th token of each model is aligned (from
    the first answer token on, as far as the shorter answer reaches), and the two next-token distributions are
    compared through their sorted probabilities, which needs no mapping between vocabularies. With
    :math:`q = \mathrm{sort}_\downarrow \mathrm{softmax}(z_s/T_s)` and :math:`p = \mathrm{sort}_\downarrow
    \mathrm{softmax}(z_t/T_t)`, the smaller vocabulary padded with zeros, and :math:`n_b` the shorter answer of row b:

    .. math::
        L_{uld} = \frac{1}{B'} \sum_b \frac{1}{n_b} \sum_{i < n_b} \sum_v |q_{b,i,v} - p_{b,i,v}|

    over the B' rows with an answer. The run adds the next-token cross-entropy with ``ce_weight``. On a classifier's
    logits each sample is one token (what the generic loss tests read; ``kdray check`` offers uld for language models
    only, where kd applies to a classifier).

    Reference it matches: the authors' llm-recipes ``models/distillation_model.py`` ``DistillationLoss`` (answer start
    and size from the labels, softmax at separate student and teacher temperatures, sort descending, zero-pad the
    vocabulary, L1 summed over the vocabulary, mean over the row's first min(sizes) answer tokens, mean over rows).
    Deliberate differences: a row without answer tokens is left out of the mean (the reference divides by zero
    there); ``skip_student_eos`` / ``skip_teacher_eos`` are not offered (the end token is part of the answer, as the
    reference's default); the teacher's rows are the data's re-read in its tokens by kdray
    (:mod:`kdray.data.retokenize`), the reference's data sets tokenise each model's copy themselves; computed a chunk
    of rows at a time, each chunk recomputed in the backward, so a large vocabulary's sorted copies are not kept.
    """

    Params = ULDParams
    uses_target = True

    def __init__(self, student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> None:
        super().__init__()
        self.student_temperature, self.teacher_temperature = float(student_temperature), float(teacher_temperature)

    def per_row(self, z_s: Tensor, z_t: Tensor, n: Tensor) -> Tensor:
        """(B, L, Vs) student and (B, L, Vt) teacher logits at the aligned answer positions, (B,) aligned lengths ->
        (B,) each row's mean over its first n positions of the L1 between sorted probabilities (0 where n = 0)."""
        q = torch.softmax(as_float(z_s) / self.student_temperature, dim=-1).sort(dim=-1, descending=True).values
        p = torch.softmax(as_float(z_t).to(q.dtype) / self.teacher_temperature, dim=-1)
        p = p.sort(dim=-1, descending=True).values
        gap = q.shape[-1] - p.shape[-1]
        if gap > 0:
            p = F.pad(p, (0, gap))
        elif gap < 0:
            q = F.pad(q, (0, -gap))
        d = (q - p).abs().sum(-1)  # (B, L)
        mask = torch.arange(d.shape[1], device=d.device)[None, :] < n[:, None]
        summed = torch.where(mask, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum(1)
        return summed / n.clamp_min(1).to(summed.dtype)

    def forward(self, z_s: Tensor, z_t: Tensor, n: Tensor) -> Tensor:
        """(B, L, Vs), (B, L, Vt) logits at the aligned answer positions, (B,) aligned lengths -> scalar: the mean
        over the rows with n > 0 of :meth:`per_row`."""
        rows = n > 0
        return self.per_row(z_s, z_t, n)[rows].sum() / rows.sum().clamp_min(1)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        s, t = student.logits, teacher.logits
        if not isinstance(s, TokenStates) and not isinstance(t, (TokenStates, AlignedTokens)):
            n = torch.ones(s.shape[0], dtype=torch.long, device=s.device)  # a classifier: each sample one token
            return self(s[:, None], t[:, None], n)
        s_start, s_size = target_spans(target)
        if isinstance(t, TokenStates):  # a teacher of the data's own tokens: each answer at the same positions
            t = AlignedTokens(t.hidden, t.head, s_start, s_size)
        if not isinstance(s, TokenStates) or not isinstance(t, AlignedTokens):
            raise ValueError("uld compares a causal LM student with a causal LM teacher's aligned answer tokens")
        n = torch.minimum(s_size, t.size.to(s_size.device))
        length = max(1, int(n.max()))
        t_start = t.start.to(s_start.device)
        vocab = max(s.head.vocab, t.head.vocab)
        per = max(1, CHUNK_ELEMENTS // (length * vocab))  # rows per chunk
        total = None
        with _no_autocast():  # the states may come from an autocast forward; the heads and the loss run in float32
            for a in range(0, target.shape[0], per):
                rows = slice(a, a + per)
                args = (s.hidden[rows], t.hidden[rows], s_start[rows], t_start[rows], n[rows], length, s.head, t.head)
                part = checkpoint(self._chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else \
                    self._chunk(*args)
                total = part if total is None else total + part
        return total / (n > 0).sum().clamp_min(1)

    def _chunk(self, hs: Tensor, ht: Tensor, s_start: Tensor, t_start: Tensor, n: Tensor, length: int,
               s_head: LMHead, t_head: LMHead) -> Tensor:
        """A chunk of rows: the sum of their :meth:`per_row` values."""
        z_s = _head_logits(s_head, _aligned(hs, s_start, n, length))
        with torch.no_grad():
            z_t = _head_logits(t_head, _aligned(ht, t_start, n, length))
        return self.per_row(z_s, z_t, n).sum()


def _head_logits(head: LMHead, h: Tensor) -> Tensor:
    """Logits in float32 outside autocast (the states may be bf16 from an autocast forward)."""
    weight = head.weight.float()
    bias = None if head.bias is None else head.bias.float()
    return LMHead(weight, bias, head.scale, head.softcap).logits(as_float(h))


__all__ = ["AlignedTokens", "ULD", "target_spans"]
