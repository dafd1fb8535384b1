"""Teacher outputs per (epoch, sample) for augmented training data, computed once per sweep.

With random augmentation a sample's input changes every epoch, so the one-pass cache of
:mod:`kdray.teacher_cache` does not apply. But views are a pure function of (seed, epoch, sample)
(:mod:`kdray.data.views`), so every trial of a sweep needs the teacher's outputs on *the same* views:

* a **producer** (a Ray actor, on a GPU when asked) computes epoch e's outputs ahead of the trials, in
  blocks of consecutive sample indices, only for epochs some trial has reached (plus ``prefetch``);
* a **store** (a Ray actor) keeps finished blocks in Ray's object store (trials on a node read them
  without copies), bounded by ``cache.max_bytes``: beyond it, the least recently read blocks are spilled
  to the sweep's storage (local or S3) and read back on demand;
* a **trial** reads its batch's rows by (epoch, sample index); rows nobody has published or taken on it
  computes live and publishes at once, rows the producer (or another trial) is computing it waits for:
  a trial ahead of the producer keeps going, and no row is computed twice.

Storage is compact (:class:`Codec`): the teacher's log-probabilities as the top-k values and their class
indices in float16 plus the remaining probability mass, exact up to float16 rounding when k is the number
of classes; tapped feature maps only when every epoch of them fits the budget. Every trial, whether it
read a row or computed it, trains on the *decoded* row, so a trial's result does not depend on which
process computed what (up to the rounding differences between a CPU and a GPU teacher pass).
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdray.knowledge import TapOutputs

BLOCK = 1024  # samples per stored block (consecutive sample indices)
MIN_LOGP = -1e4  # log-probabilities below this are stored as this (float16 keeps them finite)
CLAIM_TTL_S = 60.0  # rows taken on by a process that published nothing for this long are free again


@dataclass(frozen=True)
class Codec:
    """How one sample's teacher outputs are stored: top-k log-probabilities (+ indices and the remaining mass
    when k < C) and the cached feature maps, all in ``dtype``."""

    num_classes: int
    top_k: int
    features: tuple[tuple[str, tuple[int, ...]], ...] = ()
    dtype: str = "float16"

    @property
    def exact(self) -> bool:
        return self.top_k >= self.num_classes

    @property
    def layers(self) -> list[str]:
        return [name for name, _ in self.features]

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.int16 if self.num_classes < 2**15 else np.int32)

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every stored array's per-sample shape and dtype."""
        dt = np.dtype(self.dtype)
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {"logp": ((min(self.top_k, self.num_classes),), dt)}
        if not self.exact:
            out["index"] = ((self.top_k,), self.index_dtype)
            out["tail"] = ((), np.dtype(np.float32))
        for name, shape in self.features:
            out["f:" + name] = (tuple(shape), dt)
        return out

    def bytes_per_sample(self, with_features: bool = True) -> int:
        return sum(math.prod(s) * d.itemsize for k, (s, d) in self.fields().items()
                   if with_features or not k.startswith("f:"))

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((n, *s), dtype=d) for k, (s, d) in self.fields().items()}

    @torch.no_grad()
    def encode(self, out: TapOutputs) -> tuple[dict[str, np.ndarray], float]:
        """Stored rows of a batch of teacher outputs (numpy, on the CPU), and the summed KL(p ‖ p̂) at T = 1 of
        the decoded distribution p̂ from the teacher's p (0 when exact): what truncation to top-k costs."""
        dt = getattr(torch, self.dtype)
        logp = torch.log_softmax(out.logits.float(), dim=1).clamp_min(MIN_LOGP)
        rows: dict[str, Tensor] = {}
        kl = 0.0
        if self.exact:
            rows["logp"] = logp.to(dt)
        else:
            vals, index = logp.topk(self.top_k, dim=1)
            rows["logp"] = vals.to(dt)
            rows["index"] = index.to(torch.int16 if self.index_dtype == np.int16 else torch.int32)
            rows["tail"] = (1.0 - vals.exp().sum(1)).clamp_min(0.0)
            kl = float((logp.exp() * (logp - self.dense_logits(rows))).sum())
        for name, _ in self.features:
            f = out.features[name].float()
            if dt == torch.float16:  # beyond float16's range a value would become inf
                f = f.clamp(-65504.0, 65504.0)
            rows["f:" + name] = f.to(dt)
        return {k: v.cpu().numpy() for k, v in rows.items()}, kl

    def decode(self, rows: dict[str, Tensor]) -> TapOutputs:
        """Teacher outputs as the losses take them: (B, C) float32 log-probabilities (every logit-based type is
        invariant to a per-sample shift of the logits) and float32 feature maps.

        With k < C the top-k classes keep their log-probabilities and the other C − k share the remaining mass
        equally; the losses (kd, dkd, dist, ...) then run unchanged on this sparse target made dense per batch
        (B × C floats, transient), which is the exact teacher distribution when k = C."""
        feats = {name: rows["f:" + name].float() for name, _ in self.features}
        return TapOutputs(self.dense_logits(rows), feats)

    def dense_logits(self, rows: dict[str, Tensor]) -> Tensor:
        """(B, C) float32 log-probabilities from stored rows (see :meth:`decode`)."""
        vals = rows["logp"].float()
        if self.exact:
            return vals
        rest = self.num_classes - self.top_k
        tail = torch.log(rows["tail"].float().clamp_min(1e-12) / rest).clamp_min(MIN_LOGP)
        logits = tail[:, None].expand(vals.shape[0], self.num_classes).clone()
        return logits.scatter_(1, rows["index"].long(), vals)


def default_top_k(num_classes: int) -> int:
    """Every class up to 128 classes (exact); 64 beyond (ImageNet: 1000 → 64, 256 bytes per sample)."""
    return num_classes if num_classes <= 128 else 64


@dataclass
class ViewCacheHandle:
    """What a trial receives: the store actor, the codec, and the key its own teacher and data must match."""

    store: Any
    codec: Codec
    num_samples: int
    key: str
    seed: int
    block: int = BLOCK
    note: str = ""


def view_cache_key(records: list[dict[str, Any]], data: Any, seed: int) -> str:
    """Teacher weights, data (fingerprint), whether it is augmented, and the seed of the views."""
    from kdray.teacher_cache import cache_key

    return f"{cache_key(records, data)}-aug{int(data.augment is not None)}-seed{seed}"


# ----------------------------------------------------------------------------------------------- the store
def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class ViewStore:
    """A Ray actor: the finished blocks of every epoch (object refs it owns), the blocks being filled, the
    memory budget and the spill folder, and the counters the sweep reports."""

    def __init__(self, num_samples: int, codec: Codec, max_bytes: int, spill_dir: str | None, prefetch: int,
                 max_epoch: int, block: int = BLOCK) -> None:
        self.n, self.codec, self.max_bytes, self.spill_dir = num_samples, codec, max_bytes, spill_dir
        self.prefetch, self.max_epoch, self.block = prefetch, max_epoch, block
        self.blocks = (num_samples + block - 1) // block
        self.partial: dict[tuple[int, int], tuple[dict[str, np.ndarray], np.ndarray]] = {}
        self.done: dict[tuple[int, int], Any] = {}  # (epoch, block) -> ObjectRef, or a spill path
        self.last_read: dict[tuple[int, int], float] = {}
        self.claims: dict[tuple[int, int], np.ndarray] = {}  # per row: when someone took it on (-inf: nobody)
        self.spill_paths: dict[tuple[int, int], str] = {}  # blocks written to the spill folder (written once)
        self.first_open = 1  # epochs before it are complete
        self.reached = 0
        self.stats = {"rows_by_producer": 0, "rows_by_trials": 0, "rows_read": 0, "blocks_spilled": 0,
                      "blocks_reloaded": 0, "blocks_dropped": 0, "peak_bytes": 0, "kl_sum": 0.0, "kl_rows": 0}
        self.epochs_computed: set[int] = set()

    # -- demand
    def reach(self, epoch: int) -> None:
        self.reached = max(self.reached, int(epoch))

    def _rows_of(self, key: tuple[int, int]) -> tuple[int, int]:
        return key[1] * self.block, min((key[1] + 1) * self.block, self.n)

    def _bytes_of(self, key: tuple[int, int]) -> int:
        lo, hi = self._rows_of(key)
        return (hi - lo) * self.codec.bytes_per_sample()

    def _take(self, key: tuple[int, int], local: np.ndarray, now: float) -> np.ndarray:
        """Which of these rows of a block nobody has computed or taken on (a claim older than CLAIM_TTL_S is
        void: its owner died); they are now the caller's."""
        lo, hi = self._rows_of(key)
        filled = self.partial[key][1] if key in self.partial else np.zeros(hi - lo, bool)
        claims = self.claims.setdefault(key, np.full(hi - lo, -np.inf))
        free = ~filled[local] & (now - claims[local] > CLAIM_TTL_S)
        claims[local[free]] = now
        return free

    def next_job(self, rows: int = 256) -> tuple[int, list[int]] | None:
        """The producer's next rows: the earliest rows nobody has computed or taken on, of the epochs trials have
        reached (and ``prefetch`` beyond, never past the longest trial's last epoch); None: nothing to do."""
        now = time.monotonic()
        last = min(self.reached + self.prefetch, self.max_epoch) if self.reached else 0
        while self.first_open <= last and all((self.first_open, b) in self.done for b in range(self.blocks)):
            self.first_open += 1
        for e in range(self.first_open, last + 1):
            for b in range(self.blocks):
                key = (e, b)
                if key in self.done:
                    continue
                lo, hi = self._rows_of(key)
                local = np.arange(hi - lo)
                free = local[self._take(key, local, now)]
                if len(free) > rows:  # give back what this job will not cover
                    self.claims[key][free[rows:]] = -np.inf
                    free = free[:rows]
                if len(free):
                    return e, [lo + int(i) for i in free]
        return None

    def claim(self, epoch: int, idx: np.ndarray) -> np.ndarray:
        """For a trial missing these rows: which it should compute itself (nobody has them or is on them); the
        others it fetches with :meth:`rows` once they are published."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.zeros(len(idx), bool)
        now = time.monotonic()
        blocks = idx // self.block
        for b in np.unique(blocks):
            key = (int(epoch), int(b))
            if key in self.done:
                continue
            sel = blocks == b
            out[sel] = self._take(key, idx[sel] - self._rows_of(key)[0], now)
        return out

    def rows(self, epoch: int, idx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """The published ones of these rows: (which are there, the values of those only; None if none is)."""
        import ray

        idx = np.asarray(idx, dtype=np.int64)
        have = np.zeros(len(idx), bool)
        parts: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
        blocks = idx // self.block
        for b in np.unique(blocks):
            key = (int(epoch), int(b))
            sel = np.flatnonzero(blocks == b)
            local = idx[sel] - self._rows_of(key)[0]
            if key in self.done:
                arrays, ok = ray.get(self._ref(key)), np.ones(len(sel), bool)
                self.last_read[key] = time.monotonic()
            elif key in self.partial:
                arrays, filled = self.partial[key]
                ok = filled[local]
            else:
                continue
            if ok.any():
                parts.append((sel[ok], local[ok], arrays))
                have[sel[ok]] = True
        if not parts:
            return have, None
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")  # back to the order of idx
        out = {k: np.concatenate([p[2][k][p[1]] for p in parts])[order] for k in self.codec.fields()}
        self.stats["rows_read"] += int(have.sum())
        return have, out

    def _ref(self, key: tuple[int, int]) -> Any:
        """A finished block's object ref, read back into the object store if it was spilled."""
        import ray

        from kdray.storage import read_bytes

        ref = self.done[key]
        if isinstance(ref, str):
            with np.load(io.BytesIO(read_bytes(ref))) as z:
                ref = ray.put({k: z[k] for k in z.files})
            self.done[key] = ref
            self.stats["blocks_reloaded"] += 1
        return ref

    # -- publication
    def publish(self, epoch: int, idx: np.ndarray, rows: dict[str, np.ndarray], source: str = "trial",
                kl: float = 0.0) -> None:
        import ray

        idx = np.asarray(idx, dtype=np.int64)
        self.stats["rows_by_producer" if source == "producer" else "rows_by_trials"] += len(idx)
        self.stats["kl_sum"] += float(kl)
        self.stats["kl_rows"] += len(idx)
        self.epochs_computed.add(int(epoch))
        blocks = idx // self.block
        for b in np.unique(blocks):
            key = (int(epoch), int(b))
            if key in self.done:
                continue
            lo, hi = self._rows_of(key)
            arrays, filled = self.partial.get(key) or (self.codec.empty(hi - lo), np.zeros(hi - lo, bool))
            sel = blocks == b
            local = idx[sel] - lo
            for k, a in arrays.items():
                a[local] = rows[k][sel]
            filled[local] = True
            if filled.all():
                self.partial.pop(key, None)
                self.claims.pop(key, None)
                self.done[key] = ray.put(arrays)
                self.last_read[key] = time.monotonic()
            else:
                self.partial[key] = (arrays, filled)
        self._bound_memory()

    def _in_memory(self) -> int:
        """Bytes of the finished blocks held in the object store and of the blocks being filled."""
        held = [k for k, ref in self.done.items() if not isinstance(ref, str)]
        return sum(self._bytes_of(k) for k in [*held, *self.partial])

    def _bound_memory(self) -> None:
        """Spill (or, with no spill folder, drop: they will be recomputed) the least recently read blocks until
        what the store holds fits ``max_bytes``."""
        import ray

        from kdray.storage import join, write_bytes

        used = self._in_memory()
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], used)
        held = sorted((t, k) for k, t in self.last_read.items() if not isinstance(self.done.get(k), str))
        for _, key in held:
            if used <= self.max_bytes:
                break
            used -= self._bytes_of(key)
            if self.spill_dir:
                if key not in self.spill_paths:  # a block read back from the spill folder is there already
                    path = join(self.spill_dir, f"epoch{key[0]:05d}_block{key[1]:05d}.npz")
                    write_bytes(path, _npz(ray.get(self.done[key])))
                    self.spill_paths[key] = path
                    self.stats["blocks_spilled"] += 1
                self.done[key] = self.spill_paths[key]
            else:  # gone: a trial that needs it again computes it (the producer does not go back)
                del self.done[key], self.last_read[key]
                self.stats["blocks_dropped"] += 1

    # -- reading
    def ready(self, epoch: int, have: list[int]) -> dict[int, list]:
        """The finished blocks of ``epoch`` not in ``have``, each as ``[ObjectRef]`` (a list: Ray hands the
        reference over instead of resolving it)."""
        out = {}
        have_set = set(have)
        now = time.monotonic()
        for b in range(self.blocks):
            key = (int(epoch), b)
            if b in have_set or key not in self.done:
                continue
            ref = self._ref(key)  # spilled: back into the object store
            self.last_read[key] = now
            self.stats["rows_read"] += min((b + 1) * self.block, self.n) - b * self.block
            out[b] = [ref]
        self._bound_memory()
        return out

    def summary(self) -> dict[str, Any]:
        s = dict(self.stats)
        s["epochs_computed"] = sorted(self.epochs_computed)
        s["blocks_finished"] = len(self.done)
        s["bytes_in_memory"] = self._in_memory()
        s["bytes_per_sample"] = self.codec.bytes_per_sample()
        s["mean_truncation_kl"] = s["kl_sum"] / s["kl_rows"] if s["kl_rows"] else 0.0
        return s


# -------------------------------------------------------------------------------------------- the producer
class ViewProducer:
    """A Ray actor computing the teacher's outputs block by block for the store's demanded epochs."""

    def __init__(self, store: Any, records: list, dataset: dict[str, Any], seed: int, codec: Codec,
                 use_gpu: bool = False, threads: int = 1, batch_size: int = 256, key: str | None = None) -> None:
        self.store, self.records, self.dataset, self.seed, self.codec = store, records, dataset, seed, codec
        self.use_gpu, self.threads, self.batch_size, self.key = use_gpu, threads, batch_size, key

    def run(self, poll_s: float = 0.05) -> None:
        """Work until killed: take a block, compute its missing rows, publish them."""
        import ray

        from kdray.config import DatasetConfig
        from kdray.data import load_dataset
        from kdray.data.loaders import train_views
        from kdray.data.views import ViewKey
        from kdray.models import Teacher
        from kdray.train.loop import resolve_ref

        torch.set_num_threads(max(1, self.threads))
        device = torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
        data = load_dataset(DatasetConfig.model_validate(self.dataset))
        records = [resolve_ref(r) for r in self.records]
        mine = view_cache_key(records, data, self.seed)
        if self.key is not None and mine != self.key:  # its node's copy of the data differs from the driver's
            raise RuntimeError(f"the producer's teacher or data on node {ray.get_runtime_context().get_node_id()} "
                               f"give cache key {mine}, not the sweep's {self.key}: it publishes nothing, and "
                               "trials compute their teacher outputs themselves")
        teacher = Teacher.from_records(records).to(device)
        teacher.tap(self.codec.layers)
        while True:
            job = ray.get(self.store.next_job.remote())
            if job is None:
                time.sleep(poll_s)
                continue
            epoch, missing = job
            key = ViewKey(self.seed, epoch)
            idx_all = torch.as_tensor(missing, dtype=torch.int64)
            parts, kl = [], 0.0
            with torch.no_grad():
                for s in range(0, len(idx_all), self.batch_size):
                    idx = idx_all[s:s + self.batch_size]
                    rows, k = self.codec.encode(teacher(train_views(data.train, idx, key, data.augment, device)))
                    parts.append(rows)
                    kl += k
            rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            ray.get(self.store.publish.remote(epoch, idx_all.numpy(), rows, "producer", kl))


# ---------------------------------------------------------------------------------------------- the trial
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


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class ViewCache:
    """The sweep's side: the handle trials get, the actors to stop, and where spilled blocks go."""

    handle: ViewCacheHandle
    actors: list
    spill_dir: str | None
    producer_run: Any = None
    producer_gpus: float = 0.0  # what the producer holds, for the sweep's concurrency plan
    _stopped: bool = False
    _lock: Any = field(default_factory=lambda: __import__("threading").Lock())

    def start_producer(self, make: Any, poll_s: float = 2.0) -> None:
        """Start the producer (``make(node_id)`` creates the actor) on a node with CPUs: now if one is there,
        else from a background thread as soon as one joins (a cluster's 0-CPU head runs no producer)."""
        import threading

        import ray

        def start(node: str) -> None:
            with self._lock:
                if self._stopped:
                    return
                producer = make(node)
                self.actors.append(producer)
                self.producer_run = producer.run.remote()

        node = producer_node(ray.nodes(), self.producer_gpus)
        if node is not None:
            start(node)
            return

        def wait_for_a_node() -> None:
            while not self._stopped:
                node = producer_node(ray.nodes(), self.producer_gpus)
                if node is not None:
                    start(node)
                    return
                time.sleep(poll_s)

        threading.Thread(target=wait_for_a_node, daemon=True, name="kdray-view-producer-start").start()

    def summary(self) -> dict[str, Any]:
        import ray

        return ray.get(self.handle.store.summary.remote())

    def producer_error(self) -> str | None:
        """Why the producer stopped, if it did (it only stops by failing); trials then computed live."""
        import ray

        if self.producer_run is None:
            return None
        done, _ = ray.wait([self.producer_run], timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - reported, the trials did not depend on it
            return f"{type(e).__name__}: {e}"
        return None

    def stop(self) -> None:
        import ray

        from kdray.storage import remove_tree

        with self._lock:
            self._stopped = True
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        if self.spill_dir:
            remove_tree(self.spill_dir)


def plan_codec(records: list[dict[str, Any]], data: Any, layers: list[str], cache_cfg: Any, max_epochs: int,
               ) -> tuple[Codec, str]:
    """The codec for this sweep, and a note on what is cached: logits always; feature maps only when every
    epoch of them fits ``cache.max_bytes``."""
    from kdray.data.loaders import train_views
    from kdray.data.views import ViewKey
    from kdray.models import Teacher

    n = len(data.train)
    teacher = Teacher.from_records(records)
    teacher.tap(layers)
    with torch.no_grad():
        probe = teacher(train_views(data.train, torch.arange(2), ViewKey(0, 1), data.augment, torch.device("cpu")))
    teacher.tap([])
    c = int(probe.logits.shape[1])
    k = min(cache_cfg.top_k or default_top_k(c), c)
    dtype = "float32" if cache_cfg.dtype == "float32" else "float16"
    full = Codec(c, k, tuple((name, tuple(probe.features[name].shape[1:])) for name in layers), dtype)
    logits_only = Codec(c, k, (), dtype)
    what = f"{'all ' + str(c) if k >= c else f'top-{k} of {c}'} classes in {dtype}"
    per_epoch = n * full.bytes_per_sample()
    if layers and per_epoch * max_epochs <= cache_cfg.max_bytes:
        codec = full
        what += f", + {len(layers)} feature map{'s' if len(layers) > 1 else ''}"
    else:
        codec = logits_only
        if layers:
            what += (f"; feature maps not cached ({per_epoch / 2**20:.1f} MiB per epoch x {max_epochs} epochs "
                     f"exceed cache.max_bytes): feature knowledge runs the teacher live")
    b = codec.bytes_per_sample()
    return codec, f"{what}; {b} bytes per sample, {n * b / 2**20:.2f} MiB per epoch"


def producer_node(nodes: list[dict[str, Any]], gpus: float) -> str | None:
    """The node a producer runs on: one that offers CPUs (and a GPU when it needs one), never a 0-CPU head, whose
    cores it would not have (it computes); None while no such node has joined."""
    for n in nodes:
        res = n.get("Resources", {})
        if n.get("Alive") and res.get("CPU", 0) > 0 and res.get("GPU", 0) >= gpus:
            return n["NodeID"]
    return None


def start_view_cache(records: list[dict[str, Any]], refs: list, data: Any, dataset: dict[str, Any], seed: int,
                     layers: list[str], cache_cfg: Any, max_epochs: int, spill_dir: str | None,
                     trials_use_gpu: bool, trial_gpus: float = 0.0) -> ViewCache:
    """Start the store and (unless ``cache.producer`` is off) the producer for a sweep over augmented data.

    The store lives on the driver's node (hard affinity): it owns every block, and only the driver's node lives
    as long as the sweep; should it die anyway, trials run their teacher live (``ViewCacheOutputs``). The producer
    runs on a node with CPUs (with a GPU when ``producer_gpus``); on a cluster whose workers have not joined yet
    it starts when the first one does."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    codec, note = plan_codec(records, data, layers, cache_cfg, max_epochs)
    here = ray.get_runtime_context().get_node_id()
    store = ray.remote(ViewStore).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
        len(data.train), codec, cache_cfg.max_bytes, spill_dir, cache_cfg.prefetch_epochs, max_epochs)
    key = view_cache_key(records, data, seed)
    handle = ViewCacheHandle(store, codec, len(data.train), key, seed, note=note)
    cache = ViewCache(handle, [store], spill_dir)
    gpus = cache_cfg.producer_gpus
    if gpus is None:  # a GPU of its own only where one trial still fits beside it (no sweep can wait on it)
        gpus = 1.0 if trials_use_gpu and ray.cluster_resources().get("GPU", 0) >= trial_gpus + 1 else 0.0
    if cache_cfg.producer and trials_use_gpu and not gpus:
        handle.note = note + ("; no producer: trials on GPUs would wait for a CPU one, so they share what they "
                              "compute (cache.producer_gpus gives it a GPU)")
    elif cache_cfg.producer:
        cache.producer_gpus = float(gpus)
        cache.start_producer(lambda node: ray.remote(ViewProducer).options(
            num_cpus=0, num_gpus=gpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            store, refs, dataset, seed, codec, use_gpu=gpus > 0, key=key))
        handle.note = note + (f"; producer on {gpus:g} GPU" if gpus else "; producer on CPU")
    else:
        handle.note = note + "; no producer: trials share what they compute"
    return cache
