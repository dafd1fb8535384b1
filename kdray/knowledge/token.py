"""Token-level knowledge for language models: ``tkd``, and the chunked loss that never builds batch × sequence ×
vocabulary.

A causal LM's distillation forward returns :class:`TokenStates`: its last hidden states (B, T, H) and its output
head (:class:`LMHead`: weight, bias, and the logit scaling or soft-capping its family applies). The cross-entropy on
the next tokens and every token-level term are then computed together, a chunk of tokens at a time
(:func:`token_sums`): each chunk's student logits (and a live teacher's) are made from the hidden states, reduced to
per-token sums and dropped; in training each chunk is checkpointed, so its backward recomputes the logits instead of
keeping them. Peak memory is O(chunk × V), not O(B × T × V).

A teacher's side is either live (:class:`TokenStates`, its logits made per chunk under ``no_grad``) or read from a
shared cache as its top-k log-probabilities at T = 1 (:class:`TopKTokens`), re-tempered at read time with a named
rule for the remaining mass (:mod:`kdray.knowledge.divergences`). A run may also cut a live teacher to its top-k
(``cache.top_k``), so a trial learns the same distribution whether its teacher is cached or live.

Every sum is over the target tokens only (targets of -100 are ignored): the objective divides by the number of
target tokens over all ranks and accumulation steps (:class:`~kdray.knowledge.objective.DistillObjective`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdray.knowledge.base import Knowledge, KnowledgeParams, TapOutputs, active_autocast, as_float, register_knowledge
from kdray.knowledge.divergences import (
    DIVERGENCES,
    SAMPLED,
    TAIL_RULES,
    contributions,
    sparse_divergence,
    sparse_teacher,
    top_k_of,
    truncate,
)

IGNORE = -100  # a target that is not trained on (a prompt token, padding)
# Logits per chunk, as many tokens as V allows: 4 Mi floats (16 MiB in float32) on a CPU, 32 Mi (128 MiB) on a GPU,
# where a chunk's fixed cost (its kernel launches) is worth more tokens.
CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_CUDA = 1 << 25


@dataclass
class LMHead:
    """A causal LM's output head: logits = scale · (h Wᵀ + b), then ``softcap`` · tanh(logits / ``softcap``) where the
    family soft-caps (Gemma 2). The matmul runs in the caller's autocast precision (as the model's own head would);
    what follows runs in float32."""

    weight: Tensor  # (V, H)
    bias: Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, h: Tensor) -> Tensor:
        """(n, H) hidden states -> (n, V) logits in float32 (float64 stays float64)."""
        z = as_float(F.linear(h, self.weight, self.bias))
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


class TokenStates(NamedTuple):
    """What a causal LM's distillation forward returns in ``TapOutputs.logits``: last hidden states (B, T, H) and the
    head that turns them into logits."""

    hidden: Tensor
    head: LMHead


class TopKTokens(NamedTuple):
    """A teacher's next-token distributions as cached: per token its top-k log-probabilities at T = 1 ``logp``
    (B, T, k, largest first), their ids ``index`` (B, T, k) and the log of the remaining mass ``rest`` (B, T)."""

    logp: Tensor
    index: Tensor
    rest: Tensor
    vocab: int


def chunk_tokens(vocab: int, requested: int | None = None, device: torch.device | None = None) -> int:
    """Tokens per chunk: ``requested``, else as many as fit :data:`CHUNK_ELEMENTS` (a GPU's:
    :data:`CHUNK_ELEMENTS_CUDA`) logits, at least 16."""
    if requested:
        return int(requested)
    elements = CHUNK_ELEMENTS_CUDA if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    return max(16, elements // max(1, int(vocab)))


def _cast_once(head: LMHead, device: torch.device) -> LMHead:
    """The head with its weight cast to the active autocast dtype once for the whole batch: autocast would cast the
    V x H weight again in every chunk and every recomputation (its cast cache lives only inside one autocast region);
    the cast is differentiable, so gradients reach the float32 weight as before."""
    if not torch.is_autocast_enabled(device.type):
        return head
    dtype = torch.get_autocast_dtype(device.type)
    if head.weight.dtype == dtype:
        return head
    return LMHead(head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype), head.scale, head.softcap)


@contextlib.contextmanager
def _no_autocast():
    on = active_autocast()
    with contextlib.ExitStack() as stack:
        for device in on:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


class TeacherView(NamedTuple):
    """How the token terms see the teacher: its top-k (``top_k``, None for every token) and the tail rule."""

    top_k: int | None = None
    tail: str = "uniform"


def _teacher_chunk(teacher: TokenStates | TopKTokens, rows: slice, view: TeacherView) -> Any:
    """The teacher's side of one chunk at T = 1: dense log-probabilities (n, V), or (logp, index, rest) when sparse."""
    if isinstance(teacher, TopKTokens):
        lp, idx, rest = (as_float(teacher.logp.reshape(-1, teacher.logp.shape[-1])[rows]),
                         teacher.index.reshape(-1, teacher.index.shape[-1])[rows].long(),
                         as_float(teacher.rest.reshape(-1)[rows]))
        if view.top_k and view.top_k < lp.shape[-1]:
            # every token stored (in vocabulary order): its top-k; a stored top-K (sorted): its first k
            lp, idx, rest = top_k_of(lp, view.top_k) if lp.shape[-1] >= teacher.vocab else truncate(
                lp, idx, rest, view.top_k)
        return lp, idx, rest
    with torch.no_grad():
        h = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])[rows]
        z = teacher.head.logits(h)
        with _no_autocast():
            lp = torch.log_softmax(z, dim=-1)
            if view.top_k and view.top_k < lp.shape[-1]:
                return top_k_of(lp, view.top_k)
            return lp


def _divergence_sum(term: "TKD", z: Tensor, lq1: Tensor, t_chunk: Any, vocab: int, view: TeacherView,
                    valid: Tensor, y: Tensor, sampled: bool) -> Tensor:
    """T² · Σ over the chunk's target tokens of the term's divergence."""
    t = term.temperature
    lq = lq1 if t == 1.0 else torch.log_softmax(z / t, dim=-1)
    if sampled and term.divergence == SAMPLED:
        if isinstance(t_chunk, tuple):
            raise ValueError("rkl_sampled on the student's own tokens needs the live teacher's log-probabilities")
        lp = t_chunk if t == 1.0 else torch.log_softmax(_retemper(t_chunk, t), dim=-1)
        per_token = sampled_reverse_kl(lq, lp, y.clamp_min(0))
    elif isinstance(t_chunk, tuple):
        teacher = sparse_teacher(*t_chunk, vocab=vocab, temperature=t, rule=view.tail)
        per_token = sparse_divergence(term.divergence, teacher, lq, term.beta, term.alpha)
    else:
        lp = t_chunk if t == 1.0 else torch.log_softmax(_retemper(t_chunk, t), dim=-1)
        per_token = contributions(term.divergence, lp, lq, term.beta, term.alpha).sum(-1)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return (t * t) * torch.where(valid, per_token, zero).sum()


def sampled_reverse_kl(lq: Tensor, lp: Tensor, tokens: Tensor) -> Tensor:
    """(n, V) student and teacher log-probabilities and (n,) the tokens the student sampled -> (n,) per token:
    the value k = log q(y) − log p(y), a one-sample estimate of KL(Q ‖ P), with the gradient k·∇log q(y) (the
    policy gradient of the reverse KL whose per-token advantage is −k; no credit to later tokens)."""
    lq_y = lq.gather(-1, tokens[:, None]).squeeze(-1)
    k = (lq_y - lp.gather(-1, tokens[:, None]).squeeze(-1).to(lq_y.dtype)).detach()
    return k + k * (lq_y - lq_y.detach())


def _retemper(lp: Tensor, t: float) -> Tensor:
    """Log-probabilities at T = 1 -> logits at temperature t (a per-token shift does not matter to the softmax)."""
    return lp.clamp_min(-1e30) / t


def _chunk_sums(h: Tensor, y: Tensor, head: LMHead, teacher: Any, rows: slice, terms: Sequence["TKD"],
                view: TeacherView, vocab: int, sampled: bool = False) -> Tensor:
    """One chunk: [Σ −log q(y), Σ term for each term, correct] over its target tokens (float32). The teacher's side
    of the chunk is made here, so a checkpointed chunk keeps none of it between its forward and its backward."""
    t_chunk = _teacher_chunk(teacher, rows, view) if terms else None
    z = head.logits(h)
    with _no_autocast():
        valid = y != IGNORE
        lq1 = torch.log_softmax(z, dim=-1)
        nll = -lq1.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1)
        zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
        out = [torch.where(valid, nll, zero).sum()]
        for term in terms:
            out.append(_divergence_sum(term, z, lq1, t_chunk, vocab, view, valid, y, sampled))
        with torch.no_grad():
            correct = ((z.argmax(-1) == y) & valid).sum().to(nll.dtype)
        return torch.cat([torch.stack(out), correct[None]])


def token_sums(student: TokenStates, teacher: TokenStates | TopKTokens | None, target: Tensor,
               terms: Sequence["TKD"] = (), view: TeacherView = TeacherView(), chunk: int | None = None,
               sampled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The next-token cross-entropy and every token term, summed over the target tokens of a batch, a chunk at a time.

    ``student.hidden`` (B, T, H) with ``target`` (B, T) (the next token at each position, -100 where not trained);
    ``teacher``: live states or cached top-k (needed when ``terms``). Returns (sums (1 + len(terms),): the summed
    negative log-likelihood, then each term's T²-scaled divergence sum; correct top-1 predictions; target tokens).
    In training (grad enabled, several chunks) each chunk is checkpointed: its backward recomputes its logits.
    ``sampled``: the targets are the student's own samples (an on-policy batch): ``rkl_sampled`` estimates from
    them, from the live teacher's whole distribution (never cut to a top-k)."""
    h = student.hidden.reshape(-1, student.hidden.shape[-1])
    y = target.reshape(-1)
    n, vocab = h.shape[0], student.head.vocab
    if terms and teacher is None:
        raise ValueError("token-level knowledge needs the teacher's outputs")
    if isinstance(teacher, TokenStates) and teacher.head.vocab != vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher.head.vocab}) differs from the student's ({vocab})")
    if sampled and any(t.divergence == SAMPLED for t in terms) and isinstance(teacher, TokenStates):
        view = view._replace(top_k=None)
    student = student._replace(head=_cast_once(student.head, h.device))
    if isinstance(teacher, TokenStates):
        teacher = teacher._replace(head=_cast_once(teacher.head, h.device))
    size = chunk_tokens(vocab, chunk, h.device)
    spans = [slice(a, min(a + size, n)) for a in range(0, n, size)]
    ckpt = torch.is_grad_enabled() and len(spans) > 1
    total = None
    for rows in spans:
        args = (h[rows], y[rows], student.head, teacher, rows, terms, view, vocab, sampled)
        part = checkpoint(_chunk_sums, *args, use_reentrant=False, preserve_rng_state=False) if ckpt else \
            _chunk_sums(*args)
        total = part if total is None else total + part
    count = (y != IGNORE).sum()
    return total[:-1], total[-1].detach(), count


class TKDParams(KnowledgeParams):
    divergence: Literal["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "rkl_sampled"] = Field(
        "fkl", description="fkl KL(P‖Q), rkl KL(Q‖P), jsd (with beta), skew_fkl / skew_rkl (with alpha), tvd, "
                           "rkl_sampled (on-policy batches: log q(y) − log p(y) on the student's sampled tokens, "
                           "by policy gradient; elsewhere rkl)")
    temperature: float = Field(1.0, gt=0, description="T: both distributions at softmax(z/T); the term is scaled by T²")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: the mixture weight of the teacher, M = βP + (1−β)Q; "
                                                     "0 is exactly fkl, 1 exactly rkl")
    alpha: float = Field(0.1, gt=0, lt=1, description="skew_fkl / skew_rkl: the skew α (DistiLLM's default 0.1)")

    @model_validator(mode="after")
    def _known(self) -> "TKDParams":
        if self.divergence not in (*DIVERGENCES, SAMPLED):  # pragma: no cover - the Literal refuses it first
            raise ValueError(f"unknown divergence {self.divergence!r}")
        return self


@register_knowledge("tkd", "token",
                    "token-level divergence of next-token distributions: fkl, rkl, jsd (beta), skew_fkl/skew_rkl, tvd, "
                    "rkl_sampled (on-policy)")
class TKD(Knowledge):
    r"""Token-level knowledge distillation with the divergence as a choice.

    Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes", ICLR 2024, arXiv:2306.13649 (the generalised JSD); the skewed KLs from
    Ko, Kim, Chen & Yun, "DistiLLM", ICML 2024, arXiv:2402.03898; reverse KL as in Gu et al., "MiniLLM", ICLR 2024.

    Per target token, with :math:`P = \mathrm{softmax}(z_t/T)`, :math:`Q = \mathrm{softmax}(z_s/T)` and
    :math:`D` the chosen divergence (:mod:`kdray.knowledge.divergences`):

    .. math::
        L_{tkd} = T^2 \cdot \frac{1}{N} \sum_{\text{target tokens}} D(P, Q)

    with :math:`N` the number of target tokens over every rank and accumulation step (so 2 ranks give the loss and
    gradients of one process on the whole batch). On a classifier each sample is one token: ``fkl`` is Hinton's KD.

    References it matches: TRL ``trl/trainer/gkd_trainer.py`` ``generalized_jsd_loss`` (v0.25; the mixture in
    probability space through log-sum-exp, β = 0 forward and β = 1 reverse KL, masked by labels = -100, divided by
    the number of target tokens); DistiLLM ``distillm/losses.py`` ``skewed_forward_kl`` / ``skewed_reverse_kl``
    (:math:`\mathrm{KL}(P \| \alpha P + (1-\alpha) Q)`, :math:`\mathrm{KL}(Q \| \alpha Q + (1-\alpha) P)`,
    α = 0.1), ``tv_distance``. Deliberate differences:

    * ``fkl`` and ``skew_fkl`` are true KLs; torchtune's ``ForwardKLLoss`` and DistiLLM's ``forward_kl`` /
      ``skewed_forward_kl`` compute the cross-entropy :math:`-\sum P \log(\cdot)`, larger by the teacher's entropy
      :math:`H(P)` (the same gradient).
    * Logits are divided by :math:`T` (TRL's convention) and the term is scaled by :math:`T^2` (Hinton's, and
      DistillKit's), so its gradient does not shrink as :math:`T` grows; TRL, torchtune and DistiLLM do not scale
      (at :math:`T = 1`, the default, there is no difference).
    * As in TRL, ``jsd`` at β = 0 and β = 1 is exactly forward and reverse KL; between them the general formula,
      which tends to 0 at both ends (the loss is not continuous in β at 0 and 1).
    * ``rkl_sampled`` (on-policy batches, ``scheme: on_policy``): per sampled token y the estimate
      :math:`k = \log q(y) - \log p(y)` of KL(Q ‖ P) with the gradient :math:`k \nabla \log q(y)`
      (:func:`sampled_reverse_kl`), as Thinking Machines' on-policy distillation (tinker-cookbook
      ``tinker_cookbook/distillation/train_on_policy.py`` ``incorporate_kl_penalty``: advantage −(sampled log-prob −
      teacher log-prob), ``kl_discount_factor`` 0 by default) and MiniLLM's single-step term. Differences: kdray
      samples from the weights it trains (tinker's importance ratio is 1 here); the logged value is the estimate k,
      not the surrogate; on batches that are not the student's samples it is the exact ``rkl``.
    * Computed a chunk of tokens at a time (:func:`token_sums`), as Liger-Kernel's fused linear losses do
      (``liger_kernel/chunked_loss/fused_linear_distillation.py``); kdray recomputes each chunk in the backward
      (activation checkpointing) where Liger computes the gradients during the forward.
    """

    Params = TKDParams
    uses_target = True

    def __init__(self, divergence: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
                 alpha: float = 0.1) -> None:
        super().__init__()
        if divergence not in (*DIVERGENCES, SAMPLED):
            raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join((*DIVERGENCES, SAMPLED))}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.divergence, self.temperature = divergence, float(temperature)
        self.beta, self.alpha = float(beta), float(alpha)

    def per_token(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        """(N, V) student and teacher logits -> (N,) T²-scaled divergence per token (no mask)."""
        t = self.temperature
        lq = torch.log_softmax(as_float(z_s) / t, dim=-1)
        lp = torch.log_softmax(as_float(z_t).to(lq.dtype) / t, dim=-1)
        return (t * t) * contributions(self.divergence, lp, lq, self.beta, self.alpha).sum(-1)

    def forward(self, z_s: Tensor, z_t: Tensor, mask: Tensor | None = None) -> Tensor:
        """(N, V) student and teacher logits (tokens or samples), optional (N,) bool mask of the tokens trained on
        -> scalar: the mean over those tokens of T²·D(P, Q). The unchunked formula, the reference for the chunks."""
        d = self.per_token(z_s, z_t)
        if mask is None:
            return d.mean()
        return torch.where(mask, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum() / mask.sum().clamp_min(1)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        s, t = student.logits, teacher.logits
        if isinstance(s, TokenStates):  # alone (not through the objective's fused pass): its per-token mean
            sums, _, count = token_sums(s, t, target, [self])
            return sums[1] / count.clamp_min(1)
        return self(s, t)


def naive_token_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, term: TKD | None) -> Tensor:
    """The unchunked computation (what :func:`token_sums` avoids): (B, T, V) logits materialised whole. For tests and
    the memory benchmark: the summed NLL plus the term's summed divergence over the target tokens."""
    z = as_float(student_logits.reshape(-1, student_logits.shape[-1]))
    y = target.reshape(-1)
    valid = y != IGNORE
    nll = F.cross_entropy(z, y, ignore_index=IGNORE, reduction="sum")
    if term is None:
        return nll
    d = term.per_token(z, teacher_logits.reshape(-1, teacher_logits.shape[-1]))
    return nll + torch.where(valid, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum()


__all__ = ["IGNORE", "LMHead", "TAIL_RULES", "TKD", "TeacherView", "TokenStates", "TopKTokens", "chunk_tokens",
           "naive_token_loss", "sampled_reverse_kl", "token_sums"]
