"""What a trial asks for its teacher's outputs: the shared one-pass cache, the per-(epoch, sample) store, or the
live teacher, with the reason in words (:meth:`TeacherOutputs.create`)."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdray.cache.fixed import TeacherCache
from kdray.cache.keys import ViewCacheHandle, cache_key, view_cache_key
from kdray.data import DataBundle
from kdray.data.retokenize import CrossRows, retokenize, tokenizer_of_record
from kdray.knowledge import TapOutputs
from kdray.knowledge.token import TopKTokens
from kdray.knowledge.uld import AlignedTokens
from kdray.models import Teacher
from kdray.models.checkpoint import combine


class TeacherOutputs:
    """What the training loop asks for teacher outputs: from the cache when valid, else live."""

    def __init__(self, teacher: Teacher | None, cache: TeacherCache | None, layers: list[str],
                 device: torch.device, reason: str, copy_to_device: bool = True) -> None:
        self.teacher, self.layers, self.device, self.reason = teacher, list(layers), device, reason
        self.source = "cache" if cache is not None else "live"
        self._logits: Tensor | None = None
        self._members: Tensor | None = None  # an ensemble's members' logits, combined by the trial's rule on read
        self._tokens: dict[str, Tensor] = {}
        self._vocab = 0
        self._feats: dict[str, Tensor] = {}
        self._cross: CrossRows | None = None  # a teacher of another tokenizer: the training rows in its tokens
        if cache is not None:
            # Read-only views of the object-store arrays (zero-copy on the same node; never written, so
            # torch's warning about non-writable arrays does not apply); on a GPU, one copy.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if cache.tokens is not None:  # a language model's top-k per (block, position)
                    self._tokens = {k: torch.from_numpy(np.asarray(v)) for k, v in cache.tokens.items()}
                    self._vocab = cache.vocab
                else:
                    self._logits = torch.from_numpy(np.asarray(cache.logits))
                    if cache.members is not None and teacher is not None and teacher.rule != "mean":
                        self._members = torch.from_numpy(np.asarray(cache.members))
                self._feats = {k: torch.from_numpy(np.asarray(cache.features[k])) for k in self.layers}
            if device.type == "cuda" and copy_to_device:  # a whole GPU: one copy, then slices on the device
                if self._logits is not None:
                    self._logits = self._logits.to(device)
                if self._members is not None:
                    self._members = self._members.to(device)
                self._tokens = {k: v.to(device) for k, v in self._tokens.items()}
                self._feats = {k: v.to(device) for k, v in self._feats.items()}
            # Trials sharing a GPU (gpus_per_worker < 1) each copy only their batch's rows (__call__).

    @classmethod
    def create(cls, teacher: Teacher | None, cache: TeacherCache | None, records: list[dict[str, Any]],
               data: DataBundle, layers: list[str], device: torch.device,
               copy_to_device: bool = True, seed: int = 0, top_k: int | None = None) -> "TeacherOutputs":
        """The cache when it applies to this trial's teacher, data, seed and layers (and, for a language model,
        holds at least the ``top_k`` tokens the trial learns from; None: every token); else the live teacher
        and the reason."""
        spec = records[0].get("tokenizer") if records else None
        if spec and teacher is not None:  # a teacher of another tokenizer reads the rows re-read in its own tokens
            out = cls(teacher, None, layers, device, "the teacher has its own tokenizer: it runs live on the rows "
                                                     "re-read in its tokens")
            out._cross = cross_rows(records[0], data, teacher)
            return out
        if cache is None:
            return cls(teacher, None, layers, device, "no cache was offered")
        if getattr(cache, "tokens", None) is not None and cache.top_k < min(top_k or cache.vocab, cache.vocab):
            want = f"the top {top_k}" if top_k else f"all {cache.vocab}"
            return cls(teacher, None, layers, device, f"the cache holds the teacher's top {cache.top_k} tokens per "
                                                      f"position; this trial learns from {want}")
        if teacher is not None and teacher.feature_member != getattr(cache, "feature_member", 0) and layers:
            return cls(teacher, None, layers, device, "the cache holds another ensemble member's feature maps")
        if (teacher is not None and len(teacher.members) > 1 and teacher.rule != "mean"
                and not isinstance(cache, ViewCacheHandle) and getattr(cache, "members", None) is None):
            return cls(teacher, None, layers, device, "the cache holds the ensemble's mean only; this trial combines "
                                                      f"its members by {teacher.rule}")
        if isinstance(cache, ViewCacheHandle):
            if teacher is None:  # nothing to distil (none, dml): nothing to read
                return cls(teacher, None, layers, device, "this run has no teacher")
            if len(teacher.members) > 1 and teacher.rule != "mean":
                return cls(teacher, None, layers, device, "the per-epoch cache holds the ensemble's mean; this "
                                                          f"trial combines its members by {teacher.rule}")
            if cache.key != view_cache_key(records, data, seed):
                return cls(teacher, None, layers, device,
                           "the sweep's cache is for another teacher, data or seed (views differ)")
            missing = [k for k in layers if k not in cache.codec.layers]
            if missing:
                return cls(teacher, None, layers, device, f"layers {missing} are not cached ({cache.note})")
            return ViewCacheOutputs(cache, teacher, device)  # type: ignore[return-value]
        if not data.deterministic:
            return cls(teacher, None, layers, device, "random augmentation: outputs differ every epoch")
        if cache.key != cache_key(records, data):
            return cls(teacher, None, layers, device, "stale cache: teacher weights or data changed")
        missing = [k for k in layers if k not in cache.features]
        if missing:
            return cls(teacher, None, layers, device, f"layers {missing} are not cached")
        if len(cache) != len(data.train):
            return cls(teacher, None, layers, device, "cache size does not match the training split")
        return cls(teacher, cache, layers, device, f"shared cache ({cache.note})", copy_to_device)

    @property
    def cross(self) -> bool:
        """Does the teacher read the rows in its own tokens (another tokenizer)?"""
        return self._cross is not None

    def set_epoch(self, epoch: int) -> None:
        """One cache for every epoch (the inputs do not change)."""

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def __call__(self, idx: Tensor, x: Tensor) -> TapOutputs:
        if self._tokens:
            return self._token_rows(idx)
        if self._cross is not None:
            return self._cross_rows(idx)
        if self._logits is None:
            return self.teacher(x)
        i = idx if self._logits.device == idx.device else idx.to(self._logits.device)
        if self._members is not None:  # (B, M, C) -> the trial's own rule
            m = self._members[i].to(self.device, non_blocking=True).transpose(0, 1)
            logits = combine(m, self.teacher.rule, self.teacher.weights)
        else:
            logits = self._logits[i].to(self.device, non_blocking=True)
        feats = {k: v[i].to(self.device, non_blocking=True).float() for k, v in self._feats.items()}
        return TapOutputs(logits, feats)

    def _cross_rows(self, idx: Tensor) -> TapOutputs:
        """A teacher of another tokenizer on the batch's rows in its tokens, with where each row's answer starts and
        how long it is there (what ``uld`` aligns)."""
        i = idx.cpu().numpy()
        c = self._cross
        width = int((c.start[i] + c.size[i]).max())  # the batch's rows, not the split's longest
        out = self.teacher(torch.from_numpy(c.ids[i, :width]).to(self.device))
        start = torch.from_numpy(c.start[i]).to(self.device)
        size = torch.from_numpy(c.size[i]).to(self.device)
        return TapOutputs(AlignedTokens(out.logits.hidden, out.logits.head, start, size), out.features)

    def _token_rows(self, idx: Tensor) -> TapOutputs:
        """A language model's batch of blocks: each position's stored top-k (float16 log-probabilities, ids, the
        log of the rest), never made dense; every token's log-probability when exact."""
        t = self._tokens
        i = idx if t["logp"].device == idx.device else idx.to(t["logp"].device)
        logp = t["logp"][i].to(self.device, non_blocking=True)
        if "index" in t:
            index = t["index"][i].to(self.device, non_blocking=True).to(torch.int64)
            rest = t["rest"][i].to(self.device, non_blocking=True)
        else:  # exact: the ids are the positions in the row, nothing remains
            index = torch.arange(self._vocab, device=self.device).expand(logp.shape)
            rest = torch.full(logp.shape[:-1], -math.inf, device=self.device)
        feats = {k: v[i].to(self.device, non_blocking=True).float() for k, v in self._feats.items()}
        return TapOutputs(TopKTokens(logp, index, rest, self._vocab), feats)


@dataclass
class _EpochTable:
    arrays: dict[str, np.ndarray]
    ready: np.ndarray
    have: set[int] = field(default_factory=set)


def _store_gone_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rx

    return (rx.RayActorError, rx.ObjectLostError)


STORE_GONE = _store_gone_errors()  # the store actor died, or a block it owned went with it


class ViewCacheOutputs:
    """A trial's teacher outputs from the store, by (epoch, sample index). Rows not there yet are computed live
    (on this batch's own view) unless another process has taken them on, used in their stored form and
    published at once; rows another process is computing are waited for, so no row is computed twice."""

    cross = False  # augmented images: the teacher reads the student's inputs

    def __init__(self, handle: ViewCacheHandle, teacher: Any, device: torch.device, refresh_every: int = 8) -> None:
        self.store, self.codec, self.block = handle.store, handle.codec, handle.block
        self.teacher, self.device = teacher, device
        teacher.tap(self.codec.layers)  # rows it computes are published whole: every cached layer, not only its own
        self.refresh_every = refresh_every
        self.reason = f"teacher outputs per (epoch, sample) shared by the sweep ({handle.note})"
        self.table = _EpochTable(self.codec.empty(handle.num_samples), np.zeros(handle.num_samples, bool))
        self.epoch = 0
        self.steps = 0
        self.rows_read = self.rows_live = 0
        self.lost = False  # the store is gone (its node died): the teacher runs live from then on

    @property
    def source(self) -> str:  # type: ignore[override]
        return "live" if self.lost else "view_cache"

    def _store_lost(self, e: BaseException) -> None:
        """The store (and every block it owned) died with its node or was killed: run the teacher live, say why."""
        self.lost = True
        self.reason = (f"the sweep's teacher-output store is gone ({type(e).__name__}) since epoch {self.epoch}: "
                       "the teacher runs live")

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.steps = int(epoch), 0
        self.rows_read = self.rows_live = 0
        if self.lost:
            return
        self.table.ready[:] = False
        self.table.have.clear()
        try:
            self.store.reach.remote(self.epoch)  # before ready(): calls from one process run in order
            self._refresh()
        except STORE_GONE as e:
            self._store_lost(e)

    def _refresh(self) -> None:
        import ray

        got = ray.get(self.store.ready.remote(self.epoch, sorted(self.table.have)))
        for b, (ref,) in got.items():
            arrays = ray.get(ref)
            lo = b * self.block
            hi = lo + len(next(iter(arrays.values())))
            for k, a in arrays.items():
                self.table.arrays[k][lo:hi] = a
            self.table.ready[lo:hi] = True
            self.table.have.add(b)

    def _write(self, idx: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        for k, a in rows.items():
            self.table.arrays[k][idx] = a
        self.table.ready[idx] = True

    def _fill(self, i: np.ndarray, pos: np.ndarray, x: Tensor) -> int:
        """Get the rows at batch positions ``pos``: compute (and publish) those nobody has taken on, fetch the
        others once their owner (the producer or another trial) has published them. Returns rows computed."""
        import ray

        live, wait = 0, 0.01
        while len(pos):
            mine = ray.get(self.store.claim.remote(self.epoch, i[pos]))
            if mine.any():
                p = pos[mine]
                with torch.no_grad():
                    out = self.teacher(x[torch.as_tensor(p, device=x.device)])
                rows, kl = self.codec.encode(out)
                self._write(i[p], rows)
                self.store.publish.remote(self.epoch, i[p], rows, "trial", kl)
                live += len(p)
                pos = pos[~mine]
            if len(pos):
                have, rows = ray.get(self.store.rows.remote(self.epoch, i[pos]))
                if rows is not None:
                    self._write(i[pos[have]], rows)
                    pos = pos[~have]
                if len(pos):  # still being computed elsewhere: wait a little longer each time
                    time.sleep(wait)
                    wait = min(2 * wait, 0.1)
        return live

    def __call__(self, idx: Tensor, x: Tensor) -> TapOutputs:
        self.steps += 1
        if self.lost:
            self.rows_live += len(idx)
            return self.teacher(x)
        ready = self.table.ready
        i = idx.cpu().numpy()
        try:
            if self.steps % self.refresh_every == 0 and not ready.all():
                self._refresh()
            miss = ~ready[i]
            live = self._fill(i, np.flatnonzero(miss), x) if miss.any() else 0
        except STORE_GONE as e:
            self._store_lost(e)
            return self(idx, x)
        self.rows_live += live
        self.rows_read += len(i) - live
        rows_t = {k: torch.from_numpy(a[i]).to(self.device, non_blocking=True) for k, a in self.table.arrays.items()}
        return self.codec.decode(rows_t)

    def epoch_stats(self) -> dict[str, float]:
        total = self.rows_read + self.rows_live
        return {"teacher_cached_fraction": self.rows_read / total if total else 0.0}


def cross_rows(record: dict[str, Any], data: DataBundle, teacher: Teacher) -> CrossRows:
    """The training split re-read in the tokens of the teacher's own tokenizer (its record carries it)."""
    from kdray.data.lm import load_tokenizer
    from kdray.models.hf_lm import max_positions

    hf = getattr(teacher.members[0].net, "hf", None)
    split = data.train
    return retokenize(split.x.cpu().numpy(), split.y.cpu().numpy(), load_tokenizer(str(data.info.tokenizer)),
                      tokenizer_of_record(record), record["tokenizer"],
                      max_positions(hf.config) if hf is not None else None)
