"""The divergences between a teacher's and a student's next-token distributions that the LLM distillation papers
compare, on plain tensors, per token; and the teacher's distribution when only its top-k tokens are known.

Notation: P is the teacher's distribution, Q the student's, both at temperature T; every function takes log-
probabilities ``lp`` (teacher) and ``lq`` (student) and returns each vocabulary entry's contribution, so a token's
divergence is the sum over the last dimension. Contributions are computed in the dtype given (float32 or float64);
a teacher probability of exactly 0 (``lp = -inf``) contributes nothing where the formula's limit is 0.

=============  ==========================================================  =========================================
``fkl``        KL(P ‖ Q) = Σ P (log P − log Q)                              forward KL (mean-seeking)
``rkl``        KL(Q ‖ P) = Σ Q (log Q − log P)                              reverse KL (mode-seeking; MiniLLM)
``jsd``        β·KL(P ‖ M) + (1−β)·KL(Q ‖ M),  M = β P + (1−β) Q            generalised JSD (GKD); β = 0 is exactly
                                                                           ``fkl``, β = 1 exactly ``rkl``
``skew_fkl``   KL(P ‖ α P + (1−α) Q)                                        DistiLLM's skewed KL
``skew_rkl``   KL(Q ‖ α Q + (1−α) P)                                        DistiLLM's skewed reverse KL
``tvd``        ½ Σ |P − Q|                                                 total variation distance
=============  ==========================================================  =========================================

Where only the teacher's top-k log-probabilities at T = 1 are known (a shared cache), :func:`sparse_teacher` makes
its distribution at any T under a named **tail rule** for the remaining mass r:

* ``uniform``: the other V − k tokens share r equally (each has log-probability log(r / (V − k)) at T = 1, tempered
  like any token); every divergence is defined;
* ``tail``: the other tokens are one outcome, a bucket of mass r, on both sides (the student's bucket is its own
  mass outside the teacher's top-k), tempered as a single outcome (DistillKit's ``SYMMETRIC_UNIFORM``);
* ``renormalize``: the top-k renormalised, the rest 0 (DistillKit's ``ZERO``); ``rkl`` (and ``jsd`` at β = 1) are
  infinite there wherever the student puts mass on a token outside the teacher's top-k, so they are refused.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
# Estimated from the student's own sampled tokens on on-policy batches (kdray.knowledge.token); elsewhere it is rkl.
SAMPLED = "rkl_sampled"
TAIL_RULES = ("uniform", "tail", "renormalize")
_FAR = -1e30  # a stand-in for log 0 inside products with 0 (0 · −inf would be NaN)


def needs_full_support(divergence: str, beta: float = 0.5) -> bool:
    """True for the divergences that are infinite where the teacher's probability is 0 and the student's is not:
    they need the teacher's probabilities outside its top-k (a ``renormalize`` tail rule cannot serve them)."""
    return divergence in ("rkl", SAMPLED) or (divergence == "jsd" and beta >= 1.0)


def _plogp_ratio(lp: Tensor, lm: Tensor) -> Tensor:
    """P (log P − log M), 0 where P = 0."""
    safe = lp.clamp_min(_FAR)
    return torch.where(lp > _FAR, safe.exp() * (safe - lm), torch.zeros((), dtype=lp.dtype, device=lp.device))


def contributions(divergence: str, lp: Tensor, lq: Tensor, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """Each vocabulary entry's contribution to ``divergence`` (same shape as the broadcast of ``lp`` and ``lq``)."""
    if divergence == SAMPLED:  # its exact value where the whole teacher distribution is at hand
        divergence = "rkl"
    if divergence == "jsd" and beta <= 0.0:
        divergence = "fkl"
    elif divergence == "jsd" and beta >= 1.0:
        divergence = "rkl"
    if divergence == "fkl":
        return _plogp_ratio(lp, lq)
    if divergence == "rkl":
        return lq.exp() * (lq - lp)
    if divergence == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs()
    if divergence == "jsd":
        lm = torch.logaddexp(lp.clamp_min(_FAR) + math.log(beta), lq + math.log1p(-beta))
        return beta * _plogp_ratio(lp, lm) + (1.0 - beta) * lq.exp() * (lq - lm)
    if divergence == "skew_fkl":
        lm = torch.logaddexp(lp.clamp_min(_FAR) + math.log(alpha), lq + math.log1p(-alpha))
        return _plogp_ratio(lp, lm)
    if divergence == "skew_rkl":
        lm = torch.logaddexp(lq + math.log(alpha), lp.clamp_min(_FAR) + math.log1p(-alpha))
        return lq.exp() * (lq - lm)
    raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(DIVERGENCES)}")


class SparseTeacher(NamedTuple):
    """A teacher's distribution at temperature T over n tokens from its top-k: ``lp`` (n, k) the top tokens'
    log-probabilities, ``index`` (n, k) their ids, and ``rest`` (n,): the log-probability of *each* other token
    (``uniform``; −inf with ``renormalize``) or of the one bucket of all others (``tail``)."""

    lp: Tensor
    index: Tensor
    rest: Tensor
    rule: str
    vocab: int


def sparse_teacher(logp: Tensor, index: Tensor, rest_logp: Tensor, vocab: int, temperature: float,
                   rule: str) -> SparseTeacher:
    """The teacher's distribution at ``temperature`` from its top-k at T = 1: ``logp`` (n, k) log-probabilities,
    ``index`` (n, k), ``rest_logp`` (n,) the log of the remaining mass r (−inf when none remains)."""
    if rule not in TAIL_RULES:
        raise ValueError(f"unknown tail rule {rule!r}; known: {', '.join(TAIL_RULES)}")
    t = float(temperature)
    k = logp.shape[-1]
    others = vocab - k
    a = logp / t
    if rule == "renormalize" or others <= 0:
        return SparseTeacher(torch.log_softmax(a, dim=-1), index, torch.full_like(rest_logp, -math.inf),
                             "renormalize" if others > 0 else "uniform", vocab)
    if rule == "uniform":  # each other token: log(r / (V - k)) at T = 1, tempered like the others
        each = (rest_logp - math.log(others)) / t
        z = torch.logaddexp(torch.logsumexp(a, dim=-1), each + math.log(others))
        return SparseTeacher(a - z[..., None], index, each - z, rule, vocab)
    bucket = rest_logp / t  # tail: one outcome of mass r (DistillKit tempers it as a single category)
    z = torch.logaddexp(torch.logsumexp(a, dim=-1), bucket)
    return SparseTeacher(a - z[..., None], index, bucket - z, rule, vocab)


def sparse_divergence(divergence: str, teacher: SparseTeacher, lq: Tensor, beta: float = 0.5,
                      alpha: float = 0.1) -> Tensor:
    """Per-token divergence (n,) between a sparse teacher and the student's full log-probabilities ``lq`` (n, V).

    The teacher's row is never made dense: with ``uniform`` / ``renormalize`` every other token has the same
    log-probability c, so Σ_v f(p_v, q_v) = Σ_v f(c, q_v) + Σ_top-k [f(p_i, q_i) − f(c, q_i)]; with ``tail`` both
    sides are (k + 1)-outcome distributions, the student's bucket its log-mass outside the teacher's top-k."""
    lq_top = lq.gather(-1, teacher.index)
    if teacher.index.shape[-1] >= teacher.vocab:  # every token is in the top-k: nothing else to account for
        return contributions(divergence, teacher.lp, lq_top, beta, alpha).sum(-1)
    if teacher.rule == "tail":
        outside = lq.scatter(-1, teacher.index, -math.inf)
        lq_bucket = torch.logsumexp(outside, dim=-1, keepdim=True)
        lp_all = torch.cat([teacher.lp, teacher.rest[..., None]], dim=-1)
        lq_all = torch.cat([lq_top, lq_bucket], dim=-1)
        return contributions(divergence, lp_all, lq_all, beta, alpha).sum(-1)
    c = teacher.rest[..., None]
    base = contributions(divergence, c, lq, beta, alpha).sum(-1)
    top = contributions(divergence, teacher.lp, lq_top, beta, alpha) - contributions(divergence, c, lq_top, beta,
                                                                                      alpha)
    return base + top.sum(-1)


def top_k_of(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` of full log-probabilities ``logp`` (..., V): values (sorted, largest first), ids, and the log of
    the remaining mass (exact: a log-sum-exp over the others, not 1 − Σ top-k)."""
    k = min(int(k), logp.shape[-1])
    values, index = logp.topk(k, dim=-1)
    if k == logp.shape[-1]:
        return values, index, torch.full(values.shape[:-1], -math.inf, dtype=logp.dtype, device=logp.device)
    rest = torch.logsumexp(logp.scatter(-1, index, -math.inf), dim=-1)
    return values, index, rest


def truncate(logp: Tensor, index: Tensor, rest_logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A stored top-K (sorted, largest first) cut to its top ``k`` ≤ K: the dropped tokens' mass joins the rest."""
    if k >= logp.shape[-1]:
        return logp, index, rest_logp
    dropped = torch.logsumexp(logp[..., k:], dim=-1)
    return logp[..., :k], index[..., :k], torch.logaddexp(rest_logp, dropped)


__all__ = ["DIVERGENCES", "SAMPLED", "TAIL_RULES", "SparseTeacher", "contributions", "needs_full_support",
           "sparse_divergence", "sparse_teacher", "top_k_of", "truncate"]
