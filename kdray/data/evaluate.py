"""A model's accuracy and loss on a split: what training validates on, the champion is tested on, ``final`` reports.

``session`` is anything with ``rank``, ``world_size`` and ``all_reduce_sum`` (the training loop's session): the sums
are taken over every rank exactly once, so each rank's shard counts once.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdray.data.base import Split
from kdray.data.loaders import Batches
from kdray.knowledge.token import IGNORE, chunk_tokens


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, device: torch.device, session: Any = None,
    channels_last: bool = False, amp: torch.dtype | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split``, summed over all ranks exactly once."""
    rank, world = (session.rank, session.world_size) if session else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, count, loss
    for _, x, y in Batches(split, batch_size, train=False, rank=rank, world=world, device=device):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(x)
        logits = logits.float()
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += y.numel()
        sums[2] += F.cross_entropy(logits, y, reduction="sum")
    if session is not None:
        session.all_reduce_sum(sums)
    model.train(was_training)
    correct, count, loss = sums.tolist()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": count}


LM_SUMS = ("nll", "correct", "count", "kl_teacher", "rkl_teacher", "agree", "kl_true", "exact", "rows")


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, split: Split, batch_size: int, device: torch.device, session: Any = None,
    amp: torch.dtype | None = None, teacher: nn.Module | None = None, chunk: int | None = None,
    lockstep: bool = False,
) -> dict[str, float]:
    """A causal LM on a split of blocks, per target token, a chunk of tokens at a time (never B × T × V logits):
    ``accuracy`` (top-1 next token), ``loss`` = ``nll`` (nats), ``ppl``; with a ``teacher`` (a frozen
    :class:`~kdray.models.Teacher`), ``kl_teacher`` = KL(teacher ‖ student) and ``rkl_teacher`` = KL(student ‖
    teacher) at T = 1 and ``top1_agree``; where the split carries the true next-token log-probabilities
    (``synthetic_lm``), ``kl_true`` = KL(truth ‖ student); on rows of prompt + answer (``split.prompt_len``,
    ``lm_tasks``), ``exact_match``: the fraction of rows whose greedy completion of the prompt is the answer and its
    end token, exactly. Sums over every rank exactly once. ``lockstep``: every rank runs the model as many times as the
    rank with the most validation batches (a sharded model's forward is collective), the extra passes discarded."""
    rank, world = (session.rank, session.world_size) if session else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(LM_SUMS), dtype=torch.float64, device=device)
    true = split.aux.get("true_logp")
    prompt = split.prompt_len
    batches = Batches(split, batch_size, train=False, rank=rank, world=world, device=device)
    pad = max(len(Batches(split, batch_size, train=False, rank=r, world=world)) for r in range(world)) - len(batches) \
        if lockstep else 0
    for idx, x, y in batches:
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            s = model.states(x)
            t = teacher(x).logits if teacher is not None else None
        h, yy = s.hidden.reshape(-1, s.hidden.shape[-1]), y.reshape(-1)
        th = t.hidden.reshape(-1, t.hidden.shape[-1]) if t is not None else None
        tl = true[idx.to(true.device)].reshape(-1, true.shape[-1]) if true is not None else None
        size = chunk_tokens(s.head.vocab, chunk, device)
        for a in range(0, len(yy), size):
            rows = slice(a, a + size)
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                z = s.head.logits(h[rows])
                zt = t.head.logits(th[rows]) if t is not None else None
            target, valid = yy[rows], yy[rows] != IGNORE
            lq = torch.log_softmax(z, dim=-1)
            pick = lambda v: v[valid].double().sum()  # noqa: E731
            sums[0] += pick(-lq.gather(-1, target.clamp_min(0)[:, None]).squeeze(-1))
            top = z.argmax(-1)
            sums[1] += ((top == target) & valid).sum()
            sums[2] += valid.sum()
            if zt is not None:
                lp = torch.log_softmax(zt, dim=-1)
                sums[3] += pick((lp.exp() * (lp - lq)).sum(-1))
                sums[4] += pick((lq.exp() * (lq - lp)).sum(-1))
                sums[5] += pick((top == zt.argmax(-1)).to(lq.dtype))
            if tl is not None:
                lt = tl[rows].to(device=device, dtype=lq.dtype)
                sums[6] += pick((lt.exp() * (lt - lq)).sum(-1))
        if prompt:
            sums[7] += exact_matches(model, x, y, prompt, amp)
            sums[8] += x.shape[0]
    if pad:  # the same passes on the split's first batch, measuring nothing
        _, x, y = next(iter(Batches(split, batch_size, train=False, device=device)))
    for _ in range(pad):
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            model.states(x)
        if prompt:
            exact_matches(model, x, y, prompt, amp)
    if session is not None:
        session.all_reduce_sum(sums)
    model.train(was_training)
    v = dict(zip(LM_SUMS, sums.tolist()))
    n = max(v["count"], 1.0)
    out = {"accuracy": v["correct"] / n, "loss": v["nll"] / n, "nll": v["nll"] / n,
           "ppl": math.exp(min(v["nll"] / n, 700.0)), "count": v["count"]}
    if teacher is not None:
        out.update(kl_teacher=v["kl_teacher"] / n, rkl_teacher=v["rkl_teacher"] / n, top1_agree=v["agree"] / n)
    if true is not None:
        out["kl_true"] = v["kl_true"] / n
    if prompt:
        out["exact_match"] = v["exact"] / max(v["rows"], 1.0)
    return out


def exact_matches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prompt_len: int,
                  amp: torch.dtype | None = None) -> torch.Tensor:
    """How many rows of (B, T) inputs ``x`` / targets ``y`` the model completes exactly from their first
    ``prompt_len`` tokens, greedily: every target of the answer (``y[:, prompt_len - 1:]``, -100 after its end) is
    the token generated at its position (a device tensor: no host sync)."""
    from kdray.models.generate import complete

    target = y[:, prompt_len - 1:]
    device = x.device
    with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
        tokens, _ = complete(model, x[:, :prompt_len], target.shape[1])
    return ((tokens == target) | (target == IGNORE)).all(1).sum()


def evaluate_model(model: nn.Module, split: Split, batch_size: int, device: torch.device, **kwargs: Any
                   ) -> dict[str, float]:
    """:func:`evaluate` for classifiers, :func:`evaluate_lm` for causal LMs (``model.causal_lm``); ``kwargs`` the
    ones the chosen function takes."""
    if getattr(model, "causal_lm", False):
        return evaluate_lm(model, split, batch_size, device, **{k: v for k, v in kwargs.items()
                                                                 if k in ("session", "amp", "teacher", "chunk")})
    return evaluate(model, split, batch_size, device, **{k: v for k, v in kwargs.items()
                                                         if k in ("session", "channels_last", "amp")})
