"""A language-model teacher's outputs on the training blocks, once per sweep: per token its top-k log-probabilities at
T = 1 in float16, their ids (16-bit when the vocabulary has at most 65 536 tokens) and the log of the remaining mass
in float32; every token's log-probability (no ids) when k covers the vocabulary.

Trials read a token's row by (block, position) and never expand it to the vocabulary: the token losses re-temper it
and apply the run's tail rule at read time (:mod:`kdray.knowledge.divergences`). A trial that asks for fewer tokens
than stored (``cache.top_k``) cuts its rows at read time (the dropped tokens' mass joins the rest); one that asks for
more runs its teacher live. What top-k costs is measured while the cache is built: the mean KL(teacher_T ‖ top-k_T)
per k and T on the first :data:`TRUNCATION_TOKENS` training tokens.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kdray.data import Batches, DataBundle
from kdray.knowledge.divergences import contributions, sparse_teacher, top_k_of
from kdray.knowledge.token import chunk_tokens

TRUNCATION_TOKENS = 16384
TRUNCATION_TEMPERATURES = (1.0, 2.0, 4.0)


def index_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= 65536 else np.int32)


def bytes_per_token(vocab: int, k: int) -> int:
    """float16 log-probabilities, ids and a float32 rest; float16 log-probabilities alone when exact."""
    return 2 * vocab if k >= vocab else k * (2 + index_dtype(vocab).itemsize) + 4


def plan_tokens(n_tokens: int, vocab: int, want_k: int | None, feature_bytes: int, max_bytes: int
                ) -> tuple[int | None, bool, str]:
    """(k to store or None: no cache, whether feature maps fit too, note). ``want_k`` None: every token (exact)."""
    k = vocab if want_k is None else min(int(want_k), vocab)
    logits = n_tokens * bytes_per_token(vocab, k)
    what = f"{'all ' + str(vocab) if k >= vocab else f'top-{k} of {vocab}'} tokens"
    if logits > max_bytes:
        hint = "; set cache.top_k (e.g. 64) to share the teacher's top tokens" if k >= vocab else ""
        return None, False, (f"{what} per position take {logits / 2**20:.0f} MiB, over cache.max_bytes "
                             f"({max_bytes / 2**20:.0f} MiB){hint}")
    with_features = feature_bytes > 0 and logits + feature_bytes <= max_bytes
    note = f"{what} per position, {bytes_per_token(vocab, k)} bytes per token, {logits / 2**20:.1f} MiB"
    if feature_bytes and not with_features:
        note += "; feature maps not cached (over the budget): feature knowledge runs the teacher live"
    return k, with_features, note


@torch.no_grad()
def build_token_cache(records: list[dict[str, Any]], data: DataBundle, layers: list[str], max_bytes: int,
                      device: torch.device, want_k: int | None, tail: str = "uniform",
                      truncation_ks: tuple[int, ...] = (), batch_size: int = 16) -> Any:
    """One pass of the teacher over the training blocks; ``None`` when nothing fits ``max_bytes``."""
    from kdray.cache.fixed import TeacherCache
    from kdray.cache.keys import cache_key
    from kdray.models import Teacher

    teacher = Teacher.from_records(records).to(device)
    split = data.train
    n, t = split.x.shape
    vocab = int(data.info.num_classes)
    teacher.tap(layers)
    probe = teacher(split.x[:2].to(device))
    vocab = probe.logits.head.vocab
    shapes = {name: tuple(v.shape[1:]) for name, v in probe.features.items()}
    feature_bytes = sum(n * math.prod(s) * 2 for s in shapes.values())
    k, with_features, note = plan_tokens(n * t, vocab, want_k, feature_bytes, max_bytes)
    if k is None:
        return None, note
    keep = list(shapes) if with_features else []
    teacher.tap(keep)
    exact = k >= vocab
    logp = np.empty((n, t, k), np.float16)
    index = None if exact else np.empty((n, t, k), index_dtype(vocab))
    rest = None if exact else np.empty((n, t), np.float32)
    feats = {name: np.empty((n, *shapes[name]), np.float16) for name in keep}
    ks = sorted({int(q) for q in truncation_ks if q and q < vocab} | ({k} if not exact else set()))
    trunc = {(q, temp): [0.0, 0] for q in ks for temp in TRUNCATION_TEMPERATURES}
    size = chunk_tokens(vocab)
    for idx, x, _ in Batches(split, batch_size, train=False, device=device):
        out = teacher(x)
        i = idx.cpu().numpy()
        h = out.logits.hidden.reshape(-1, out.logits.hidden.shape[-1])
        lp_rows, id_rows, rest_rows = [], [], []
        for a in range(0, h.shape[0], size):
            lp = torch.log_softmax(out.logits.head.logits(h[a:a + size]), dim=-1)
            if exact:  # every token, in vocabulary order (no ids stored)
                lp_rows.append(lp.clamp_min(-6e4).half())
            else:  # the top k, largest first, their ids and the log of the rest
                vals, ids, r = top_k_of(lp, k)
                lp_rows.append(vals.clamp_min(-6e4).half())
                id_rows.append(ids)
                rest_rows.append(r)
            _truncation(trunc, lp, tail, vocab)
        logp[i] = torch.cat(lp_rows).reshape(len(i), t, k).cpu().numpy()
        if not exact:
            index[i] = torch.cat(id_rows).reshape(len(i), t, k).cpu().numpy().astype(index.dtype)
            rest[i] = torch.cat(rest_rows).reshape(len(i), t).float().cpu().numpy()
        for name in keep:
            feats[name][i] = out.features[name].float().clamp(-65504, 65504).half().cpu().numpy()
    teacher.tap([])
    tokens = {"logp": logp, **({"index": index, "rest": rest} if not exact else {})}
    stats = {"bytes_per_token": float(bytes_per_token(vocab, k)), "top_k": float(k)}
    stats.update({f"truncation_kl.k{q}.T{temp:g}": s / max(c, 1) for (q, temp), (s, c) in trunc.items()})
    cache = TeacherCache(cache_key(records, data), None, feats, "float16", note, tokens=tokens, vocab=vocab,
                         stats=stats)
    return cache, note


def _truncation(acc: dict, lp: torch.Tensor, tail: str, vocab: int) -> None:
    """Add KL(teacher at T ‖ its top-k at T under the tail rule) of these tokens, up to TRUNCATION_TOKENS."""
    for (q, temp), slot in acc.items():
        room = TRUNCATION_TOKENS - slot[1]
        if room <= 0:
            continue
        rows = lp[:room]
        full = torch.log_softmax(rows / temp, dim=-1) if temp != 1.0 else rows
        vals, ids, r = top_k_of(rows, q)
        approx = sparse_teacher(vals, ids, r, vocab, temp, tail)
        if tail == "tail":  # the bucket distribution: KL of the full teacher coarse-grained to k + 1 outcomes
            outside = full.scatter(-1, ids, -math.inf)
            coarse = torch.cat([full.gather(-1, ids), torch.logsumexp(outside, -1, keepdim=True)], -1)
            kl = contributions("fkl", coarse, torch.cat([approx.lp, approx.rest[:, None]], -1)).sum(-1)
        else:
            kl = _kl_full_vs_sparse(full, approx, tail)
        slot[0] += float(kl.double().sum())
        slot[1] += rows.shape[0]


def _kl_full_vs_sparse(full: torch.Tensor, approx: Any, tail: str) -> torch.Tensor:
    """KL(full ‖ sparse) per token, p̂ the top-k and the rule's value elsewhere; with ``renormalize`` (p̂ = 0 outside
    the top-k, where that KL is infinite) KL(sparse ‖ full) = −log(the top-k's mass)."""
    dense = approx.rest[:, None].expand_as(full).clone().scatter(-1, approx.index, approx.lp)
    if tail == "renormalize":
        return contributions("fkl", dense, full).sum(-1)
    return contributions("fkl", full, dense).sum(-1)


__all__ = ["TRUNCATION_TEMPERATURES", "TRUNCATION_TOKENS", "build_token_cache", "bytes_per_token", "index_dtype",
           "plan_tokens"]
