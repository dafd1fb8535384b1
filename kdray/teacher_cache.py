"""Teacher outputs computed once per sweep and shared by every trial on every node.

Every trial of a sweep runs the same frozen teacher over the same training inputs. When those inputs
are deterministic (no random augmentation), kdray runs the teacher once over the training split,
keeps its logits and the tapped feature maps the sweep needs, and hands them to every trial through
Ray's object store. Trials look outputs up **by sample index** (never by batch position), so any
shuffling or sharding reads the right rows.

The cache is keyed by (teacher weights, data fingerprint, split) and every trial recomputes the key
from its own teacher and data before use: a stale cache (other weights, other data or transforms) is
never used. With random augmentation the outputs differ every epoch: :mod:`kdray.view_cache` shares them
per (epoch, sample) instead. When a trial taps a layer that was not cached, the trial runs the teacher
live and says why in its ``teacher_reason`` (its ``teacher_source`` metric says ``live``).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdray.data import Batches, DataBundle
from kdray.knowledge import TapOutputs
from kdray.models import Teacher, weights_digest


def cache_key(records: list[dict[str, Any]], data: DataBundle, split: str = "train") -> str:
    h = hashlib.sha256()
    h.update(weights_digest(records).encode())
    h.update(data.fingerprint.encode())
    h.update(split.encode())
    return h.hexdigest()[:20]


@dataclass
class TeacherCache:
    """Teacher logits and feature maps for every sample of one split, indexed by sample index."""

    key: str
    logits: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: str = "float32"
    note: str = ""

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes + sum(a.nbytes for a in self.features.values()))

    def __len__(self) -> int:
        return int(self.logits.shape[0])


def plan_cache(n: int, shapes: dict[str, tuple[int, ...]], num_classes: int, max_bytes: int, dtype: str = "auto"):
    """Decide what to cache within the budget: (feature dtype, layers kept, note).

    Logits are always float32 (they are small, and KD at T=1 is sensitive to them). Features are
    float32 when they fit, float16 when only half fits; beyond that only the logits are cached and
    trials that need features run the teacher live.
    """
    logits_bytes = n * num_classes * 4
    feat_elems = sum(n * math.prod(s) for s in shapes.values())
    if dtype in ("auto", "float32") and logits_bytes + feat_elems * 4 <= max_bytes:
        return "float32", list(shapes), "all outputs in float32"
    if dtype in ("auto", "float16") and logits_bytes + feat_elems * 2 <= max_bytes:
        return "float16", list(shapes), "features in float16 to fit the memory budget"
    if logits_bytes <= max_bytes:
        return "float32", [], f"features ({feat_elems * 2 / 2**20:.0f} MiB in fp16) exceed the budget: logits only"
    return None, [], "even the logits exceed the memory budget: no cache"


@torch.no_grad()
def build_cache(
    records: list[dict[str, Any]], data: DataBundle, layers: list[str], max_bytes: int, dtype: str = "auto",
    device: torch.device | str = "cpu", batch_size: int = 512,
) -> TeacherCache | None:
    """Run the teacher once over the training split and keep its outputs (``None`` if nothing fits)."""
    device = torch.device(device)
    teacher = Teacher.from_records(records).to(device)
    teacher.tap(layers)
    split = data.train
    n = len(split)
    # Shapes from one batch of two samples.
    probe = next(iter(Batches(split, 2, train=False, device=device)))[1]
    out = teacher(probe)
    shapes = {k: tuple(v.shape[1:]) for k, v in out.features.items()}
    feat_dtype, keep, note = plan_cache(n, shapes, out.logits.shape[1], max_bytes, dtype)
    if feat_dtype is None:
        return None
    teacher.tap(keep)
    logits = np.empty((n, out.logits.shape[1]), dtype=np.float32)
    feats = {k: np.empty((n, *shapes[k]), dtype=np.dtype(feat_dtype)) for k in keep}
    for idx, x, _ in Batches(split, batch_size, train=False, device=device):
        o = teacher(x)
        i = idx.cpu().numpy()
        logits[i] = o.logits.float().cpu().numpy()
        for k in keep:
            feats[k][i] = o.features[k].to(torch.float16 if feat_dtype == "float16" else torch.float32).cpu().numpy()
    teacher.tap([])
    return TeacherCache(cache_key(records, data), logits, feats, feat_dtype, note)


class TeacherOutputs:
    """What the training loop asks for teacher outputs: from the cache when valid, else live."""

    def __init__(self, teacher: Teacher | None, cache: TeacherCache | None, layers: list[str],
                 device: torch.device, reason: str, copy_to_device: bool = True) -> None:
        self.teacher, self.layers, self.device, self.reason = teacher, list(layers), device, reason
        self.source = "cache" if cache is not None else "live"
        self._logits: Tensor | None = None
        self._feats: dict[str, Tensor] = {}
        if cache is not None:
            # Read-only views of the object-store arrays (zero-copy on the same node; never written, so
            # torch's warning about non-writable arrays does not apply); on a GPU, one copy.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._logits = torch.from_numpy(np.asarray(cache.logits))
                self._feats = {k: torch.from_numpy(np.asarray(cache.features[k])) for k in self.layers}
            if device.type == "cuda" and copy_to_device:  # a whole GPU: one copy, then slices on the device
                self._logits = self._logits.to(device)
                self._feats = {k: v.to(device) for k, v in self._feats.items()}
            # Trials sharing a GPU (gpus_per_worker < 1) each copy only their batch's rows (__call__).

    @classmethod
    def create(cls, teacher: Teacher | None, cache: TeacherCache | None, records: list[dict[str, Any]],
               data: DataBundle, layers: list[str], device: torch.device,
               copy_to_device: bool = True, seed: int = 0) -> "TeacherOutputs":
        """The cache when it applies to this trial's teacher, data, seed and layers; else the live teacher
        and the reason."""
        if cache is None:
            return cls(teacher, None, layers, device, "no cache was offered")
        from kdray.view_cache import ViewCacheHandle, ViewCacheOutputs, view_cache_key

        if isinstance(cache, ViewCacheHandle):
            if teacher is None:  # nothing to distil (none, dml): nothing to read
                return cls(teacher, None, layers, device, "this run has no teacher")
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

    def set_epoch(self, epoch: int) -> None:
        """One cache for every epoch (the inputs do not change)."""

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def __call__(self, idx: Tensor, x: Tensor) -> TapOutputs:
        if self._logits is None:
            return self.teacher(x)
        i = idx if self._logits.device == idx.device else idx.to(self._logits.device)
        logits = self._logits[i].to(self.device, non_blocking=True)
        feats = {k: v[i].to(self.device, non_blocking=True).float() for k, v in self._feats.items()}
        return TapOutputs(logits, feats)
