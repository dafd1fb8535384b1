"""The store of a sweep's per-(epoch, sample) teacher outputs: a Ray actor on the driver's node."""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from kdray.cache.codec import BLOCK, CLAIM_TTL_S, Codec


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
